"""tinylab: a research workbench for TinyLoRA, training a handful of scalars with RL.

The library returns data and reports through return values, callbacks and logging; plotting and
widgets live in `tinylab.widgets`.

`tinylab.evaluate` and `tinylab.compare` are functions; their module is `tinylab.evaluation`.
"""

from tinylab import tasks
from tinylab.adapter import TinyLoRA, TinyLoRAConfig, apply_tinylora
from tinylab.adapter_file import AdapterFileError, load_adapter, save_adapter
from tinylab.attribution import TokenAttribution, token_attribution
from tinylab.bank import AdapterBank
from tinylab.budget import BudgetPlan, lora_xs_size, plan_budget
from tinylab.evaluation import Comparison, EvalReport, compare, evaluate
from tinylab.grpo import GRPOConfig, train_grpo
from tinylab.heads import AttentionPatterns, HeadEffects, ablate_heads, attention_patterns, head_effects
from tinylab.importance import Importance, WeightImportance, module_importance, weight_importance
from tinylab.knobs import Attribution, NumberHeads, attribute, number_heads
from tinylab.landscape import Landscape, Sweep, sweep
from tinylab.lora_export import export_lora
from tinylab.models import load_model, tiny_model
from tinylab.notebook import NotebookSetup, notebook_setup
from tinylab.paired_stats import PairedDifference, paired
from tinylab.peft_interop import export_peft, import_peft
from tinylab.presets import Preset, preset
from tinylab.resumption import resume
from tinylab.run import NonFiniteError, Run, StepLog, StopTraining
from tinylab.sft import SFTConfig, train_sft
from tinylab.targets import DEFAULT_TARGETS, ModuleInfo, count_params, plan_modules

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterBank",
    "AdapterFileError",
    "AttentionPatterns",
    "Attribution",
    "BudgetPlan",
    "Comparison",
    "EvalReport",
    "GRPOConfig",
    "HeadEffects",
    "Importance",
    "Landscape",
    "ModuleInfo",
    "NonFiniteError",
    "NotebookSetup",
    "NumberHeads",
    "PairedDifference",
    "Preset",
    "Run",
    "SFTConfig",
    "StepLog",
    "StopTraining",
    "Sweep",
    "TinyLoRA",
    "TinyLoRAConfig",
    "TokenAttribution",
    "WeightImportance",
    "ablate_heads",
    "apply_tinylora",
    "attention_patterns",
    "attribute",
    "compare",
    "count_params",
    "evaluate",
    "export_lora",
    "export_peft",
    "head_effects",
    "import_peft",
    "load_adapter",
    "load_model",
    "notebook_setup",
    "lora_xs_size",
    "module_importance",
    "number_heads",
    "paired",
    "plan_budget",
    "plan_modules",
    "preset",
    "resume",
    "save_adapter",
    "sweep",
    "tasks",
    "tiny_model",
    "token_attribution",
    "train_grpo",
    "train_sft",
    "weight_importance",
]
