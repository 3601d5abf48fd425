"""What every training loop shares: the StepLog record, the Run handle, stopping, checkpoints, resume.

A loop (`tinylab.grpo`, `tinylab.sft`) owns the maths of one step; a `Run` owns everything around
it: the optimizer over the adapter's fp32 vectors, the step counter, the stop flag, the progress
bar, the callbacks, `run.history`, and the checkpoint folder.

Stopping, always at a step boundary: a callback raises `StopTraining`; `run.stop()` (from another
thread or notebook cell) sets a flag read before each step; KeyboardInterrupt. On any stop, on a
NaN/inf reward, loss, gradient or vector (`NonFiniteError`), and on any exception, the folder gets
the vector, the optimizer state, the RNG states and the history before `train_*` returns or raises.
A step that did not finish is rolled back first, so a NaN never reaches v and the checkpoint is
always "k steps done". Sampling in step k depends only on (config.seed, k), so `resume` continues
exactly where an uninterrupted run would be.

Folder layout (no pickle): `state.safetensors` (v, Adam moments, torch RNG state as uint8),
`state.json` (step, status, configs, Python/NumPy RNG states, history), `adapter.tlra` (the vector
as a shareable adapter file, see `tinylab.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["NonFiniteError", "Run", "StepLog", "StopTraining", "resume"]

log = logging.getLogger(__name__)

_FORMAT = "tinylab-run/1"
_MIN_FREE_BYTES = 8 << 20  # a checkpoint is a few kB plus the history; refuse to start below 8 MiB free
_NAN = float("nan")


class StopTraining(Exception):  # noqa: N818 - reads as an instruction, like StopIteration
    """Raise from a callback to end the run cleanly after the current step."""


class NonFiniteError(FloatingPointError):
    """A reward, loss, gradient or vector became NaN/inf; the last finite state was checkpointed."""


class StepLog(NamedTuple):
    """One optimizer step, as sent to every callback and stored in `run.history`. NaN = not measured."""

    step: int  # 1-based number of steps done after this one
    kind: str  # "grpo", "sft" or "trl"
    loss: float
    reward_mean: float
    reward_std: float
    zero_spread: float  # fraction of groups whose rewards were all equal (they teach nothing)
    format_rate: float  # fraction of sampled completions the task scores as well formatted
    correct_rate: float  # fraction scored strictly correct
    completion_len: float  # mean completion length in tokens
    completion_len_max: int
    v_norm: float  # |v| after the step
    grad_norm: float  # |dL/dv| before the step
    kl: float  # mean per-token KL to the adapter-disabled model (GRPO with kl > 0)
    clip_frac: float  # fraction of tokens whose ratio was clipped (GRPO with clip)
    gen_time: float  # seconds sampling completions
    fwd_bwd_time: float  # seconds in forward + backward
    step_time: float  # seconds for the whole step
    samples: tuple = ()  # a few (completion, reward) pairs


def step_log(step: int, kind: str, **fields) -> StepLog:
    """A StepLog with NaN for every field a loop did not measure."""
    defaults = dict.fromkeys(StepLog._fields[2:], _NAN)
    defaults.update(completion_len_max=0, samples=())
    defaults.update(fields)
    return StepLog(step, kind, **defaults)


def derived_seed(*parts) -> int:
    """A 63-bit seed from (config.seed, step, purpose, ...): the same in every process."""
    import hashlib

    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_indices(pool_size: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indexes of the examples used in `step`: consecutive slices of a seeded shuffle per epoch."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, pool_size)
        order = torch.randperm(pool_size, generator=torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch)))
        out.append(int(order[i]))
    return out


def _default_dir(kind: str, task_name: str) -> Path:
    from tinylab.models import cache_dir

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return cache_dir() / "runs" / f"{kind}-{task_name}-{stamp}-{os.getpid()}"


def check_checkpoint_dir(folder: str | os.PathLike, *, allow_existing: bool = False) -> Path:
    """Create `folder` and prove a checkpoint can be written there, before any training starts."""
    folder = Path(folder).expanduser()
    if (folder / "state.json").exists() and not allow_existing:
        raise ValueError(
            f"checkpoint_dir={str(folder)!r} already holds a run; continue it with tinylab.resume({str(folder)!r}, ...) "
            "or choose another checkpoint_dir"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.")
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as err:
        raise OSError(err.errno, f"checkpoint_dir={str(folder)!r} is not writable ({err.strerror or err}); "
                                 "choose a folder you can write to") from err
    free = shutil.disk_usage(folder).free
    if free < _MIN_FREE_BYTES:
        raise OSError(28, f"checkpoint_dir={str(folder)!r} has only {free} bytes free; a run needs at least "
                          f"{_MIN_FREE_BYTES} (the disk is full?)")
    return folder


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value):
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (tuple, list)):
        return [_jsonable(x) for x in value]
    if isinstance(value, dict):
        return {k: _jsonable(x) for k, x in value.items()}
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


def _unjson_float(value) -> float:
    return _NAN if value is None else float(value)


class Run:
    """A training run: its config, progress, history, stop flag and checkpoint folder.

    Three ways to drive one from a notebook:

        run = train_grpo(...)                   # blocks; interrupt the kernel to stop cleanly
        run = train_grpo(..., background=True)  # returns at once; run.stop() from another cell
        run = train_grpo(..., start=False)      # exists before training: wire a Stop button to
        run.train()  # or run.start()           #   run.stop, then train (or continue after a stop)

    `run.stop()` may be called from any thread; the loop reads the flag before each step.
    Callbacks are callables taking a StepLog; optional methods `on_start(run)` and `on_end(run)`.
    """

    def __init__(self, kind: str, config, adapter, task_name: str, *, callbacks: Iterable = (),
                 checkpoint_dir: str | os.PathLike | None = None, resuming: bool = False):
        self.kind = kind
        self.config = config
        self.adapter = adapter
        self.task_name = task_name
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not callable(cb):
                raise TypeError(f"callback {cb!r} is not callable; a callback takes one StepLog")
        folder = checkpoint_dir if checkpoint_dir is not None else _default_dir(kind, task_name)
        self.checkpoint_dir = check_checkpoint_dir(folder, allow_existing=resuming)
        self.logs: list[StepLog] = []
        self.step = 0  # steps done
        self.status = "created"  # running / finished / stopped / interrupted / failed
        self.reason = ""
        self.error: BaseException | None = None
        self.optimizer = torch.optim.Adam(list(adapter.parameters()), lr=config.lr)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot = None
        self._bar = None
        self._body: Callable[[], None] | None = None  # the loop, set by train_grpo / train_sft / resume

    # --- public
    def stop(self) -> None:
        """Ask the loop to stop before its next step (thread-safe; returns at once)."""
        self._stop.set()

    @property
    def running(self) -> bool:
        return self.status == "running"

    def wait(self, timeout: float | None = None) -> Run:
        """Join a background run; re-raise the exception that ended it, if any."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return self
        if self.error is not None:
            raise self.error
        return self

    @property
    def history(self):
        """One row per step (a pandas DataFrame, columns = StepLog fields)."""
        import pandas as pd

        return pd.DataFrame(self.logs, columns=StepLog._fields)

    @property
    def vector(self) -> torch.Tensor:
        return self.adapter.vector()

    def __repr__(self) -> str:
        return (f"Run({self.kind} on {self.task_name}: {self.status}, step {self.step}/{self.config.steps}, "
                f"{self.adapter.num_params} params, checkpoint_dir={str(self.checkpoint_dir)!r})")

    # --- used by the loops
    def steps(self) -> Iterator[int]:
        """Step indexes still to run; snapshots the state before each and honours the stop flag."""
        while self.step < self.config.steps:
            if self._stop.is_set():
                self._end("stopped", "run.stop() was called")
                return
            self._snapshot = self._capture()
            yield self.step

    def record(self, entry: StepLog) -> None:
        """Commit a finished step: history, progress bar, periodic checkpoint, then the callbacks."""
        self.step = entry.step
        self._snapshot = None
        self.logs.append(entry)
        if self._bar is not None:
            self._bar.update(1)
            shown = {"loss": entry.loss} if entry.kind == "sft" else {"reward": entry.reward_mean}
            self._bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)
        every = self.config.checkpoint_every
        if every and self.step % every == 0:
            self.save()
        for cb in self.callbacks:
            cb(entry)

    def check_finite(self, what: str, value) -> None:
        t = torch.as_tensor(value, dtype=torch.float64)
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{what} is not finite at step {self.step + 1} ({t.flatten()[:8].tolist()}); "
                                 f"the last finite state is saved in {self.checkpoint_dir}")

    def optimizer_step(self) -> float:
        """Adam step on the adapter vectors; returns the gradient norm. Never lets NaN into v."""
        params = list(self.adapter.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        grad_norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))
        self.check_finite("the gradient", grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.check_finite("v", self.adapter.vector())
        return grad_norm

    def train(self) -> Run:
        """Run (or continue, after a stop) the training here, blocking; returns the Run.

        KeyboardInterrupt (interrupting the kernel) stops cleanly; other exceptions are raised
        after the checkpoint is written.
        """
        return self._launch(background=False)

    def start(self) -> Run:
        """Run (or continue) the training in a background thread; returns at once.

        Stop it with `run.stop()` from any cell; `run.wait()` joins and re-raises a failure.
        """
        return self._launch(background=True)

    def _launch(self, background: bool) -> Run:
        if self._body is None:
            raise RuntimeError("this Run has no training loop attached; make it with train_grpo/train_sft/resume")
        if self.running:
            raise RuntimeError("this run is already running; call run.stop() first")
        self._stop.clear()
        self.error = None
        if background:
            self.status = "running"
            self._thread = threading.Thread(target=self._guarded, args=(self._body, False), daemon=True,
                                            name=f"tinylab-{self.kind}")
            self._thread.start()
            return self
        self._guarded(self._body, True)
        return self

    # --- internals
    def _guarded(self, body, reraise: bool) -> None:
        from tqdm.auto import tqdm

        self.status = "running"
        self._bar = tqdm(total=self.config.steps, initial=self.step, desc=f"{self.kind} {self.task_name}",
                         leave=True)
        try:
            for cb in self.callbacks:
                if hasattr(cb, "on_start"):
                    cb.on_start(self)
            body()
            if self.status == "running":
                self._end("finished", f"{self.step} steps done")
        except StopTraining as err:
            self._end("stopped", str(err) or "a callback raised StopTraining")
        except KeyboardInterrupt:
            self._end("interrupted", "KeyboardInterrupt")
        except BaseException as err:
            self.error = err
            self._end("failed", f"{type(err).__name__}: {err}")
            if reraise:
                raise
        finally:
            self._bar.close()
            self._bar = None
            for cb in self.callbacks:
                if hasattr(cb, "on_end"):
                    try:
                        cb.on_end(self)
                    except Exception:  # an observer failing at the end must not hide the run's outcome
                        log.exception("callback %r failed in on_end", cb)

    def _end(self, status: str, reason: str) -> None:
        if self._snapshot is not None:  # the step in progress did not finish: roll it back
            self._restore(self._snapshot)
            self._snapshot = None
        self.status, self.reason = status, reason
        self.save()
        if status != "finished":
            log.info("%s run %s at step %d: %s (checkpoint in %s)", self.kind, status, self.step, reason,
                     self.checkpoint_dir)

    def _capture(self) -> dict:
        state = self.optimizer.state_dict()
        return {
            "v": self.adapter.vector().clone(),
            "optimizer": {k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in s.items()}
                          for k, s in state["state"].items()},
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "numpy_rng": np.random.get_state(),
        }

    def _restore(self, snap: dict) -> None:
        self.adapter.set_vector(snap["v"])
        state = self.optimizer.state_dict()
        state["state"] = snap["optimizer"]
        self.optimizer.load_state_dict(state)
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(snap["torch_rng"])
        random.setstate(snap["python_rng"])
        np.random.set_state(snap["numpy_rng"])

    def save(self) -> Path:
        """Write the checkpoint (v, Adam state, RNG states, history) atomically; returns the folder."""
        from safetensors.torch import save_file

        from tinylab.checkpoint import base_fingerprint, save_adapter

        folder = self.checkpoint_dir
        v = self.adapter.vector()
        params = list(self.adapter.parameters())
        opt = self.optimizer.state_dict()["state"]
        tensors = {"v": v.contiguous(), "rng.torch": torch.get_rng_state().contiguous()}
        adam_step = 0
        if opt:
            tensors["adam.exp_avg"] = torch.cat([opt[i]["exp_avg"].reshape(-1) for i in range(len(params))]).float()
            tensors["adam.exp_avg_sq"] = torch.cat([opt[i]["exp_avg_sq"].reshape(-1)
                                                    for i in range(len(params))]).float()
            adam_step = int(float(opt[0]["step"]))
        py_state = random.getstate()
        np_state = np.random.get_state()
        meta = {
            "format": _FORMAT,
            "kind": self.kind,
            "step": self.step,
            "status": self.status,
            "reason": self.reason,
            "task": self.task_name,
            "config_type": type(self.config).__name__,
            "config": _jsonable(dataclasses.asdict(self.config)),
            "adapter_config": _jsonable(dataclasses.asdict(self.adapter.config)),
            "base_fingerprint": base_fingerprint(self.adapter.model, self.adapter.config),
            "adam_step": adam_step,
            "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                    "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                              float(np_state[4])]},
            "saved_at": time.time(),
            "history": [_jsonable(e._asdict()) for e in self.logs],
        }
        _write_atomic(folder / "state.safetensors",
                      lambda tmp: save_file(tensors, tmp, metadata={"step": str(self.step)}))
        if torch.isfinite(v).all() and getattr(self.adapter, "source", None) in (None, "tinylab"):
            save_adapter(self.adapter, folder / "adapter.tlra")  # the shareable file (not for PEFT imports)
        _write_atomic(folder / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))
        return folder

    def load(self, folder: Path) -> dict:
        """Restore v, Adam state, RNG states and history from `folder` (written by `save`)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        meta = read_state(folder)
        with safe_open(str(folder / "state.safetensors"), "pt") as f:
            saved_step = (f.metadata() or {}).get("step")
        if saved_step != str(meta["step"]):
            raise ValueError(f"{folder}: state.safetensors (step {saved_step}) and state.json (step {meta['step']}) "
                             "disagree; the checkpoint is damaged")
        tensors = load_file(str(folder / "state.safetensors"))
        self.adapter.set_vector(tensors["v"])
        if "adam.exp_avg" in tensors:
            params = list(self.adapter.parameters())
            sizes = [p.numel() for p in params]
            avg = torch.split(tensors["adam.exp_avg"], sizes)
            avg_sq = torch.split(tensors["adam.exp_avg_sq"], sizes)
            state = self.optimizer.state_dict()
            state["state"] = {i: {"step": torch.tensor(float(meta["adam_step"])), "exp_avg": avg[i].reshape(p.shape),
                                  "exp_avg_sq": avg_sq[i].reshape(p.shape)} for i, p in enumerate(params)}
            self.optimizer.load_state_dict(state)
        torch.set_rng_state(tensors["rng.torch"])
        py = meta["rng"]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npr = meta["rng"]["numpy"]
        np.random.set_state((npr[0], np.asarray(npr[1], dtype=np.uint32), npr[2], npr[3], npr[4]))
        self.step = int(meta["step"])
        self.logs = [_log_from_json(e) for e in meta["history"]]
        return meta


def launch(kind: str, body: Callable, model, tokenizer, adapter, task, config, *, callbacks: Iterable = (),
           background: bool = False, start: bool = True) -> Run:
    """The Run for `body(run, model, tokenizer, adapter, task, config)` (train_grpo / train_sft):
    checks the adapter is attached to `model`, then trains (blocking, or in a thread with
    `background=True`), or with `start=False` returns the Run before training."""
    if not getattr(adapter, "attached", False) or adapter.model is not model:
        raise ValueError("adapter must be attached to model (adapter = apply_tinylora(model, ...))")
    run = Run(kind, config, adapter, task.name, callbacks=callbacks, checkpoint_dir=config.checkpoint_dir)
    run._body = lambda: body(run, model, tokenizer, adapter, task, config)
    if not start:
        return run
    return run.start() if background else run.train()


def _log_from_json(entry: dict) -> StepLog:
    fields = dict(entry)
    for name in StepLog._fields:
        if name not in ("step", "kind", "samples", "completion_len_max"):
            fields[name] = _unjson_float(fields.get(name))
    fields["samples"] = tuple((str(c), _unjson_float(r)) for c, r in fields.get("samples") or ())
    return StepLog(**{k: fields[k] for k in StepLog._fields})


def read_state(folder: str | os.PathLike) -> dict:
    """The JSON half of a checkpoint: step, status, configs, history (raw)."""
    folder = Path(folder).expanduser()
    path = folder / "state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no tinylab run checkpoint (state.json is missing)")
    meta = json.loads(path.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this tinylab reads {_FORMAT!r}")
    return meta


def resume(folder: str | os.PathLike, model, tokenizer, task, *, adapter=None, callbacks: Iterable = (),
           background: bool = False) -> Run:
    """Continue a checkpointed run to its configured number of steps.

    `model` is the same base model; the adapter is attached from the saved config (or pass the
    `adapter` already attached to it). Ends with the same v as an uninterrupted run.
    """
    from tinylab.adapter import TinyLoRAConfig, apply_tinylora, find_adapter
    from tinylab.checkpoint import base_fingerprint

    folder = Path(folder).expanduser()
    meta = read_state(folder)
    if getattr(task, "name", None) != meta["task"]:
        raise ValueError(f"this run was trained on task {meta['task']!r}, not {getattr(task, 'name', task)!r}")
    saved_cfg = meta["adapter_config"]
    adapter_config = TinyLoRAConfig(**{k: tuple(x) if isinstance(x, list) else x for k, x in saved_cfg.items()})
    if adapter is None and find_adapter(model):
        raise ValueError("the model already has an adapter: pass it as resume(..., adapter=adapter), "
                         "or call adapter.remove() first")
    if adapter is not None and (adapter.model is not model or adapter.config != adapter_config):
        raise ValueError(f"adapter must be attached to model with the run's config {adapter_config}")
    if adapter is not None and adapter.merged:
        adapter.unmerge()
    if base_fingerprint(model, adapter_config) != meta["base_fingerprint"]:
        raise ValueError(f"{folder} was trained on other base weights; load the model it was trained on")
    if adapter is None:
        adapter = apply_tinylora(model, adapter_config)
    if meta["kind"] == "grpo":
        from tinylab.grpo import GRPOConfig, _grpo_body

        config, body = GRPOConfig(**meta["config"]), _grpo_body
    elif meta["kind"] == "sft":
        from tinylab.sft import SFTConfig, _sft_body

        config, body = SFTConfig(**meta["config"]), _sft_body
    else:
        raise ValueError(f"{folder} holds a {meta['kind']!r} run; resume handles 'grpo' and 'sft'")
    run = Run(meta["kind"], config, adapter, task.name, callbacks=callbacks, checkpoint_dir=folder, resuming=True)
    run.load(folder)
    run._body = lambda: body(run, model, tokenizer, adapter, task, config)
    return run.start() if background else run.train()
