"""widgets/heads.py driven without a browser: select(), the dropdowns and a simulated click."""

import numpy as np
import pytest
import torch
from plotly.callbacks import Points
from testkit import planted_head
from tinylab.widgets.heads import HeadInspector

from tinylab.analysis.heads import head_effects
from tinylab.analysis.patterns import attention_patterns

PROMPTS = ["The cat sat on the mat and the cat", [{"role": "user", "content": "What is 2 + 3?"}]]
ANSWERS = [" slept", "5"]


@pytest.fixture(scope="module")
def inspector():
    model, tokenizer, adapter = planted_head()
    effects = head_effects(model, tokenizer, adapter, PROMPTS, answers=ANSWERS, confirm=2)
    return HeadInspector(effects, model, tokenizer, adapter, PROMPTS)


def test_heatmap_shows_the_chosen_evidence(inspector):
    table = inspector.effects.table
    z = np.array(inspector.heatmap.data[0].z, dtype=float)
    assert z.shape == (2, 4)
    assert z[1, 2] == pytest.approx(table.loc[(1, 2), "weight"]) and z[1, 2] > 0
    assert np.nanargmax(z) == 1 * 4 + 2
    inspector.evidence.value = "ablation"
    z = np.array(inspector.heatmap.data[0].z, dtype=float)
    assert z[1, 2] == pytest.approx(table.loc[(1, 2), "ablation"])
    assert np.isnan(z).sum() == 6  # only 2 heads were confirmed by ablation
    assert inspector.heatmap.data[0].zmid == 0  # signed measure: diverging scale
    assert inspector.heatmap.layout.title.text == "ablation"
    inspector.evidence.value = "weight"


def test_select_shows_base_and_adapted_patterns_with_tokens(inspector):
    inspector.select(1, 2)
    want = attention_patterns(inspector.model, inspector.tokenizer, PROMPTS[0], 1, 2, inspector.adapter)
    base, adapted = (np.array(t.z, dtype=float) for t in inspector.pattern_figure.data)
    assert np.allclose(base, want.base.numpy()) and np.allclose(adapted, want.adapted.numpy())
    assert not np.allclose(base, adapted)  # the planted head moved
    axis = inspector.pattern_figure.layout.xaxis
    assert list(axis.ticktext) == [repr(t)[1:-1] for t in want.tokens]
    assert list(inspector.pattern_figure.layout.xaxis2.ticktext) == list(axis.ticktext)
    assert "layer 1, head 2" in inspector.numbers.value
    assert f"{inspector.effects.table.loc[(1, 2), 'weight']:.4g}" in inspector.numbers.value


def test_prompt_dropdown_and_click_redraw_the_selected_head(inspector):
    inspector.select(1, 2)
    n_first = len(inspector.pattern_figure.layout.xaxis.ticktext)
    inspector.prompt.value = 1
    chat = attention_patterns(inspector.model, inspector.tokenizer, PROMPTS[1], 1, 2, inspector.adapter)
    assert len(inspector.pattern_figure.layout.xaxis.ticktext) == len(chat.tokens) != n_first
    trace = inspector.heatmap.data[0]
    inspector._clicked(trace, Points(point_inds=[(0, 3)], xs=[3], ys=[0], trace_index=0), None)
    assert inspector.selected == (0, 3)
    base, adapted = (np.array(t.z, dtype=float) for t in inspector.pattern_figure.data)
    assert np.allclose(base, adapted)  # an untouched head in the first layer
    assert "layer 0, head 3" in inspector.numbers.value
    inspector.prompt.value = 0


def test_bad_selection_and_evidence_are_rejected(inspector):
    with pytest.raises(ValueError, match="layers 0..1, heads 0..3"):
        inspector.select(5, 0)
    with pytest.raises(ValueError, match="evidence='nope'"):
        HeadInspector(inspector.effects, inspector.model, inspector.tokenizer, inspector.adapter, PROMPTS,
                      evidence="nope")


def _drive(model, tokenizer, adapter) -> HeadInspector:
    """Build an inspector and use it as a reader would: another measure, a head, another prompt."""
    effects = head_effects(model, tokenizer, adapter, PROMPTS, answers=ANSWERS, confirm=1)
    inspector = HeadInspector(effects, model, tokenizer, adapter, PROMPTS, evidence="js")
    inspector.select(1, 2)
    inspector.prompt.value = 1
    return inspector


def _check_drive(inspector: HeadInspector) -> None:
    z = np.array(inspector.heatmap.data[0].z, dtype=float)  # [layers, heads]
    assert np.nanargmax(z) == 1 * 4 + 2 and z[1, 2] == pytest.approx(inspector.effects.table.loc[(1, 2), "js"])
    want = attention_patterns(inspector.model, inspector.tokenizer, PROMPTS[1], 1, 2, inspector.adapter)
    base, adapted = (np.array(t.z, dtype=float) for t in inspector.pattern_figure.data)
    assert np.array_equal(base, want.base.numpy()) and np.array_equal(adapted, want.adapted.numpy())
    assert not np.allclose(base, adapted)
    assert list(inspector.pattern_figure.layout.xaxis.ticktext) == [repr(t)[1:-1] for t in want.tokens]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inspector_keeps_to_the_models_device(gpu_stand_in, dtype):
    """Built and driven with torch's default device elsewhere than the model (meta)."""
    model, tokenizer, adapter = planted_head(dtype=dtype)
    with gpu_stand_in():
        inspector = _drive(model, tokenizer, adapter)
    _check_drive(inspector)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inspector_on_cuda(dtype):
    model, tokenizer, adapter = planted_head(dtype=dtype)
    _check_drive(_drive(model.to("cuda"), tokenizer, adapter))
