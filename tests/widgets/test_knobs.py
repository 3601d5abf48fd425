"""widgets/knobs.py driven without a browser: slider.value = x, button.click(), and the figures."""

import numpy as np
import pytest
import torch
from testkit import EXAMPLES, KEY, PLANTED, UNSPLIT_ARCH, arch_model, planted_knobs
from tinylab.widgets.knobs import KnobPanel, landscape_figure, sweep_figure

from tinylab.adapter.attach import apply_tinylora
from tinylab.analysis.heads import head_effects
from tinylab.analysis.landscapes import landscape, sweep_number
from tinylab.measures.gold import GoldSet
from tinylab.model.generation import generate
from tinylab.model.tiny import tiny_model

PROMPTS = ["Once upon a time", [{"role": "user", "content": "What is 2 + 3?"}]]
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def panel():
    model, tokenizer, adapter = planted_knobs()
    return KnobPanel(model, tokenizer, adapter, PROMPTS, EXAMPLES, max_new_tokens=NEW_TOKENS)


def _logits(panel):
    ids = torch.tensor([[1, 5, 9, 14, 3, 22]])
    with torch.no_grad():
        return panel.model(input_ids=ids).logits  # [1, T, V]


def _buttons(panel, i):
    row = panel.sliders[i]
    box = next(b for b in panel.children[0].children[0].children if getattr(b, "children", None)
               and b.children[0] is row)
    return {b.description: b for b in box.children[1:]}


def _greedy(panel):
    return generate(panel.model, panel.tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0,
                    seed=0).completions


def test_sliders_start_at_the_trained_values(panel):
    trained = panel.adapter.vector()
    assert [s.value for s in panel.sliders] == trained.tolist()
    assert [s.description for s in panel.sliders] == ["v0", "v1", "v2"]
    assert all(s.min < -6 and s.max > 6 for s in panel.sliders)  # twice the largest |v|
    assert panel.now_replies == panel.trained_replies
    assert np.array_equal(panel.now_logprobs, panel.trained_logprobs)
    assert np.array_equal(np.asarray(panel.bars.data[2].y, dtype=float), panel.trained_logprobs)


def test_a_slider_move_changes_v_only_and_redraws_everything(panel):
    trained = panel.adapter.vector()
    svd_before = {name: m.U.data_ptr() for name, m in panel.adapter.named_modules()}
    panel.sliders[KEY].value = 0.0
    now = panel.adapter.vector()
    others = torch.arange(len(now)) != KEY
    assert now[KEY] == 0.0 and torch.equal(now[others], trained[others])
    assert {name: m.U.data_ptr() for name, m in panel.adapter.named_modules()} == svd_before  # no re-attach
    # the bars, the replies and the head map are those of the model with v_1 = 0
    gold = GoldSet(panel.model, panel.tokenizer, EXAMPLES)
    with torch.no_grad():
        want = gold.logprobs().numpy()
    assert np.array_equal(np.asarray(panel.bars.data[2].y, dtype=float), want)
    assert not np.array_equal(want, panel.trained_logprobs)
    assert panel.now_replies == _greedy(panel)
    assert f"now {want.mean():.4f}" in panel.summary.value
    effects = head_effects(panel.model, panel.tokenizer, panel.adapter, PROMPTS, confirm=0)
    z = np.asarray(panel.heads.data[0].z, dtype=float)
    assert np.allclose(z, effects.table["js"].unstack("head").to_numpy(), atol=1e-7)
    assert np.abs(z).max() == 0  # v_1 off: only inert numbers are on, the model is the base
    assert panel.last_update_seconds > 0


def test_reset_button_reproduces_the_trained_logits_exactly(panel):
    trained = panel.trained
    panel.reset()
    reference = _logits(panel)
    panel.sliders[KEY].value = 2.5
    moved = _logits(panel)
    assert not torch.equal(moved, reference)
    z = np.asarray(panel.heads.data[0].z, dtype=float)
    layer, head = PLANTED
    assert np.unravel_index(np.argmax(z), z.shape) == (layer, head)  # the planted head moves
    _buttons(panel, KEY)["trained"].click()
    assert torch.equal(panel.adapter.vector(), trained)
    assert torch.equal(_logits(panel), reference)
    panel.sliders[KEY].value = 2.5  # by hand to the trained value: the same
    panel.sliders[KEY].value = float(trained[KEY])
    assert torch.equal(_logits(panel), reference)
    assert panel.now_replies == panel.trained_replies


def test_zero_buttons_and_all_buttons(panel):
    trained = panel.trained
    _buttons(panel, 0)["0"].click()
    assert panel.adapter.vector()[0] == 0 and panel.sliders[0].value == 0.0
    calls = []
    real = panel._update
    panel._update = lambda: (calls.append(1), real())
    try:
        panel.all_zero.click()
        assert len(calls) == 1  # one redraw for all sliders
        assert not panel.adapter.vector().any()
        assert panel.now_replies == panel.base_replies
        assert np.array_equal(panel.now_logprobs, panel.base_logprobs)
        panel.all_trained.click()
        assert len(calls) == 2
    finally:
        panel._update = real
    assert torch.equal(panel.adapter.vector(), trained)


def test_sweep_and_landscape_figures_match_the_library(panel):
    trained = panel.trained
    panel.sliders[0].value = 0.2  # the panel explores around the trained point and keeps the sliders' point
    result = panel.show_sweep(KEY, values=[0.0, 3.0, 6.0])
    assert panel.adapter.vector()[0] == pytest.approx(0.2) and panel.sliders[0].value == 0.2
    panel.reset()
    direct = sweep_number(panel.model, panel.tokenizer, panel.adapter, EXAMPLES, number=KEY, values=[0.0, 3.0, 6.0])
    assert np.array_equal(result.per_example, direct.per_example)
    assert list(panel.sweep_plot.data[0].y) == direct.table["logprob"].tolist()
    shapes = [s.x0 for s in panel.sweep_plot.layout.shapes]
    assert 6.0 in shapes and 0.0 in shapes  # the trained value and zero marked
    ls = panel.show_landscape(0, KEY, [0.0, 0.7], [0.0, 6.0])
    direct = landscape(panel.model, panel.tokenizer, panel.adapter, EXAMPLES, (0, KEY), [0.0, 0.7], [0.0, 6.0])
    assert np.array_equal(ls.logprob, direct.logprob)
    heat, star, origin = panel.landscape_plot.data
    assert np.array_equal(np.asarray(heat.z, dtype=float), direct.logprob)
    assert (star.x[0], star.y[0]) == pytest.approx((0.7, 6.0)) and (origin.x[0], origin.y[0]) == (0.0, 0.0)
    assert torch.equal(panel.adapter.vector(), trained)
    figure = sweep_figure(result)
    assert figure.layout.title.text == "sweep of v1"
    with pytest.raises(ValueError, match="metric='strict' was not measured"):
        landscape_figure(ls, "strict")
    with pytest.raises(TypeError, match="must be a Sweep"):
        sweep_figure(ls)


def test_untied_panel_shows_the_groups():
    model, tokenizer = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=2, n_tie=7)  # 2 groups of 7 modules, 2 numbers each
    adapter.set_vector([0.1, -0.2, 0.3, 0.0])
    panel = KnobPanel(model, tokenizer, adapter, PROMPTS[:1], EXAMPLES[:2], max_new_tokens=2)
    assert [s.description for s in panel.sliders] == ["g0.v0", "g0.v1", "g1.v0", "g1.v1"]
    headers = [b.children[0].value for b in panel.children[0].children[0].children[1:]]
    assert headers == ["<b>group 0</b>: 7 modules", "<b>group 1</b>: 7 modules"]
    panel.sliders[2].value = 0.0
    assert adapter.vector().tolist() == pytest.approx([0.1, -0.2, 0.0, 0.0])


def test_bad_input_is_refused():
    model, tokenizer, adapter = planted_knobs()
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        KnobPanel(model, tokenizer, adapter, [], EXAMPLES)
    with pytest.raises(ValueError, match="examples must be a non-empty list"):
        KnobPanel(model, tokenizer, adapter, PROMPTS, [])
    with pytest.raises(ValueError, match=r"limit=1.0: must be a finite number > 6"):
        KnobPanel(model, tokenizer, adapter, PROMPTS, EXAMPLES, limit=1.0)
    with pytest.raises(ValueError, match="give the prompts as Examples"):
        KnobPanel(model, tokenizer, adapter, PROMPTS, EXAMPLES, task="arithmetic")
    with pytest.raises(TypeError, match="adapter must be a TinyLoRA handle"):
        KnobPanel(model, tokenizer, model, PROMPTS, EXAMPLES)
    adapter.merge()  # a merged adapter is unmerged: the sliders act on v
    panel = KnobPanel(model, tokenizer, adapter, PROMPTS[:1], EXAMPLES[:1], max_new_tokens=1)
    assert not adapter.merged
    panel.sliders[KEY].value = 0.0
    assert adapter.vector()[KEY] == 0.0 and not np.array_equal(panel.now_logprobs, panel.trained_logprobs)


def test_an_update_after_caching_equals_computing_from_scratch():
    """Prompts that are the held-out examples: the panel reads base and trained once, and a move reads
    "now" in one forward per batch; replies, bars and head map equal the separate library calls."""
    model, tokenizer, adapter = planted_knobs()
    panel = KnobPanel(model, tokenizer, adapter, EXAMPLES, EXAMPLES, max_new_tokens=NEW_TOKENS)
    assert panel.reader.shared and panel.max_new_tokens == NEW_TOKENS
    prompts = [ex.prompt for ex in EXAMPLES]
    reads = []
    real = panel.reader.__call__
    panel.reader = lambda: (reads.append(1), real())[1]
    panel.sliders[KEY].value = 2.5
    assert len(reads) == 1  # base and trained are not read again
    with torch.no_grad():
        want = GoldSet(model, tokenizer, EXAMPLES).logprobs().numpy()
        with adapter.disabled():
            base = GoldSet(model, tokenizer, EXAMPLES).logprobs().numpy()
    bars = np.asarray(panel.bars.data[2].y, dtype=float)
    assert np.allclose(bars, want, rtol=0, atol=1e-5) and not np.allclose(want, panel.trained_logprobs, atol=1e-3)
    assert np.allclose(panel.base_logprobs, base, rtol=0, atol=1e-5)
    assert panel.now_replies == generate(model, tokenizer, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                         seed=0).completions
    effects = head_effects(model, tokenizer, adapter, prompts, confirm=0)
    z = np.asarray(panel.heads.data[0].z, dtype=float)
    assert np.allclose(z, effects.table["js"].unstack("head").to_numpy(), rtol=1e-4, atol=1e-7)
    assert np.unravel_index(np.argmax(z), z.shape) == PLANTED
    panel.all_zero.click()  # v = 0 is the base, read the same way: exactly the cached base side
    assert np.array_equal(panel.now_logprobs, panel.base_logprobs) and panel.now_replies == panel.base_replies
    assert not np.asarray(panel.heads.data[0].z, dtype=float).any()
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        KnobPanel(model, tokenizer, adapter, EXAMPLES, EXAMPLES, max_new_tokens=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_panel_moves_with_the_model_off_the_default_device(gpu_stand_in, dtype):
    """Built and driven with the model off torch's default device (the GPU stand-in): a move changes the bars."""
    model, tokenizer = tiny_model("llama", seed=0, dtype=dtype)
    adapter = apply_tinylora(model, u=3, n_tie="all")
    adapter.set_vector([0.5, -0.3, 0.2])
    with gpu_stand_in():
        panel = KnobPanel(model, tokenizer, adapter, PROMPTS[:1], EXAMPLES[:2], max_new_tokens=2)
        before = np.array(panel.bars.data[2].y, dtype=float)  # "now" bars: the trained values at first
        target = panel.sliders[0].min  # the far end of the slider's range, away from the trained 0.5
        panel.sliders[0].value = target
    assert target < 0.5 and adapter.vector()[0].item() == pytest.approx(target)
    after = np.array(panel.bars.data[2].y, dtype=float)
    assert np.isfinite(after).all() and not np.array_equal(after, before)


def test_a_model_whose_attention_is_not_split_into_heads_gets_the_panel_without_a_head_map():
    """DeepSeek-V2's latent attention is no layout tinylab splits into heads: sliders, replies and
    log-probs work, the head map says why it is empty, and reset gives back the trained logits exactly."""
    model, tokenizer = arch_model(UNSPLIT_ARCH)
    adapter = apply_tinylora(model, u=3, n_tie="all")
    adapter.set_vector(torch.tensor([0.5, -1.0, 2.0]))
    panel = KnobPanel(model, tokenizer, adapter, PROMPTS, EXAMPLES, max_new_tokens=NEW_TOKENS)
    assert panel.shift.size == 0 and "not split into heads" in panel.heads.layout.title.text
    trained = _logits(panel)
    panel.sliders[0].value = -3.0
    assert not torch.equal(_logits(panel), trained)
    panel.reset()
    assert torch.equal(_logits(panel), trained)
