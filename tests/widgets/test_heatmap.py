"""widgets/heatmap.py on the GPU stand-in: an ImportanceHeatmap built from a model off torch's default device."""

import numpy as np
import pytest
import torch
from testkit import NumberTask
from tinylab.widgets import ImportanceHeatmap

from tinylab.analysis.importance import module_importance, weight_importance
from tinylab.model.tiny import tiny_model


def _drive(model, tok) -> ImportanceHeatmap:
    """Measure, build the map with its per-head drill-down, switch the score, pick a module, outline it."""
    imp = module_importance(model, tok, NumberTask(), n_prompts=3, objective="sft")
    wi = weight_importance(model, tok, NumberTask(), n_prompts=3, objective="sft")
    heat = ImportanceHeatmap(imp, weights=wi)
    heat.kind.value = "grad"
    heat.select(1, "o_proj")
    heat.outline([(1, "o_proj")])
    return heat


def _check_drive(heat: ImportanceHeatmap) -> None:
    z = np.array(heat.figure.data[0].z, dtype=float)  # [layers, module types]
    grad = heat.importance.table.grad
    assert z.shape == (2, 7) and not np.isnan(z).any()
    for (layer, kind), value in grad.items():
        assert z[heat.layers.index(layer), heat.kinds.index(kind)] == pytest.approx(value)
    heads = heat.weights.heads.taylor
    want = heads[(heads.index.get_level_values("layer") == 1) & (heads.index.get_level_values("module") == "o_proj")]
    bar = heat.heads_figure.data[0]
    assert list(bar.x) == [0, 1, 2, 3] and np.allclose(bar.y, want.to_numpy()) and min(bar.y) > 0
    assert heat.selected == (1, "o_proj") and len(heat.figure.layout.shapes) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heatmap_keeps_to_the_models_device(gpu_stand_in, dtype):
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    with gpu_stand_in():
        heat = _drive(model, tok)
    _check_drive(heat)
    assert heat.importance.gradients.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heatmap_on_cuda(dtype):
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    _check_drive(_drive(model.to("cuda"), tok))
