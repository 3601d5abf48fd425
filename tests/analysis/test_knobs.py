"""tinylab/analysis/knobs.py and tinylab/analysis/landscapes.py on tiny models: a planted adapter whose gain lives in one
number and one head must be found by the attribution and the per-number head map; sweeps agree
with setting the vector by hand; the vector always comes back."""

import numpy as np
import pytest
import torch
from testkit import EXAMPLES, KEY, PLANTED, planted_knobs

import tinylab.analysis.landscapes as landscape_module
from tinylab.adapter.attach import apply_tinylora
from tinylab.analysis.knobs import attribute_numbers, heads_by_number, number_index, number_label
from tinylab.analysis.landscapes import grid_around, landscape, sweep_number
from tinylab.measures.gold import GoldSet
from tinylab.measures.replies import scored_replies
from tinylab.model.tiny import tiny_model
from tinylab.tasks import get as get_task


@pytest.fixture(scope="module")
def planted():
    return planted_knobs()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits  # [1, T, V]


def test_attribution_ranks_the_acting_number_first_and_leaves_no_interaction(planted):
    model, tokenizer, adapter = planted
    before = adapter.vector()
    a = attribute_numbers(model, tokenizer, adapter, EXAMPLES)
    assert torch.equal(adapter.vector(), before)
    assert a.ranked()[0] == KEY and a.ranked("estimate")[0] == KEY
    t = a.table
    assert t.loc[KEY, "ablation"] != 0
    assert (t.drop(index=KEY)["ablation"] == 0).all()  # inert numbers: bit-identical model without them
    assert t["value"].tolist() == pytest.approx(before.tolist())
    assert t["label"].tolist() == ["v0", "v1", "v2"]
    # zeroing all is zeroing the one acting number: nothing is left over
    assert a.total == pytest.approx(t.loc[KEY, "ablation"], rel=1e-4)
    assert abs(a.interaction) <= 1e-4 * abs(a.total)
    # the first-order estimate: the ablation's sign, and v_i times the slope a centred difference measures
    assert np.sign(t.loc[KEY, "estimate"]) == np.sign(t.loc[KEY, "ablation"])
    lp = sweep_number(model, tokenizer, adapter, EXAMPLES, number=KEY, values=[5.5, 6.5]).table["logprob"]
    assert t.loc[KEY, "estimate"] == pytest.approx(6.0 * (lp[1] - lp[0]), rel=0.05)


def test_the_acting_numbers_head_map_puts_the_planted_head_first(planted):
    model, tokenizer, adapter = planted
    before = adapter.vector()
    heads = heads_by_number(model, tokenizer, adapter, EXAMPLES)
    assert torch.equal(adapter.vector(), before)
    assert heads.numbers == [0, 1, 2]
    for column in ("share", "weight", "js", "output_change"):
        assert heads.top(KEY, column, 1) == [PLANTED], column
        grid = heads.grid(KEY, column)
        assert grid.shape == (2, 4)
        others = grid.to_numpy().copy()
        others[PLANTED] = 0
        assert np.abs(others).max() <= 1e-5 * abs(grid.loc[PLANTED]), column
    assert heads.grid(KEY, "share").loc[PLANTED] == pytest.approx(1.0)
    for inert in (0, 2):  # switched on alone, they change nothing
        assert heads.top(inert, "weight") == [] and heads.top(inert, "js") == []
    # a chosen value turns a number on at that value
    at_one = heads_by_number(model, tokenizer, adapter, EXAMPLES[:1], numbers=[KEY], value=1.0)
    assert at_one.numbers == [KEY] and (at_one.table["value"] == 1.0).all()
    assert at_one.grid(KEY, "weight").loc[PLANTED] == pytest.approx(heads.grid(KEY, "weight").loc[PLANTED] / 6, rel=1e-4)


def test_sweep_at_zero_equals_the_number_zeroed_by_hand(planted):
    model, tokenizer, adapter = planted
    trained = adapter.vector()
    sw = sweep_number(model, tokenizer, adapter, EXAMPLES, number=KEY, values=[-2.0, 0.0, 6.0, 9.0])
    assert torch.equal(adapter.vector(), trained)
    assert sw.label == "v1" and sw.number == KEY and sw.trained == 6.0 and sw.zero == 0.0
    assert sw.per_example.shape == (4, len(EXAMPLES))
    gold = GoldSet(model, tokenizer, EXAMPLES)
    with adapter.kept_vector():
        zeroed = trained.clone()
        zeroed[KEY] = 0.0
        adapter.set_vector(zeroed)
        with torch.no_grad():
            by_hand = gold.logprobs().numpy()
    assert np.array_equal(sw.per_example[1], by_hand)
    with torch.no_grad():
        assert np.array_equal(sw.per_example[2], gold.logprobs().numpy())  # the trained value: the trained model
    assert sw.table["logprob"].tolist() == pytest.approx(sw.per_example.mean(1).tolist())
    assert len(set(sw.table["logprob"])) == 4  # the acting number moves the score


def test_sweep_along_a_direction_and_default_values(planted):
    model, tokenizer, adapter = planted
    trained = adapter.vector()
    sw = sweep_number(model, tokenizer, adapter, EXAMPLES, direction=trained, values=[-1.0, 0.0, 0.5])
    assert sw.label == "direction" and sw.number is None and sw.trained == 0.0
    assert sw.zero == pytest.approx(-1.0)
    a = attribute_numbers(model, tokenizer, adapter, EXAMPLES)
    assert sw.table["logprob"][0] == pytest.approx(a.zero, abs=1e-6)  # t = -1: v = 0, the base
    assert sw.table["logprob"][1] == pytest.approx(a.trained, abs=1e-6)
    off_line = sweep_number(model, tokenizer, adapter, EXAMPLES, direction=[1.0, 0.0, 0.0], values=[0.0])
    assert off_line.zero is None
    default = sweep_number(model, tokenizer, adapter, EXAMPLES, number=0)
    assert 0.0 in default.values and float(trained[0]) in default.values
    assert list(default.values) == sorted(default.values)


def test_grid_around_covers_zero_and_the_value():
    g = grid_around(2.0, n=5, margin=0.5)
    assert g[0] == -1.0 and g[-1] == 3.0 and 0.0 in g and 2.0 in g
    assert 0.3 in grid_around(0.3, n=4) and 0.0 in grid_around(0.0)
    with pytest.raises(ValueError, match=r"n=1: must be an integer >= 2"):
        grid_around(1.0, n=1)


def test_landscape_marks_the_trained_point_and_the_origin(planted):
    model, tokenizer, adapter = planted
    trained = adapter.vector()
    ls = landscape(model, tokenizer, adapter, EXAMPLES, (0, KEY), x=[0.0, 0.7], y=[0.0, 3.0, 6.0])
    assert torch.equal(adapter.vector(), trained)
    assert ls.logprob.shape == (3, 2) and ls.labels == ("v0", "v1") and ls.numbers == (0, KEY)
    assert ls.trained == pytest.approx((0.7, 6.0)) and ls.origin == (0.0, 0.0) and ls.scores == {}
    a = attribute_numbers(model, tokenizer, adapter, EXAMPLES)
    assert ls.logprob[2, 1] == pytest.approx(a.trained, abs=1e-6)
    # number 0 is inert: the columns agree; number 1 moves the rows
    assert ls.logprob[:, 0] == pytest.approx(ls.logprob[:, 1], abs=1e-5)
    assert len(set(np.round(ls.logprob[:, 0], 6))) == 3
    assert ls.best() in {(float(x), float(y)) for x in ls.x for y in ls.y}
    with pytest.raises(ValueError, match="strict"):
        ls.best("strict")


def test_reply_scores_ride_along_with_a_task(planted):
    model, tokenizer, adapter = planted
    task = get_task("arithmetic")
    examples = task.examples("test", 3, seed=0)
    sw = sweep_number(model, tokenizer, adapter, examples, number=KEY, values=[0.0, 6.0], task=task, max_new_tokens=3)
    assert list(sw.table.columns) == ["value", "logprob", "strict", "flexible", "formatted"]
    with torch.no_grad():
        shares, replies = scored_replies(model, tokenizer, examples, task, max_new_tokens=3)
    assert len(replies) == 3
    assert sw.table.loc[1, ["strict", "flexible", "formatted"]].tolist() == [shares[k] for k in
                                                                              ("strict", "flexible", "formatted")]
    ls = landscape(model, tokenizer, adapter, examples, (0, 1), x=[0.7], y=[6.0], task=task, max_new_tokens=3)
    assert set(ls.scores) == {"strict", "flexible", "formatted"} and ls.scores["strict"].shape == (1, 1)


def test_untied_numbers_by_group_and_entry():
    model, tokenizer = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=2, n_tie=1)  # 14 groups of 2
    adapter.set_vector(torch.linspace(-0.5, 0.5, 28))
    assert number_index(adapter, (3, 1)) == 7 and number_index(adapter, 7) == 7
    assert number_label(adapter, 7) == "g3.v1"
    by_pair = sweep_number(model, tokenizer, adapter, EXAMPLES[:2], number=(3, 1), values=[0.0, 1.0])
    by_flat = sweep_number(model, tokenizer, adapter, EXAMPLES[:2], number=7, values=[0.0, 1.0])
    assert by_pair.label == "g3.v1" and np.array_equal(by_pair.per_example, by_flat.per_example)
    heads = heads_by_number(model, tokenizer, adapter, EXAMPLES[:1], numbers=[(3, 1)])
    assert heads.numbers == [7] and set(heads.table["label"]) == {"g3.v1"}
    # group 3 is layer 0's o_proj (tiled, model order q k v o gate up down): only layer 0's heads move
    assert heads.grid(7, "weight").loc[1].abs().max() == 0 and heads.grid(7, "weight").loc[0].min() > 0
    a = attribute_numbers(model, tokenizer, adapter, EXAMPLES[:2])
    assert len(a.table) == 28 and a.table.loc[7, ["group", "entry"]].tolist() == [3, 1]


def test_the_vector_comes_back_after_a_sweep_that_raises_midway(planted, monkeypatch):
    model, tokenizer, adapter = planted
    trained = adapter.vector()
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    logits = _logits(model, ids)
    real = landscape_module.Meter.__call__
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        calls = []

        def failing(self, error=error, calls=calls):
            calls.append(1)
            if len(calls) == 2:
                raise error
            return real(self)

        monkeypatch.setattr(landscape_module.Meter, "__call__", failing)
        with pytest.raises(type(error)):
            sweep_number(model, tokenizer, adapter, EXAMPLES, number=KEY, values=[0.0, -3.0, 1.0])
        assert len(calls) == 2
        assert torch.equal(adapter.vector(), trained)
        assert torch.equal(_logits(model, ids), logits)
    monkeypatch.setattr(landscape_module.Meter, "__call__", real)
    adapter.merge()  # a merged adapter is unmerged for the sweep and merged again after it
    try:
        sweep_number(model, tokenizer, adapter, EXAMPLES[:1], number=KEY, values=[0.0])
        assert adapter.merged and torch.equal(adapter.vector(), trained)
        assert torch.allclose(_logits(model, ids), logits, atol=1e-5)
    finally:
        adapter.unmerge()


@pytest.mark.parametrize("call, message", [
    (lambda m, t, a: sweep_number(m, t, a, EXAMPLES, number=3, values=[1.0]),
     r"number=3: must be an integer >= 0 and <= 2 \(this adapter has 3 numbers: u=3 x 1 group\(s\)\)"),
    (lambda m, t, a: sweep_number(m, t, a, EXAMPLES, number=-1, values=[1.0]), r"number=-1: must be an integer >= 0 and <= 2"),
    (lambda m, t, a: sweep_number(m, t, a, EXAMPLES, number=(1, 0), values=[1.0]),
     r"group=1: must be an integer >= 0 and <= 0 \(this adapter has 1 tying group\(s\)\)"),
    (lambda m, t, a: sweep_number(m, t, a, EXAMPLES, number=(0, 5), values=[1.0]),
     r"entry=5: must be an integer >= 0 and <= 2 \(each vector has u=3 numbers\)"),
    (lambda m, t, a: sweep_number(m, t, a, EXAMPLES, number=1, values=[]), r"values=\[\]: must be a non-empty list"),
    (lambda m, t, a: sweep_number(m, t, a, EXAMPLES, number=1, values=[0.0, float("nan")]),
     r"values\[1\]=nan: must be a finite number"),
    (lambda m, t, a: sweep_number(m, t, a, EXAMPLES, number=1, values=[float("inf")]), r"values\[0\]=inf: must be a finite"),
    (lambda m, t, a: sweep_number(m, t, a, EXAMPLES, values=[1.0]), "exactly one of number"),
    (lambda m, t, a: sweep_number(m, t, a, EXAMPLES, direction=[1.0, 0.0]), "direction has 2 entries; this adapter has 3"),
    (lambda m, t, a: sweep_number(m, t, a, [], number=1, values=[1.0]), "examples must be a non-empty list"),
    (lambda m, t, a: landscape(m, t, a, EXAMPLES, (1, 1)), "name the same number twice"),
    (lambda m, t, a: landscape(m, t, a, EXAMPLES, (0, 7)), r"number=7: must be an integer >= 0 and <= 2"),
    (lambda m, t, a: landscape(m, t, a, EXAMPLES, (0, 1), x=[0.0], y=[float("nan")]), r"y\[0\]=nan"),
    (lambda m, t, a: heads_by_number(m, t, a, EXAMPLES, numbers=[4]), r"number=4: must be an integer >= 0 and <= 2"),
    (lambda m, t, a: heads_by_number(m, t, a, EXAMPLES, value=float("inf")), r"value=inf: must be a finite number"),
    (lambda m, t, a: attribute_numbers(m, t, a, EXAMPLES, target="reply"), r"target='reply': allowed values are"),
    (lambda m, t, a: attribute_numbers(m, t, a, EXAMPLES, target="solution"), "have no solution"),
])
def test_bad_input_names_the_allowed_range_and_changes_nothing(planted, call, message):
    model, tokenizer, adapter = planted
    trained = adapter.vector()
    with pytest.raises(ValueError, match=message):
        call(model, tokenizer, adapter)
    assert torch.equal(adapter.vector(), trained)


def _all_public(model, tokenizer, adapter):
    a = attribute_numbers(model, tokenizer, adapter, EXAMPLES[:2])
    sw = sweep_number(model, tokenizer, adapter, EXAMPLES[:2], number=KEY, values=[0.0, 6.0])
    ls = landscape(model, tokenizer, adapter, EXAMPLES[:2], (0, KEY), x=[0.7], y=[0.0, 6.0])
    heads = heads_by_number(model, tokenizer, adapter, EXAMPLES[:1], numbers=[KEY])
    gold = GoldSet(model, tokenizer, EXAMPLES[:2])
    with torch.no_grad():
        lp = gold.logprobs()
    return a, sw, ls, heads, lp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_public_function_keeps_to_the_models_device(gpu_stand_in, dtype):
    model, tokenizer, adapter = planted_knobs(dtype)
    trained = adapter.vector()
    with gpu_stand_in():
        a, sw, ls, heads, lp = _all_public(model, tokenizer, adapter)
    assert lp.dtype == torch.float32 and lp.device == next(model.parameters()).device
    assert a.ranked()[0] == KEY and heads.top(KEY, "share", 1) == [PLANTED]
    assert sw.table["logprob"][1] == pytest.approx(a.trained, abs=1e-6)
    assert ls.logprob[1, 0] == pytest.approx(a.trained, abs=1e-6)
    assert torch.equal(adapter.vector(), trained)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_public_function_on_cuda(dtype):
    model, tokenizer, adapter = planted_knobs(dtype)
    model.to("cuda")
    a, sw, ls, heads, lp = _all_public(model, tokenizer, adapter)
    assert lp.dtype == torch.float32 and lp.device.type == "cuda"
    assert a.ranked()[0] == KEY and heads.top(KEY, "share", 1) == [PLANTED]
