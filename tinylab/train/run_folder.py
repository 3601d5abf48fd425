"""A training run's folder on disk: proving it writable, writing it atomically, reading it back.

This is the RUN checkpoint (everything needed to continue training); the adapter file format, the
shareable `adapter.tlra` a run folder also holds, is `tinylab.adapter.file_format`.

Layout (no pickle): `state.safetensors` (v, Adam moments, torch's CPU RNG state as uint8),
`state.json` (step, status, configs, Python/NumPy RNG states, history), `adapter.tlra`.
Tensors are written from the CPU and read onto the CPU, then moved to the device of the adapter
they are loaded into, so a folder written next to a GPU model continues on a CPU model and back.
Only the CPU RNG state is kept: sampling draws from its own seeded CPU generator (`tinylab.model.generation`),
so nothing tinylab does depends on a GPU's RNG (a model with active dropout on a GPU would).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tinylab.adapter.file_format import base_fingerprint, save_adapter
from tinylab.basics.atomic import writable_folder, write_atomic

__all__ = ["check_checkpoint_dir", "default_dir", "load_run_folder", "read_state", "save_run_folder"]

_FORMAT = "tinylab-run/1"
_MIN_FREE_BYTES = 8 << 20  # a checkpoint is a few kB plus the history; refuse to start below 8 MiB free
_NAN = float("nan")


def default_dir(kind: str, task_name: str) -> Path:
    """A new, empty folder under the tinylab cache, made here: `runs/<kind>-<task>-<time>-<pid>`, with
    `-2`, `-3`, ... when a run of this process started in the same second."""
    from tinylab.basics.cache import cache_dir

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = cache_dir() / "runs" / f"{kind}-{task_name}-{stamp}-{os.getpid()}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in itertools.count(1):
        folder = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            folder.mkdir()  # atomic: two runs (threads too) never get the same folder
            return folder
        except FileExistsError:
            continue


def check_checkpoint_dir(folder: str | os.PathLike, *, allow_existing: bool = False) -> Path:
    """Create `folder` and prove a checkpoint can be written there, before any training starts."""
    folder = Path(folder).expanduser()
    if (folder / "state.json").exists() and not allow_existing:
        raise ValueError(
            f"checkpoint_dir={str(folder)!r} already holds a run; continue it with tinylab.resume({str(folder)!r}, ...) "
            "or choose another checkpoint_dir"
        )
    writable_folder(folder, "checkpoint_dir")
    free = shutil.disk_usage(folder).free
    if free < _MIN_FREE_BYTES:
        raise OSError(28, f"checkpoint_dir={str(folder)!r} has only {free} bytes free; a run needs at least "
                          f"{_MIN_FREE_BYTES} (the disk is full?)")
    return folder


def jsonable(value):
    """`value` with NaN as null and inf as "inf"/"-inf", tuples as lists, NumPy scalars as Python ones."""
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (tuple, list)):
        return [jsonable(x) for x in value]
    if isinstance(value, dict):
        return {k: jsonable(x) for k, x in value.items()}
    if isinstance(value, (np.floating, np.integer)):
        return jsonable(value.item())
    return value


def unjson_float(value) -> float:
    """The inverse of `jsonable` for one float (null -> NaN)."""
    return _NAN if value is None else float(value)


def _adam_tensors(optimizer: torch.optim.Optimizer, params: list) -> tuple[dict, int]:
    """Adam's moments as two flat fp32 CPU vectors (params in order) and its step count. A vector
    that never had a gradient (its modules never ran, e.g. a vision tower's on text) has no state
    in Adam: its moments are zeros, as Adam would start them."""
    state = optimizer.state_dict()["state"]
    if not state:
        return {}, 0
    moments = {f"adam.{key}": torch.cat([state[i][key].detach().reshape(-1).float().cpu() if i in state
                                         else torch.zeros(p.numel(), device="cpu")
                                         for i, p in enumerate(params)])  # [num_params]
               for key in ("exp_avg", "exp_avg_sq")}
    return moments, int(float(next(iter(state.values()))["step"]))


def save_run_folder(folder: Path, adapter, optimizer: torch.optim.Optimizer, meta: dict) -> Path:
    """Write `adapter`'s v, `optimizer`'s Adam state, the RNG states and `meta` (step, status, configs,
    history, as plain data) into `folder`, each file atomically; returns the folder."""
    from safetensors.torch import save_file

    v = adapter.vector().cpu()  # [num_params] fp32
    params = list(adapter.parameters())
    moments, adam_step = _adam_tensors(optimizer, params)
    tensors = {"v": v.contiguous(), "rng.torch": torch.get_rng_state().contiguous(), **moments}
    py_state = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "format": _FORMAT,
        **meta,
        "config": jsonable(meta["config"]),
        "adapter_config": jsonable(dataclasses.asdict(adapter.config)),
        "base_fingerprint": base_fingerprint(adapter.model, adapter.config),
        "adam_step": adam_step,
        "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]},
        "saved_at": time.time(),
        "history": jsonable(meta["history"]),
    }
    write_atomic(folder / "state.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"step": str(meta["step"])}))
    if torch.isfinite(v).all() and getattr(adapter, "source", None) in (None, "tinylab"):
        save_adapter(adapter, folder / "adapter.tlra")  # the shareable file (not for PEFT imports)
    write_atomic(folder / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))
    return folder


def load_run_folder(folder: Path, adapter, optimizer: torch.optim.Optimizer) -> dict:
    """Put the saved v and Adam state into `adapter` / `optimizer` (on their device) and restore the
    RNG states; returns the JSON half (`read_state`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    meta = read_state(folder)
    with safe_open(str(folder / "state.safetensors"), "pt") as f:
        saved_step = (f.metadata() or {}).get("step")
    if saved_step != str(meta["step"]):
        raise ValueError(f"{folder}: state.safetensors (step {saved_step}) and state.json (step {meta['step']}) "
                         "disagree; the checkpoint is damaged")
    tensors = load_file(str(folder / "state.safetensors"), device="cpu")
    params = list(adapter.parameters())
    adapter.set_vector(tensors["v"])  # copied into each vector on its own device
    if "adam.exp_avg" in tensors:
        sizes = [p.numel() for p in params]
        avg = torch.split(tensors["adam.exp_avg"], sizes)
        avg_sq = torch.split(tensors["adam.exp_avg_sq"], sizes)
        state = optimizer.state_dict()
        state["state"] = {
            i: {"step": torch.tensor(float(meta["adam_step"]), device="cpu"),  # Adam keeps its step count on the CPU
                "exp_avg": avg[i].reshape(p.shape).to(p.device, torch.float32),
                "exp_avg_sq": avg_sq[i].reshape(p.shape).to(p.device, torch.float32)}
            for i, p in enumerate(params)}
        optimizer.load_state_dict(state)
    torch.set_rng_state(tensors["rng.torch"])
    py = meta["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npr = meta["rng"]["numpy"]
    np.random.set_state((npr[0], np.asarray(npr[1], dtype=np.uint32), npr[2], npr[3], npr[4]))
    return meta


def read_state(folder: str | os.PathLike) -> dict:
    """The JSON half of a run folder: step, status, configs, history (raw)."""
    folder = Path(folder).expanduser()
    path = folder / "state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no tinylab run checkpoint (state.json is missing)")
    meta = json.loads(path.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this tinylab reads {_FORMAT!r}")
    return meta
