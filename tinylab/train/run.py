"""What every training loop shares: the StepLog record, the Run handle and its lifecycle, stopping.

A loop (`tinylab.train.grpo`, `tinylab.train.sft`) owns the maths of one step; a `Run` owns everything around
it: the optimizer over the adapter's fp32 vectors, the step counter, the stop flag, the progress
bar, the callbacks and `run.history`. Its folder on disk is `tinylab.train.run_folder`; continuing a
saved run is `Run.resume` (`tinylab.resume`).

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

from tinylab import tasks
from tinylab.adapter.attach import apply_tinylora, check_adapter, check_no_adapter
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.file_format import base_fingerprint
from tinylab.basics.seeds import generator
from tinylab.train.records import NonFiniteError, StepLog, StopTraining, log_from_json
from tinylab.train.run_folder import (
    check_checkpoint_dir,
    default_dir,
    load_run_folder,
    read_state,
    save_run_folder,
)
from tinylab.train.tracking import attach_tracking

__all__ = ["LOOPS", "Loop", "Run", "launch", "register_loop", "step_indices"]

log = logging.getLogger(__name__)


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


class Loop(NamedTuple):
    """A training loop `Run.resume` can continue: its config type and its body."""

    config_type: type  # GRPOConfig, SFTConfig
    body: Callable  # body(run, model, tokenizer, adapter, task, config): runs the remaining steps


LOOPS: dict[str, Loop] = {}
"""Run kind -> its loop; `tinylab.train.grpo` and `tinylab.train.sft` register themselves."""


def register_loop(kind: str, config_type: type, body: Callable) -> None:
    """Make runs of `kind` resumable: `Run.resume` continues them with `body`."""
    LOOPS[kind] = Loop(config_type, body)


class Run:
    """A training run: its config, progress, history, stop flag and checkpoint folder.

    Three ways to drive one from a notebook:

        run = train_grpo(...)                   # blocks; interrupt the kernel to stop cleanly
        run = train_grpo(..., background=True)  # returns at once; run.stop() from another cell
        run = train_grpo(..., start=False)      # exists before training: wire a Stop button to
        run.train()  # or run.start()           #   run.stop, then train (or continue after a stop)

    `run.stop()` may be called from any thread; the loop reads the flag before each step.
    Callbacks are callables taking a StepLog; optional methods `on_start(run)` and `on_end(run)`.
    With `config.report_to` other than "none", a `tinylab.train.tracking.Tracking` is the first callback.
    """

    def __init__(self, kind: str, config, adapter, task_name: str, *, body: Callable[[Run], None] | None = None,
                 callbacks: Iterable = (), checkpoint_dir: str | os.PathLike | None = None, resuming: bool = False):
        self.kind = kind
        self.config = config
        self.adapter = adapter
        self.task_name = task_name
        self.callbacks = attach_tracking(list(callbacks), config)  # config.report_to: Trackio, TensorBoard, W&B
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
        self._body = body  # body(run): the loop's steps (`launch`, `Run.resume`)

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
        self.logs = [log_from_json(e) for e in meta["history"]]
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
            self._thread = threading.Thread(target=self._guarded, args=(False,), daemon=True,
                                            name=f"tinylab-{self.kind}")
            self._thread.start()
            return self
        self._guarded(True)
        return self

    @classmethod
    def resume(cls, folder: str | os.PathLike, model, tokenizer, task, *, adapter=None, callbacks: Iterable = (),
               background: bool = False) -> Run:
        """Continue a checkpointed run (GRPO or SFT) to its configured number of steps.

        `model` is the same base model, on any device and in the dtype it was trained in (a folder
        written next to a GPU model continues on a CPU model and back); the adapter is attached from
        the saved config (or pass the `adapter` already attached to it). `task` is the run's task, by
        name or object. Ends with the same v as an uninterrupted run on the same device.
        """
        folder = Path(folder).expanduser()
        meta = read_state(folder)
        task = tasks.resolve(task)
        if task.name != meta["task"]:
            raise ValueError(f"this run was trained on task {meta['task']!r}, not {task.name!r}")
        if meta["kind"] not in LOOPS:
            raise ValueError(f"{folder} holds a {meta['kind']!r} run; resume handles {sorted(LOOPS)}")
        saved_cfg = meta["adapter_config"]
        adapter_config = TinyLoRAConfig(**{k: tuple(x) if isinstance(x, list) else x for k, x in saved_cfg.items()})
        if adapter is None:
            check_no_adapter(model, instead="pass it as resume(..., adapter=adapter)")
        if adapter is not None:
            check_adapter(adapter, model)
            if adapter.config != adapter_config:
                raise ValueError(f"adapter has config {adapter.config}; this run was trained with {adapter_config}")
            if adapter.merged:
                adapter.unmerge()
        if base_fingerprint(model, adapter_config) != meta["base_fingerprint"]:
            raise ValueError(f"{folder} was trained on other base weights; load the model it was trained on")
        if adapter is None:
            adapter = apply_tinylora(model, adapter_config)
        loop = LOOPS[meta["kind"]]
        config = loop.config_type(**meta["config"])
        run = cls(meta["kind"], config, adapter, task.name, callbacks=callbacks, checkpoint_dir=folder,
                  resuming=True, body=lambda run: loop.body(run, model, tokenizer, adapter, task, config))
        run.load(folder)
        return run.start() if background else run.train()

    # --- internals
    def _guarded(self, reraise: bool) -> None:
        from tqdm.auto import tqdm

        self.status = "running"
        self._bar = tqdm(total=self.config.steps, initial=self.step, desc=f"{self.kind} {self.task_name}",
                         leave=True)
        try:
            for cb in self.callbacks:
                if hasattr(cb, "on_start"):
                    cb.on_start(self)
            self._body(self)
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
    check_adapter(adapter, model)
    task = tasks.resolve(task)
    check_vector_finite(adapter)
    run = Run(kind, config, adapter, task.name, callbacks=callbacks, checkpoint_dir=config.checkpoint_dir,
              body=lambda run: body(run, model, tokenizer, adapter, task, config))
    if not start:
        return run
    return run.start() if background else run.train()
