"""`resume`: continue a run folder (GRPO or SFT) to its configured number of steps.

It sits above the loops (it picks `tinylab.grpo` or `tinylab.sft` by the folder's kind), which sit
above the run machinery (`tinylab.run`, `tinylab.run_folder`): no module imports one above it.
The module is not called `resume` so that `tinylab.resume` stays the function.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tinylab.adapter import TinyLoRAConfig, apply_tinylora, find_adapter
from tinylab.adapter_file import base_fingerprint
from tinylab.grpo import GRPOConfig, grpo_body
from tinylab.run import Run
from tinylab.run_folder import read_state
from tinylab.sft import SFTConfig, sft_body

__all__ = ["resume"]

_LOOPS = {"grpo": (GRPOConfig, grpo_body), "sft": (SFTConfig, sft_body)}


def resume(folder: str | os.PathLike, model, tokenizer, task, *, adapter=None, callbacks: Iterable = (),
           background: bool = False) -> Run:
    """Continue a checkpointed run to its configured number of steps.

    `model` is the same base model, on any device and in the dtype it was trained in (a folder
    written next to a GPU model continues on a CPU model and back); the adapter is attached from
    the saved config (or pass the `adapter` already attached to it). Ends with the same v as an
    uninterrupted run on the same device.
    """
    folder = Path(folder).expanduser()
    meta = read_state(folder)
    if getattr(task, "name", None) != meta["task"]:
        raise ValueError(f"this run was trained on task {meta['task']!r}, not {getattr(task, 'name', task)!r}")
    if meta["kind"] not in _LOOPS:
        raise ValueError(f"{folder} holds a {meta['kind']!r} run; resume handles {sorted(_LOOPS)}")
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
    config_type, body = _LOOPS[meta["kind"]]
    config = config_type(**meta["config"])
    run = Run(meta["kind"], config, adapter, task.name, callbacks=callbacks, checkpoint_dir=folder, resuming=True)
    run.load(folder)
    run._body = lambda: body(run, model, tokenizer, adapter, task, config)
    return run.start() if background else run.train()
