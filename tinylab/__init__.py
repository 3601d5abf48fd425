"""tinylab: a research workbench for TinyLoRA, training a handful of scalars with RL.

The library returns data and reports through return values, callbacks and logging; plotting and
widgets live in `tinylab.widgets`.
"""

from tinylab.adapter import (
    DEFAULT_TARGETS,
    ModuleInfo,
    TinyLoRA,
    TinyLoRAConfig,
    apply_tinylora,
    count_params,
    plan_modules,
)
from tinylab.checkpoint import AdapterFileError, load_adapter, save_adapter
from tinylab.models import load_model, tiny_model

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterFileError",
    "ModuleInfo",
    "TinyLoRA",
    "TinyLoRAConfig",
    "apply_tinylora",
    "count_params",
    "load_adapter",
    "load_model",
    "plan_modules",
    "save_adapter",
    "tiny_model",
]
