"""The TinyLoRA adapter: its config, which maps it adapts, the SVD, the adapted layer, attaching it,
its file format, the budget planner, and the bank that serves many adapters in one batch."""

from tinylab.adapter.attach import TinyLoRA, apply_tinylora, check_adapter, check_no_adapter, find_adapter
from tinylab.adapter.bank import AdapterBank
from tinylab.adapter.config import DEFAULT_TARGETS, TinyLoRAConfig
from tinylab.adapter.file_format import AdapterFileError, load_adapter, save_adapter
from tinylab.adapter.layer import TinyLoRALinear
from tinylab.adapter.planner import BudgetPlan, lora_xs_size, plan_budget
from tinylab.adapter.targets import ModuleInfo, count_params, plan_modules

__all__ = [
    "DEFAULT_TARGETS", "AdapterBank", "AdapterFileError", "BudgetPlan", "ModuleInfo", "TinyLoRA", "TinyLoRAConfig",
    "TinyLoRALinear", "apply_tinylora", "check_adapter", "check_no_adapter", "count_params", "find_adapter", "load_adapter",
    "lora_xs_size", "plan_budget", "plan_modules", "save_adapter",
]

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
