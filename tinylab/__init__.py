"""tinylab: a research workbench for TinyLoRA, training a handful of scalars with RL.

`import tinylab as tl` gives the verbs a notebook calls; everything else is reached through its
folder, one folder a layer (imports go down only, checked by import-linter in `make lint`):

    tinylab.basics       checks, seeds, atomic writes, the cache folder
    tinylab.model        loading, tiny test models, devices, batches, generation, attention modes
    tinylab.tasks        what a model is trained and judged on (prompt, reward, scores)
    tinylab.adapter      config, targets, SVD, the adapted layer, attaching, file format, planner, bank
    tinylab.measures     measurements shared by the layers above (gold log-probability, scored replies)
    tinylab.train        runs (stop, resume, folder), GRPO, SFT, presets
    tinylab.evaluation   greedy evaluation, base-vs-adapted comparison, controls, paired statistics
    tinylab.analysis     importance, token attribution, heads, the trained numbers one by one
    tinylab.interop      PEFT, LoRA export (vLLM), TRL, lm-evaluation-harness
    tinylab.experiments  the RL-vs-SFT budget sweep, notebook set-up
    tinylab.widgets      notebook components (plotly, ipywidgets); the library itself never imports them

The library returns data and reports through return values, callbacks and logging.
"""

from tinylab import adapter, analysis, basics, evaluation, experiments, interop, measures, model, tasks, train
from tinylab.adapter import (
    DEFAULT_TARGETS,
    AdapterBank,
    AdapterFileError,
    BudgetPlan,
    ModuleInfo,
    TinyLoRA,
    TinyLoRAConfig,
    apply_tinylora,
    count_params,
    load_adapter,
    lora_xs_size,
    plan_budget,
    plan_modules,
    save_adapter,
)
from tinylab.analysis import (
    AttentionPatterns,
    HeadEffects,
    HeadsByNumber,
    Importance,
    Landscape,
    NumberAttribution,
    Sweep,
    TokenAttribution,
    WeightImportance,
    ablate_heads,
    attention_patterns,
    attribute_numbers,
    head_effects,
    heads_by_number,
    landscape,
    module_importance,
    sweep_number,
    token_attribution,
    weight_importance,
)
from tinylab.evaluation import Comparison, EvalReport, PairedDifference, compare, evaluate, paired
from tinylab.experiments import NotebookSetup, budget_sweep, notebook_setup
from tinylab.interop import export_lora, export_peft, import_peft
from tinylab.model import load_model, tiny_model
from tinylab.train import (
    GRPOConfig,
    NonFiniteError,
    Preset,
    Run,
    SFTConfig,
    StepLog,
    StopTraining,
    preset,
    resume,
    train_grpo,
    train_sft,
)

__all__ = [
    "DEFAULT_TARGETS",
    "AdapterBank",
    "AdapterFileError",
    "AttentionPatterns",
    "BudgetPlan",
    "Comparison",
    "EvalReport",
    "GRPOConfig",
    "HeadEffects",
    "HeadsByNumber",
    "Importance",
    "Landscape",
    "ModuleInfo",
    "NonFiniteError",
    "NotebookSetup",
    "NumberAttribution",
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
    "adapter",
    "analysis",
    "apply_tinylora",
    "attention_patterns",
    "attribute_numbers",
    "basics",
    "budget_sweep",
    "compare",
    "count_params",
    "evaluate",
    "evaluation",
    "experiments",
    "export_lora",
    "export_peft",
    "head_effects",
    "heads_by_number",
    "import_peft",
    "interop",
    "landscape",
    "load_adapter",
    "load_model",
    "lora_xs_size",
    "measures",
    "model",
    "module_importance",
    "notebook_setup",
    "paired",
    "plan_budget",
    "plan_modules",
    "preset",
    "resume",
    "save_adapter",
    "sweep_number",
    "tasks",
    "tiny_model",
    "token_attribution",
    "train",
    "train_grpo",
    "train_sft",
    "weight_importance",
]

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
