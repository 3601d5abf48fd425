"""Looking inside: where a budget should go (importance), which tokens matter (token attribution),
which heads an adapter switches (heads, ablation, attention patterns), and what each trained number does (knobs, landscapes)."""

from tinylab.analysis.heads import HeadEffects, ablate_heads, head_effects
from tinylab.analysis.importance import Importance, WeightImportance, module_importance, weight_importance
from tinylab.analysis.knobs import HeadsByNumber, NumberAttribution, attribute_numbers, heads_by_number
from tinylab.analysis.landscapes import Landscape, Sweep, landscape, sweep_number
from tinylab.analysis.patterns import AttentionPatterns, attention_patterns
from tinylab.analysis.token_attribution import TokenAttribution, token_attribution

__all__ = [
    "AttentionPatterns", "HeadEffects", "Importance", "Landscape", "NumberAttribution", "HeadsByNumber", "Sweep",
    "TokenAttribution", "WeightImportance", "ablate_heads", "attention_patterns", "attribute_numbers",
    "head_effects", "landscape", "module_importance", "heads_by_number", "sweep_number", "token_attribution",
    "weight_importance",
]

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
