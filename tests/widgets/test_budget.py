"""ImportanceHeatmap and BudgetSlider driven headlessly (ipywidgets' dummy comm, no kernel)."""

import types

import numpy as np
import pytest
import torch
from testkit import NumberTask
from tinylab.widgets import BudgetSlider, ImportanceHeatmap

from tinylab.adapter.attach import apply_tinylora
from tinylab.adapter.layer import TinyLoRALinear
from tinylab.adapter.planner import plan_budget
from tinylab.analysis.importance import module_importance, weight_importance
from tinylab.model.tiny import tiny_model


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("llama", seed=0)
    imp = module_importance(model, tok, NumberTask(), n_prompts=3, objective="sft")
    wi = weight_importance(model, tok, NumberTask(), n_prompts=3, objective="sft")
    return model, tok, imp, wi


def _logits(model, tok):
    with torch.no_grad():
        return model(**tok(["Say 3:"], return_tensors="pt")).logits


def test_heatmap_shows_the_chosen_score_with_its_spread(setup):
    _, _, imp, wi = setup
    heat = ImportanceHeatmap(imp, weights=wi)
    trace = heat.figure.data[0]
    assert np.asarray(trace.z).shape == (2, 7)
    assert np.asarray(trace.z)[1, 3] == pytest.approx(imp.table.fisher[(1, "o_proj")])
    assert "fisher" in trace.hovertemplate and " ± " in trace.customdata[1][3][1]
    heat.kind.value = "grad"
    trace = heat.figure.data[0]
    assert np.asarray(trace.z)[0, 2] == pytest.approx(imp.table.grad[(0, "v_proj")])
    assert "grad" in trace.hovertemplate and trace.customdata[0][2][0] == "v_proj"
    with pytest.raises(ValueError, match="kind='taylor'"):
        ImportanceHeatmap(imp, kind="taylor")


def test_heatmap_drills_down_into_heads(setup):
    _, _, imp, wi = setup
    heat = ImportanceHeatmap(imp, weights=wi)
    heat._clicked(None, types.SimpleNamespace(point_inds=[(1, 0)]), None)  # what a click on (layer 1, q) sends
    assert heat.selected == (1, "q_proj")
    bars = heat.heads_figure.data[0]
    assert list(bars.x) == [0, 1, 2, 3]
    assert sum(bars.y) == pytest.approx(wi.table.taylor[(1, "q_proj")])
    heat.select(0, "k_proj")
    assert len(heat.heads_figure.data[0].x) == 2  # GQA: 2 KV heads
    heat.select(0, "up_proj")
    assert len(heat.heads_figure.data[0].x) == 0 and "no heads" in heat.heads_figure.layout.title.text
    weights_map = ImportanceHeatmap(wi)
    assert weights_map.kind.value == "taylor"
    with pytest.raises(ValueError, match="not in the map"):
        heat.select(5, "q_proj")


def test_slider_readout_outlines_and_apply(setup):
    model, tok, _, _ = setup
    before = _logits(model, tok)
    seen = []
    slider = BudgetSlider(model, on_apply=seen.append)
    assert slider.strategy.options == ("tiled",)
    slider.slider.value = 13
    assert slider.n_params == 13 and slider.plan.achieved == 13
    text = slider.readout.value
    assert "<b>13</b> params (exact)" in text and "26 B bf16" in text and "52 B fp32" in text
    assert len(slider.outlined) == 14  # tiled adapts every module
    adapter = slider.apply()
    assert adapter.num_params == 13 and seen == [adapter]
    slider.slider.value = 5
    assert "<b>5</b> params" in slider.readout.value
    slider.apply_button.click()
    assert not adapter.attached  # the previous adapter was removed
    assert slider.adapter.num_params == 5
    assert sum(isinstance(m, TinyLoRALinear) for m in model.modules()) == 14
    assert "attached 5 params" in slider.status.value
    grid = np.asarray(slider.figure.data[0].z)
    assert sorted(set(grid.ravel().tolist())) == [0, 1, 2, 3, 4]  # the map shows each module's vector
    slider.slider.value = 10_000
    assert slider.n_params == 56  # clamped to the LoRA-XS size, 14 x 4
    slider.adapter.remove()
    assert torch.equal(before, _logits(model, tok))


def test_slider_with_importance_outlines_the_top_modules(setup):
    model, _, imp, _ = setup
    slider = BudgetSlider(model, imp, n_params=1, strategy="top")
    top = tuple(imp.ranked("fisher").index[0])
    assert slider.outlined == [top]
    assert len(slider.heatmap.figure.layout.shapes) == 1
    adapter = slider.apply()
    try:
        assert adapter.num_params == 1 and [(m.layer, m.kind) for m in adapter.modules] == [top]
    finally:
        adapter.remove()
    slider.strategy.value = "proportional"
    slider.slider.value = 4
    assert slider.plan.achieved == 4 and len(slider.outlined) == 14
    adapter = slider.apply()
    try:
        assert adapter.num_params == 4 and adapter.num_groups == 4
    finally:
        adapter.remove()


def test_slider_plans_with_weight_importance_as_the_planner_does(setup):
    """A WeightImportance ranks modules by its summed Taylor score, in the slider and in plan_budget."""
    model, _, _, wi = setup
    slider = BudgetSlider(model, wi, n_params=2, strategy="top")
    top = list(wi.scores().sort_values(ascending=False).index[:2])
    assert sorted(slider.outlined) == sorted(top)
    assert slider.plan == plan_budget(model, 2, importance=wi, strategy="top")
    slider.strategy.value = "proportional"
    assert slider.plan.achieved == 2


def test_slider_leaves_a_foreign_adapter_alone(setup):
    model, _, _, _ = setup
    foreign = apply_tinylora(model, n_tie="all")
    try:
        slider = BudgetSlider(model)
        assert slider.apply() is None and "did not attach" in slider.status.value
        assert foreign.attached
    finally:
        foreign.remove()
    with pytest.raises(ValueError, match="top and proportional need an importance"):
        BudgetSlider(model, strategy="top")
    with pytest.raises(ValueError, match=r"allowed 1\.\.56"):
        BudgetSlider(model, n_params=57)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slider_plans_and_attaches_on_the_models_device(gpu_stand_in, dtype):
    """The slider's importance, plan and attach with the model off torch's default device (the GPU stand-in)."""
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    with gpu_stand_in():
        imp = module_importance(model, tok, NumberTask(), n_prompts=2, objective="sft")
        slider = BudgetSlider(model, imp, n_params=3, strategy="top")
        adapter = slider.apply()
        try:
            assert adapter.num_params == 3 and slider.plan.achieved == 3
            assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in adapter.vectors)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([[1, 5, 9]], device="cpu")).logits
            assert logits.device.type == "cpu" and logits.dtype == dtype
        finally:
            adapter.remove()
