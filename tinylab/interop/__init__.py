"""Other tools on tinylab adapters: PEFT's TinyLoRA, standard LoRA checkpoints (vLLM), TRL's GRPOTrainer,
lm-evaluation-harness. Each imports its library only when called."""

from tinylab.interop.lora_export import export_lora
from tinylab.interop.peft_tinylora import export_peft, import_peft

__all__ = ["export_lora", "export_peft", "import_peft"]

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
