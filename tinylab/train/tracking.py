"""Experiment tracking: one callback that sends a run's steps to Trackio, TensorBoard or W&B.

    config = GRPOConfig(report_to="trackio", project="capitals", run_name="u13-lr1e-2")
    run = train_grpo(model, tokenizer, adapter, task, config)   # the Run attaches a `Tracking`

`report_to` is "none" (default), "trackio", "tensorboard" or "wandb"; the packages come with
`pip install "tinylab[track]"` (Trackio, TensorBoard) and `pip install "tinylab[wandb]"`. At the start the run's config is logged
(kind, task, trained numbers, the training and adapter configs); after every step, `step_metrics`:
the quantities TRL's `GRPOTrainer` also logs, under the names it gives them through transformers'
logging callbacks (`train/reward`, `train/reward_std`, `train/frac_reward_zero_std`,
`train/completions/mean_length`, `train/completions/max_length`, `train/completions/min_length`,
`train/completions/clipped_ratio`, `train/num_tokens`, `train/clip_ratio/region_mean`,
`train/kl`, `train/loss`, `train/grad_norm`, with `train/global_step`), so runs of `train_grpo` and
of `tinylab.interop.trl_bridge.grpo_trainer` overlay in one dashboard; then tinylab's own
(`train/v_norm`, `train/v/<i>` for the vector's first `vector_entries` numbers, the sampled replies'
format and correct rates, seconds per phase). A value the step did not measure (NaN in the StepLog,
e.g. `kl` when `kl=0`) is left out, as TRL leaves it out. `log_scores` adds held-out scores
(`eval/<name>`).

Where it goes (`tracking_dir`, else the tool's default):
- Trackio: its local database under `TRACKIO_DIR` (default `~/.cache/huggingface/trackio`);
  trackio reads that variable once, when it is first imported, so `tracking_dir` must be set
  before trackio (or TRL, which imports it) is imported; `trackio show` opens the dashboard.
- TensorBoard: event files in `<tracking_dir or ./runs>/<project>/[<group>/]<name>`;
  `tensorboard --logdir runs/<project>`.
- W&B: `wandb.init(project, name, group, dir=tracking_dir)`; offline with `WANDB_MODE=offline`.
  W&B writes the run's file from its own service process: `run.finish()` can return before the
  file is complete; it is complete when that process ends (at exit, or after `wandb.teardown()`).

The callback only reads the StepLog and the adapter's vector: the loop's numbers are the same with
and without it. It flushes and closes its writer when the run ends, stops or fails (`on_end`);
inside `with Tracking(...) as tracker:` it stays open until the block ends, for `log_scores` after
training.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
from pathlib import Path

from tinylab.basics.checks import check_choice

__all__ = ["REPORT_TO", "TRACKING_FIELDS", "TRL_NAMES", "Tracking", "attach_tracking", "check_installed",
           "check_tracking_fields", "open_tracker", "run_config", "step_metrics", "tensorboard_dir", "trackio_dir",
           "vector_metrics"]

REPORT_TO = ("none", "trackio", "tensorboard", "wandb")
TRACKING_FIELDS = ("report_to", "project", "run_name", "run_group", "tracking_dir")  # in GRPOConfig and SFTConfig
EXTRAS = {"trackio": "track", "tensorboard": "track", "wandb": "wandb"}  # pip install "tinylab[<extra>]"

TRL_NAMES = {  # StepLog field -> the key TRL's GRPOTrainer logs for the same quantity
    "loss": "loss",
    "reward_mean": "reward",
    "reward_std": "reward_std",
    "zero_spread": "frac_reward_zero_std",
    "completion_len": "completions/mean_length",
    "completion_len_max": "completions/max_length",
    "completion_len_min": "completions/min_length",
    "clipped_ratio": "completions/clipped_ratio",
    "num_tokens": "num_tokens",
    "clip_frac": "clip_ratio/region_mean",
    "kl": "kl",
    "entropy": "entropy",
    "grad_norm": "grad_norm",
}
OURS = ("v_norm", "format_rate", "correct_rate", "gen_time", "fwd_bwd_time", "step_time")


def check_tracking_fields(config) -> None:
    """ValueError naming a bad `report_to`, `project`, `run_name`, `run_group` or `tracking_dir`."""
    check_choice("report_to", config.report_to, REPORT_TO)
    if not isinstance(config.project, str) or not config.project.strip():
        raise ValueError(f"project={config.project!r}: allowed values are non-empty strings")
    for name in ("run_name", "run_group"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{name}={value!r}: allowed values are None or a non-empty string")
    if config.tracking_dir is not None and not isinstance(config.tracking_dir, str):
        object.__setattr__(config, "tracking_dir", os.fspath(config.tracking_dir))


def step_metrics(entry, vector=None, vector_entries: int = 64) -> dict[str, float]:
    """The keys and values logged for one StepLog: TRL's names first, then ours; NaN fields left out.

    `vector`: the adapter's v after the step ([num_params] on the CPU); its first `vector_entries`
    numbers are logged as `train/v/<i>`.
    """
    out = {"train/global_step": float(entry.step)}
    for field, name in TRL_NAMES.items():
        value = float(getattr(entry, field))
        if not math.isnan(value):
            out[f"train/{name}"] = value
    for field in OURS:
        value = float(getattr(entry, field))
        if not math.isnan(value):
            out[f"train/{field}"] = value
    if vector is not None:
        out.update({k: v for k, v in vector_metrics(vector, vector_entries).items() if k != "train/v_norm"})
    return out


def vector_metrics(vector, vector_entries: int = 64) -> dict[str, float]:
    """`train/v_norm` and `train/v/<i>` for the first `vector_entries` numbers of `vector` ([num_params]):
    how the trained numbers are logged, by `train_grpo`'s tracking and through TRL's reporters."""
    out = {"train/v_norm": float(vector.float().norm())}
    out.update({f"train/v/{i}": float(x) for i, x in enumerate(vector[:vector_entries].tolist())})
    return out


def run_config(run) -> dict:
    """What a tracker records about `run` at its start: kind, task, trained numbers, configs (flat)."""
    out = {"kind": run.kind, "task": run.task_name, "params": int(run.adapter.num_params),
           "checkpoint_dir": str(run.checkpoint_dir)}
    for prefix, cfg in (("config", run.config), ("adapter", getattr(run.adapter, "config", None))):
        if dataclasses.is_dataclass(cfg):
            for key, value in dataclasses.asdict(cfg).items():
                out[f"{prefix}/{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def tensorboard_dir(project: str, name: str, group: str | None = None, directory: str | None = None) -> Path:
    """`<directory or ./runs>/<project>/[<group>/]<name>`: where TensorBoard event files of a run go."""
    root = Path(directory if directory is not None else "runs").expanduser() / project
    return (root / group if group else root) / name


def _missing(report_to: str, package: str, err: ImportError) -> ImportError:
    return ImportError(f"report_to={report_to!r} needs the {package!r} package, which is not installed "
                       f"({err}); install it with: pip install \"tinylab[{EXTRAS[report_to]}]\" "
                       f"(or pip install {package})")


def trackio_dir(directory: str | os.PathLike | None = None) -> Path:
    """The folder trackio writes to in this process, after pointing it at `directory` when trackio is not
    imported yet (it reads TRACKIO_DIR once, at import). ValueError when trackio already writes elsewhere."""
    wanted = None if directory is None else Path(directory).expanduser().resolve()
    if wanted is not None and "trackio" not in sys.modules:
        os.environ["TRACKIO_DIR"] = str(wanted)
    try:
        import trackio.utils
    except ImportError as err:
        raise _missing("trackio", "trackio", err) from None
    actual = Path(trackio.utils.TRACKIO_DIR)
    if wanted is not None and actual.resolve() != wanted:
        raise ValueError(
            f"tracking_dir={str(directory)!r}: trackio is already imported in this process and writes to {actual} "
            f"(it reads TRACKIO_DIR once, at import; importing trl imports it); allowed: tracking_dir=None or "
            f"{str(actual)!r}, or set TRACKIO_DIR before importing trackio or trl")
    return actual


class _TrackioWriter:
    def __init__(self, project, name, group, directory, config, resume):
        self.directory = trackio_dir(directory)  # before trackio is imported
        import trackio

        self.run = trackio.init(project=project, name=name, group=group, config=config,
                                resume="allow" if resume else "never", embed=False,
                                auto_log_gpu=False, auto_log_cpu=False)
        self.project, self.name, self.id = project, self.run.name, getattr(self.run, "id", None)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def flush(self) -> None:
        pass  # trackio writes from its own thread; finish() waits for it

    def close(self) -> None:
        self.run.finish()


class _TensorBoardWriter:
    def __init__(self, project, name, group, directory, config, resume):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise _missing("tensorboard", "tensorboard", err) from None
        self.directory = tensorboard_dir(project, name, group, directory)
        self.writer = SummaryWriter(log_dir=str(self.directory))
        if not resume:
            self.writer.add_text("config", "```json\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandbWriter:
    def __init__(self, project, name, group, directory, config, resume, *, run_id=None, global_run=False):
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb", "wandb", err) from None
        if directory is not None:
            Path(directory).expanduser().mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, group=group, config=config, dir=directory,
                              id=run_id, resume="allow" if resume else None,
                              reinit="finish_previous" if global_run else "create_new")
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        self.directory, self.id, self.name = Path(self.run.dir).parent, self.run.id, name

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics)  # x-axis: train/global_step, as transformers' WandbCallback sets it

    def flush(self) -> None:
        pass  # wandb writes from its own process; finish() waits for it

    def close(self) -> None:
        self.run.finish()


_WRITERS = {"trackio": _TrackioWriter, "tensorboard": _TensorBoardWriter, "wandb": _WandbWriter}


def check_installed(report_to: str, directory: str | os.PathLike | None = None) -> None:
    """ImportError naming the extra to install when `report_to`'s package is missing (no-op for "none").

    Trackio is imported through `trackio_dir(directory)`: pointed at `directory` first, and refused
    (ValueError) when it already writes elsewhere.
    """
    check_choice("report_to", report_to, REPORT_TO)
    if report_to == "trackio":
        trackio_dir(directory)
    elif report_to != "none":
        try:
            importlib.import_module(report_to)  # the package is named as the tool: tensorboard, wandb
        except ImportError as err:
            raise _missing(report_to, report_to, err) from None


def open_tracker(report_to: str, *, project: str, name: str, group: str | None = None,
                 directory: str | None = None, config: dict | None = None, resume: bool = False, **options):
    """An open writer for one run (`.log(metrics, step)`, `.flush()`, `.close()`, `.directory`)."""
    check_installed(report_to, directory)
    if report_to == "none":
        raise ValueError("report_to='none' has no tracker; allowed: " + ", ".join(map(repr, REPORT_TO[1:])))
    return _WRITERS[report_to](project, name, group, directory, config or {}, resume, **options)


class Tracking:
    """A training-loop callback logging each StepLog to `report_to` (see the module docstring).

    `name` None: the run's checkpoint folder name (unique; a resumed run keeps it and continues
    the same Trackio run). A missing package is an ImportError here, before any step.
    """

    def __init__(self, report_to: str, *, project: str = "tinylab", name: str | None = None,
                 group: str | None = None, directory: str | os.PathLike | None = None, vector_entries: int = 64):
        check_installed(report_to, directory)  # before any step: the package, and trackio's folder
        if report_to == "none":
            raise ValueError("Tracking(report_to='none') logs nowhere; allowed: "
                             + ", ".join(map(repr, REPORT_TO[1:])))
        self.report_to, self.project, self.name, self.group = report_to, project, name, group
        self.directory = None if directory is None else os.fspath(directory)
        self.vector_entries = vector_entries
        self.writer = None
        self.run = None
        self._held = False  # inside `with`: on_end flushes, __exit__ closes
        self._wandb_id = None

    @classmethod
    def from_config(cls, config) -> Tracking:
        """The tracker a GRPOConfig/SFTConfig asks for (`report_to`, `project`, `run_name`, `run_group`,
        `tracking_dir`)."""
        return cls(config.report_to, project=config.project, name=config.run_name, group=config.run_group,
                   directory=config.tracking_dir)

    # --- callback protocol
    def on_start(self, run) -> None:
        self.run = run
        if self.writer is not None:
            return
        name = self.name or Path(run.checkpoint_dir).name
        options = {"run_id": self._wandb_id} if self.report_to == "wandb" else {}
        self.writer = open_tracker(self.report_to, project=self.project, name=name, group=self.group,
                                   directory=self.directory, config=run_config(run), resume=run.step > 0, **options)
        self._wandb_id = getattr(self.writer, "id", None) if self.report_to == "wandb" else None

    def __call__(self, entry) -> None:
        if self.writer is None:
            raise RuntimeError("Tracking got a step before on_start: pass it in callbacks=[...] of a training call")
        vector = self.run.adapter.vector() if self.run is not None else None
        self.writer.log(step_metrics(entry, vector, self.vector_entries), step=entry.step)

    def on_end(self, run) -> None:
        if self.writer is None:
            return
        if self._held:
            self.writer.flush()
        else:
            self.close()

    # --- after training
    def log_scores(self, scores: dict, step: int | None = None) -> None:
        """Log held-out scores as `eval/<name>` at `step` (default: the run's last step)."""
        if self.writer is None:
            raise RuntimeError("log_scores needs an open tracker: use `with Tracking(...) as tracker:` around "
                               "training and evaluation")
        step = step if step is not None else (self.run.step if self.run is not None else 0)
        metrics = {f"eval/{key}": float(value) for key, value in scores.items()
                   if value is not None and not math.isnan(float(value))}
        self.writer.log({"train/global_step": float(step), **metrics}, step=step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the writer (idempotent)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()

    def __enter__(self) -> Tracking:
        self._held = True
        return self

    def __exit__(self, *exc) -> None:
        self._held = False
        self.close()

    def __repr__(self) -> str:
        state = "open" if self.writer is not None else "closed"
        return f"Tracking({self.report_to!r}, project={self.project!r}, name={self.name!r}, {state})"


def attach_tracking(callbacks: list, config) -> list:
    """`callbacks` with a `Tracking` for `config.report_to` first (so it has logged a step before a later
    callback can stop the run), unless it is "none" or `callbacks` already holds a Tracking."""
    report_to = getattr(config, "report_to", "none")
    if report_to == "none" or any(isinstance(cb, Tracking) for cb in callbacks):
        return list(callbacks)
    return [Tracking.from_config(config), *callbacks]
