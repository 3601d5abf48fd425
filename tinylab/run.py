"""What every training loop shares: the StepLog record, the Run handle and its lifecycle, stopping.

A loop (`tinylab.grpo`, `tinylab.sft`) owns the maths of one step; a `Run` owns everything around
it: the optimizer over the adapter's fp32 vectors, the step counter, the stop flag, the progress
bar, the callbacks and `run.history`. Its folder on disk is `tinylab.run_folder`; continuing a
saved run is `tinylab.resumption.resume`.

Stopping, always at a step boundary: a callback raises `StopTraining`; `run.stop()` (from another
thread or notebook cell) sets a flag read before each step; KeyboardInterrupt. On any stop, on a
NaN/inf reward, loss, gradient or vector (`NonFiniteError`), and on any exception, the folder gets
the vector, the optimizer state, the RNG states and the history before `train_*` returns or raises.
A step that did not finish is rolled back first, so a NaN never reaches v and the checkpoint is
always "k steps done". Sampling in step k depends only on (config.seed, k), so `resume` continues
exactly where an uninterrupted run would be. A vector that is already NaN/inf is refused before
the first step (`ValueError`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tinylab.run_folder import (
    check_checkpoint_dir,
    default_dir,
    load_run_folder,
    save_run_folder,
    unjson_float,
)
from tinylab.seeds import generator

__all__ = ["NonFiniteError", "Run", "StepLog", "StopTraining", "launch", "step_indices", "step_log"]

log = logging.getLogger(__name__)

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


def _log_from_json(entry: dict) -> StepLog:
    fields = dict(entry)
    for name in StepLog._fields:
        if name not in ("step", "kind", "samples", "completion_len_max"):
            fields[name] = unjson_float(fields.get(name))
    fields["samples"] = tuple((str(c), unjson_float(r)) for c, r in fields.get("samples") or ())
    return StepLog(**{k: fields[k] for k in StepLog._fields})


def step_indices(pool_size: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indexes of the examples used in `step`: consecutive slices of a seeded shuffle per epoch."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, pool_size)
        order = torch.randperm(pool_size, generator=generator(seed, "epoch", epoch), device="cpu")  # [pool]
        out.append(int(order[i]))
    return out


def check_vector_finite(adapter) -> None:
    """ValueError before training when the adapter's vector already holds NaN/inf (e.g. set by hand)."""
    v = adapter.vector()  # [num_params] fp32 on the CPU
    bad = ~torch.isfinite(v)  # [num_params]
    if bad.any():
        where = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"the adapter's vector v is not finite: {int(bad.sum())} of {v.numel()} entries are NaN/inf "
            f"(at {where}: {v[where].tolist()}); training would sample from NaN probabilities. "
            "Set finite values first, e.g. adapter.set_vector(torch.zeros(adapter.num_params))"
        )


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
        folder = checkpoint_dir if checkpoint_dir is not None else default_dir(kind, task_name)
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
        self._body: Callable[[], None] | None = None  # the loop, set by `launch` / `resume`

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

    def save(self) -> Path:
        """Write the checkpoint (v, Adam state, RNG states, history) atomically; returns the folder."""
        meta = {"kind": self.kind, "step": self.step, "status": self.status, "reason": self.reason,
                "task": self.task_name, "config_type": type(self.config).__name__,
                "config": dataclasses.asdict(self.config), "history": [e._asdict() for e in self.logs]}
        return save_run_folder(self.checkpoint_dir, self.adapter, self.optimizer, meta)

    def load(self, folder: Path) -> dict:
        """Restore v, Adam state, RNG states, step and history from `folder` (written by `save`)."""
        meta = load_run_folder(folder, self.adapter, self.optimizer)
        self.step = int(meta["step"])
        self.logs = [_log_from_json(e) for e in meta["history"]]
        return meta

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
        """NonFiniteError naming `what` when a number or tensor (on any device) holds NaN/inf."""
        t = value.detach() if torch.is_tensor(value) else torch.tensor(value, dtype=torch.float64, device="cpu")
        if not bool(torch.isfinite(t).all()):
            shown = t.flatten()[:8].float().cpu().tolist()
            raise NonFiniteError(f"{what} is not finite at step {self.step + 1} ({shown}); "
                                 f"the last finite state is saved in {self.checkpoint_dir}")

    def optimizer_step(self) -> float:
        """Adam step on the adapter vectors; returns the gradient norm. Never lets NaN into v."""
        params = list(self.adapter.parameters())
        norms = [float(torch.linalg.vector_norm(p.grad.float())) for p in params if p.grad is not None]
        grad_norm = math.sqrt(sum(n * n for n in norms))  # vectors may sit on several devices (device_map)
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
        check_vector_finite(self.adapter)
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


def launch(kind: str, body: Callable, model, tokenizer, adapter, task, config, *, callbacks: Iterable = (),
           background: bool = False, start: bool = True) -> Run:
    """The Run for `body(run, model, tokenizer, adapter, task, config)` (train_grpo / train_sft):
    checks the adapter is attached to `model` and its vector is finite, then trains (blocking, or
    in a thread with `background=True`), or with `start=False` returns the Run before training."""
    if not getattr(adapter, "attached", False) or adapter.model is not model:
        raise ValueError("adapter must be attached to model (adapter = apply_tinylora(model, ...))")
    check_vector_finite(adapter)
    run = Run(kind, config, adapter, task.name, callbacks=callbacks, checkpoint_dir=config.checkpoint_dir)
    run._body = lambda: body(run, model, tokenizer, adapter, task, config)
    if not start:
        return run
    return run.start() if background else run.train()
