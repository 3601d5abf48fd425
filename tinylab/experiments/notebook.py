"""The set-up every tutorial notebook starts with, as one call.

    lab = tinylab.notebook_setup("cpu-demo", quick=dict(steps=2, prompts_per_step=2))
    model, tokenizer, task = lab.model, lab.tokenizer, lab.task
    N_EVAL = lab.pick(quick=12, full=129)
    run = tinylab.train_grpo(model, tokenizer, tinylab.apply_tinylora(model, lab.preset.adapter), task, lab.training)

Quick mode (`TINYLAB_QUICK=1`, what CI sets) runs the same code with fewer steps and examples:
`lab.training` is the preset's GRPO config with the `quick` overrides, `lab.pick` chooses sizes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["NotebookSetup", "notebook_setup", "quick_mode"]


def quick_mode() -> bool:
    """True when `TINYLAB_QUICK=1`: notebooks shrink their sizes, the code path stays the same."""
    return os.environ.get("TINYLAB_QUICK") == "1"


class NotebookSetup(NamedTuple):
    """What a notebook's first cells build: the preset, the model, its task and the training config."""

    quick: bool  # TINYLAB_QUICK=1: fewer steps and examples
    preset: Any  # tinylab.train.presets.Preset
    model: Any  # the preset's model (None when built with load=False)
    tokenizer: Any
    task: Any  # tinylab.tasks.get(preset.task, **preset.task_options)
    training: Any  # GRPOConfig: the preset's, with the quick overrides in quick mode

    def pick(self, *, quick, full):
        """`quick` in quick mode, else `full`."""
        return quick if self.quick else full

    def describe(self) -> str:
        """One line: the mode and the training sizes, for the notebook to print."""
        t = self.training
        return (f"quick mode: {self.quick}; preset {self.preset.name!r}: task {self.preset.task!r}, "
                f"{t.steps} steps x {t.prompts_per_step} prompts x {t.group_size} samples, lr {t.lr:g}")


def notebook_setup(preset: str = "cpu-demo", *, quick: Mapping[str, Any] | None = None,
                   full: Mapping[str, Any] | None = None, load: bool = True, **load_kwargs) -> NotebookSetup:
    """Load `preset`'s model and task, and its GRPO config with `quick` (quick mode) or `full` overrides.

    `quick` and `full` are GRPOConfig fields by name (checked by `dataclasses.replace`). `load=False`
    skips loading the model (model and tokenizer are None). `load_kwargs` go to `tinylab.load_model`.
    """
    from tinylab.model.loading import load_model
    from tinylab.tasks import get as get_task
    from tinylab.train.presets import preset as get_preset

    p = get_preset(preset)
    is_quick = quick_mode()
    overrides = dict((quick if is_quick else full) or {})
    allowed = {f.name for f in dataclasses.fields(p.training)}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown GRPOConfig field(s) {unknown} in the {'quick' if is_quick else 'full'} "
                         f"overrides; allowed: {', '.join(sorted(allowed))}")
    training = dataclasses.replace(p.training, **overrides)
    model, tokenizer = load_model(p.model, **load_kwargs) if load else (None, None)
    return NotebookSetup(is_quick, p, model, tokenizer, get_task(p.task, **p.task_options), training)
