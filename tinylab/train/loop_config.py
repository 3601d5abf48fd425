"""What every training loop's config shares: where it checkpoints and where it is tracked.

`GRPOConfig` and `SFTConfig` both extend `LoopConfig`, so the seven fields are declared, documented
and checked once; `SFTConfig.from_grpo` copies exactly these (`loop_fields`).
"""

from __future__ import annotations

import dataclasses

from tinylab.basics.checks import check_int
from tinylab.train.tracking import check_tracking_fields

__all__ = ["LoopConfig", "loop_fields"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Checkpointing and experiment tracking of one run (keyword-only in every loop's config)."""

    checkpoint_every: int = 0
    """Also checkpoint every this many steps (0 = only when the run ends or stops)."""
    checkpoint_dir: str | None = None
    """Checkpoint folder; None = a new folder under the tinylab cache (`runs/`)."""
    report_to: str = "none"
    """Where each step is also logged: "none", "trackio", "tensorboard" or "wandb" (`tinylab.train.tracking`;
    the packages: pip install "tinylab[track]", for W&B "tinylab[wandb]")."""
    project: str = "tinylab"
    """The tracker's project (Trackio and W&B project; TensorBoard: a folder under `tracking_dir`)."""
    run_name: str | None = None
    """The run's name in the tracker; None = the checkpoint folder's name."""
    run_group: str | None = None
    """A group of runs in the tracker (Trackio and W&B group; TensorBoard: a subfolder), e.g. one sweep."""
    tracking_dir: str | None = None
    """Where the tracker writes; None = its default (Trackio: TRACKIO_DIR, TensorBoard: ./runs, W&B: ./wandb)."""

    def __post_init__(self):
        check_int("checkpoint_every", self.checkpoint_every, low=0)
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            object.__setattr__(self, "checkpoint_dir", str(self.checkpoint_dir))
        check_tracking_fields(self)


def loop_fields(config: LoopConfig) -> dict:
    """The checkpoint and tracking fields of any loop's config, by name (to carry them to another loop)."""
    return {field.name: getattr(config, field.name) for field in dataclasses.fields(LoopConfig)}
