"""TRL's own logging sent where tinylab's `Tracking` writes: runs of both backends in one dashboard.

`grpo_trainer` passes the GRPOConfig's `report_to` through to TRL (`trl_report_fields`), whose
transformers callbacks log `train/reward`, `train/frac_reward_zero_std`, ... - the names
`tinylab.train.tracking` gives the same quantities; the bridge's step callback adds the trained numbers
(`train/v_norm`, `train/v/<i>`) to what they log. `point_trl_logging` then makes those callbacks
write beside tinylab's runs:

- Trackio: TRL's callback opens the run with `project` and `run_name` (TRL passes no group); the
  folder is trackio's `TRACKIO_DIR`, checked against `tracking_dir` before TRL imports trackio.
- TensorBoard: TRL's callback writes to `tensorboard_dir(project, run_name, run_group,
  tracking_dir)` (unless `TENSORBOARD_LOGGING_DIR` says otherwise).
- W&B: tinylab opens the W&B run (project, name, group, `dir=tracking_dir`) just before TRL's
  callback, which then logs into it (transformers' "run created manually" path), and finishes it
  when training ends.

The run's name is `run_name`, else the TRL output folder's name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tinylab.train.tracking import check_installed, open_tracker, tensorboard_dir

__all__ = ["point_trl_logging", "trl_report_fields", "trl_run_name"]


def trl_run_name(config, output_dir: str) -> str:
    """The run's name in the tracker: `config.run_name`, else the output folder's name."""
    return config.run_name or Path(output_dir).name


def trl_report_fields(config, output_dir: str) -> dict:
    """TRL GRPOConfig fields for `config`'s tracking: `report_to`, `run_name`, `project`.

    A missing package is an ImportError naming the extra here; a `tracking_dir` trackio cannot
    write to is a ValueError (call this before TRL is imported: importing TRL's trainer imports trackio).
    """
    check_installed(config.report_to, config.tracking_dir)
    return dict(report_to=config.report_to, run_name=trl_run_name(config, output_dir), project=config.project)


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class _OpenWandbRun(_trainer_callback_base()):
    """Opens tinylab's W&B run before TRL's WandbCallback sets up (it then logs into `wandb.run`)."""

    def __init__(self, config, name: str):
        self.config, self.name, self.writer = config, name, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.writer is None:
            settings = {f"config/{k}": v for k, v in dataclasses.asdict(self.config).items()}
            self.writer = open_tracker("wandb", project=self.config.project, name=self.name,
                                       group=self.config.run_group, directory=self.config.tracking_dir,
                                       config={"kind": "trl", **settings}, global_run=True)


class _FinishWandbRun(_trainer_callback_base()):
    """After TRL's WandbCallback has ended training: finish the run `_OpenWandbRun` opened."""

    def __init__(self, opener: _OpenWandbRun):
        self.opener = opener

    def on_train_end(self, args, state, control, **kwargs):
        writer, self.opener.writer = self.opener.writer, None
        if writer is not None:
            writer.close()


def point_trl_logging(trainer, config, name: str) -> None:
    """Make the TRL trainer's TensorBoard and W&B callbacks write where tinylab's `Tracking` would."""
    from transformers.integrations import TensorBoardCallback, WandbCallback

    report_to = trainer.args.report_to or []
    if "tensorboard" in report_to:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = str(tensorboard_dir(config.project, name, config.run_group,
                                                           config.tracking_dir))
    if "wandb" in report_to:
        theirs = trainer.pop_callback(WandbCallback)
        opener = _OpenWandbRun(config, name)
        trainer.add_callback(opener)
        if theirs is not None:
            trainer.add_callback(theirs)
        trainer.add_callback(_FinishWandbRun(opener))
