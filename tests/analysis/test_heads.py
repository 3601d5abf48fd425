"""tinylab/analysis/heads.py on tiny random models: planted single-head updates must be found by every measure."""

from typing import NamedTuple

import pytest
import torch
from testkit import OTHER_ARCHS, arch_model, observe_layer, planted_head

from tinylab.adapter.attach import apply_tinylora
from tinylab.adapter.layer import TinyLoRALinear
from tinylab.analysis.head_ablation import ablation_gates, gated
from tinylab.analysis.heads import (
    EVIDENCE,
    ablate_heads,
    attention_shift,
    head_activity,
    head_effects,
)
from tinylab.analysis.patterns import attention_patterns
from tinylab.model.attention import attention_blocks, eager_attention
from tinylab.model.tiny import TINY_ARCHS, tiny_model

PROMPTS = [[{"role": "user", "content": f"What is {i} + {i + 1}?"}] for i in range(4)] + ["Once upon a time"]
ANSWERS = [str(2 * i + 1) for i in range(4)] + [" there was"]


def _others(table, column, head):
    return table[column].drop(index=head).abs()


def test_planted_query_head_is_ranked_first_by_every_measure():
    model, tokenizer, adapter = planted_head()
    effects = head_effects(model, tokenizer, adapter, PROMPTS, answers=ANSWERS, confirm="all")
    t = effects.table
    assert effects.metric == "logprob"
    assert list(t.index) == [(layer, h) for layer in range(2) for h in range(4)]
    assert t["kv_group"].tolist() == [0, 0, 1, 1] * 2
    for column in EVIDENCE:
        assert effects.top(column, 1) == [(1, 2)], column
        assert abs(t.loc[(1, 2), column]) > 0, column
        # ablation differences carry float rounding of the whole metric (~1e-7 relative to |logprob| ~ 10)
        tolerance = 1e-3 if column == "ablation" else 1e-6
        assert _others(t, column, (1, 2)).max() <= tolerance * abs(t.loc[(1, 2), column]), column
    # removing the planted head's update removes the whole update: ablation == adapted - base
    assert t.loc[(1, 2), "ablation"] == pytest.approx(effects.adapted - effects.base, rel=1e-3, abs=1e-7)
    assert t.loc[(1, 2), "ablation_share"] == pytest.approx(1.0, rel=1e-3)
    # the gradient estimate agrees in sign and size with the real ablation
    assert t.loc[(1, 2), "gate_grad"] == pytest.approx(t.loc[(1, 2), "ablation"], rel=0.5)
    assert (effects.agreement(1).to_numpy() == 1).all()


def test_planted_value_group_marks_both_heads_of_the_group_and_moves_no_pattern():
    model, tokenizer, adapter = planted_head(kind="v_proj", layer=1, slot=1)  # KV group 1 = query heads 2, 3
    t = head_effects(model, tokenizer, adapter, PROMPTS, answers=ANSWERS, confirm="all").table
    for column in ("weight", "weight_v", "output_change", "ablation"):
        assert (t.loc[[(1, 2), (1, 3)], column].abs() > 0).all(), column
        others = t.drop(index=[(1, 2), (1, 3)])[column].abs().max()
        assert others <= (1e-3 * abs(t.loc[(1, 2), column]) if column == "ablation" else 0), column  # float rounding
    assert t["js"].max() < 1e-6  # values do not change where a head looks
    assert t.loc[(1, 2), "ablation"] == pytest.approx(t.loc[(1, 3), "ablation"])


def test_planted_head_in_first_layer_still_ranks_first():
    model, tokenizer, adapter = planted_head(layer=0, slot=1)
    effects = head_effects(model, tokenizer, adapter, PROMPTS, answers=ANSWERS, confirm=2)
    for column in EVIDENCE:
        assert effects.top(column, 1) == [(0, 1)], column
    assert effects.table.loc[0].drop(index=1)["js"].max() == 0  # same layer: other heads untouched
    assert effects.table["ablation"].notna().sum() == 2  # only the top 2 by |gate_grad| were ablated


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_weight_norms_equal_slices_of_the_full_update(arch):
    """The head's rows of q/k/v (of a fused map too: which rows is `AttentionBlock.rows`, checked against
    the model's attention in the test below) and its columns of the output map, sliced out of the
    (out, in) update built in full."""
    model, tokenizer = tiny_model(arch, seed=0)
    adapter = apply_tinylora(model, n_tie=1, u=2)
    adapter.set_vector(torch.linspace(-2, 2, adapter.num_params))
    t = head_effects(model, tokenizer, adapter, PROMPTS[:2]).table
    assert t[["gate_grad", "ablation"]].isna().all().all()  # no answers: no causal measure
    for block in attention_blocks(model):
        d, group = block.head_dim, block.group
        mods = {attr: getattr(block.module, attr) for attr in block.maps}
        assert all(isinstance(m, TinyLoRALinear) for m in mods.values())
        full = {a: (m.delta_weight().detach(), m.base.weight) for a, m in mods.items()}  # (out, in) each, test only
        for h in range(block.n_heads):
            want = {}
            for part in "qkv":
                attr, rows = block.rows(part)
                unit = rows[h if part == "q" else h // group]  # [d]
                want[part] = full[attr][0][unit].norm() / full[attr][1][unit].norm()
            cols = slice(h * d, (h + 1) * d)
            want["o"] = full[block.maps[3]][0][:, cols].norm() / full[block.maps[3]][1][:, cols].norm()
            for k, value in want.items():
                assert t.loc[(block.layer, h), f"weight_{k}"] == pytest.approx(float(value), rel=1e-4), (h, k)


@pytest.mark.parametrize("arch", TINY_ARCHS + OTHER_ARCHS)
def test_removing_a_heads_update_gives_back_its_base_output_on_every_architecture(arch):
    """Separate, fused (Phi-3, GPT-2, multi-query GPTBigCode) and grouped (GPT-NeoX, BLOOM, Falcon in
    its three layouts, GPTBigCode without multi-query) q/k/v maps: in the first layer, with the update
    removed from one head (its q rows, its group's k/v rows), that head outputs what the base model's
    does, and the heads of the other KV groups what the adapted model's do. So the rows the gates and
    the weight norms take are the rows the model's attention reads."""
    model, tokenizer = arch_model(arch)
    adapter = apply_tinylora(model, n_tie=1, u=2)
    adapter.set_vector(torch.linspace(-3, 3, adapter.num_params))
    blocks = attention_blocks(model)
    if arch in TINY_ARCHS:
        config = model.config  # the geometry the blocks' weights gave must be the config's
        heads = config.num_attention_heads
        geometry = (heads, getattr(config, "num_key_value_heads", None) or heads,
                    getattr(config, "head_dim", None) or config.hidden_size // heads)
        assert [(b.n_heads, b.n_kv, b.head_dim) for b in blocks] == [geometry] * len(blocks)
    first, head = blocks[0], blocks[0].n_heads - 1
    ids = tokenizer(["Once upon a time there was"], return_tensors="pt").input_ids

    def head_outputs():
        return observe_layer(model, blocks, ids, first.layer)[1]  # [T, H, d]

    adapted = head_outputs()
    with adapter.disabled():
        base = head_outputs()
    with gated(adapter, blocks, *ablation_gates(blocks, [(first.layer, head)])):
        removed = head_outputs()
    assert (adapted[:, head] - base[:, head]).abs().max() > 1e-4  # the update moved the head
    torch.testing.assert_close(removed[:, head], base[:, head], rtol=1e-5, atol=1e-6)
    others = [h for h in range(first.n_heads) if h // first.group != head // first.group]
    torch.testing.assert_close(removed[:, others], adapted[:, others], rtol=1e-5, atol=1e-6)
    table = head_effects(model, tokenizer, adapter, PROMPTS[:2]).table
    assert len(table) == sum(b.n_heads for b in blocks) and table["weight"].gt(0).all()


def test_the_gated_maps_show_the_base_maps_weight_and_sizes():
    """Model code that reads a map's weight, bias or sizes (Ergo's attention reads o_proj.weight.dtype)
    sees the base map's while head ablation has swapped in its gated copies."""
    model, _ = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=2, n_tie="all")
    blocks = attention_blocks(model)
    with gated(adapter, blocks, *ablation_gates(blocks, [(1, 0)])):
        swapped = [getattr(blocks[1].module, attr) for attr in blocks[1].maps]
        assert all(type(m).__name__ == "GatedUpdate" for m in swapped)
        for m in swapped:
            assert m.weight is m.inner.base.weight and m.bias is m.inner.base.bias
            assert (m.in_features, m.out_features) == (m.inner.base.in_features, m.inner.base.out_features)


def test_padding_is_masked_batches_agree_with_single_prompts():
    model, tokenizer, adapter = planted_head(layer=0)
    batched = head_effects(model, tokenizer, adapter, PROMPTS, batch_size=5).table
    single = head_effects(model, tokenizer, adapter, PROMPTS, batch_size=1).table
    for column in ("js", "output_change"):
        assert torch.allclose(torch.tensor(batched[column].to_numpy()), torch.tensor(single[column].to_numpy()),
                              rtol=1e-3, atol=1e-6), column


def test_analysis_leaves_attention_setting_outputs_and_modules_unchanged():
    model, tokenizer, adapter = planted_head()
    model.set_attn_implementation("sdpa")
    adapter.merge()
    model.train()
    ids = tokenizer("The analysis must not change me", return_tensors="pt")["input_ids"]
    model.eval()
    before = model(ids).logits
    model.train()
    v_before = adapter.vector()
    modules_before = dict(model.named_modules())
    head_effects(model, tokenizer, adapter, PROMPTS, answers=ANSWERS, confirm="all")
    attention_patterns(model, tokenizer, PROMPTS[0], 1, 2, adapter)
    assert model.config._attn_implementation == "sdpa"
    assert model.training and adapter.merged
    assert dict(model.named_modules()).keys() == modules_before.keys()
    assert all(modules_before[n] is m for n, m in model.named_modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.equal(adapter.vector(), v_before)
    assert all(v.grad is None for v in adapter.parameters())
    model.eval()
    assert torch.equal(model(ids).logits, before)


def test_eager_attention_is_switched_on_and_restored_after_an_error():
    model, _ = tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with eager_attention(model):
            assert model.config._attn_implementation == "eager"
            assert model.model.config._attn_implementation == "eager"
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


def test_attention_patterns_base_vs_adapted():
    model, tokenizer, adapter = planted_head()
    p = attention_patterns(model, tokenizer, PROMPTS[0], 1, 2, adapter)
    T = len(p.tokens)
    assert p.base.shape == p.adapted.shape == (T, T)
    assert "".join(p.tokens) == tokenizer.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)
    assert torch.allclose(p.base.sum(-1), torch.ones(T)) and torch.allclose(p.adapted.sum(-1), torch.ones(T))
    assert p.base.triu(1).abs().max() == 0  # causal
    assert (p.base - p.adapted).abs().max() > 1e-3  # the planted head moved
    other = attention_patterns(model, tokenizer, PROMPTS[0], 1, 1, adapter)
    assert torch.equal(other.base, other.adapted)
    bare = attention_patterns(model, tokenizer, "plain text", 0, 0)
    assert bare.adapted is None and bare.base.shape == (len(bare.tokens),) * 2
    with pytest.raises(ValueError, match="0..1"):
        attention_patterns(model, tokenizer, "x", 2, 0, adapter)
    with pytest.raises(ValueError, match="0..3"):
        attention_patterns(model, tokenizer, "x", 0, 4, adapter)


class _Example(NamedTuple):
    prompt: object
    answer: str


class _ReplyLengthTask:
    """A stand-in task: the reward is the reply length in characters / 100 (any change shows)."""

    name = "reply_length"
    max_new_tokens = 12

    def reward(self, completions, answers):
        return [len(c) / 100 for c in completions]


def test_reward_mode_ablation_restores_the_base_reward():
    model, tokenizer, adapter = planted_head(scale=40.0)
    examples = [_Example(p, a) for p, a in zip(PROMPTS, ANSWERS)]
    effects = head_effects(model, tokenizer, adapter, examples, task=_ReplyLengthTask(), confirm=3)
    t = effects.table
    assert effects.metric == "reward" and effects.adapted != effects.base
    assert effects.top("ablation", 1) == [(1, 2)]
    assert t.loc[(1, 2), "ablation"] == pytest.approx(effects.adapted - effects.base)
    assert t["ablation"].drop(index=(1, 2)).dropna().abs().max() == 0
    joint = ablate_heads(model, tokenizer, adapter, examples, [(1, 2), (0, 0)], task=_ReplyLengthTask())
    assert joint.ablated == pytest.approx(joint.base) and joint.share == pytest.approx(1.0)
    reused = ablate_heads(model, tokenizer, adapter, examples, [(1, 2)], task=_ReplyLengthTask(), reference=effects)
    assert reused == ([(1, 2)], "reward", effects.base, effects.adapted, effects.base)
    with pytest.raises(ValueError, match="reference.metric='reward'"):
        ablate_heads(model, tokenizer, adapter, examples, [(1, 2)], reference=effects)


def test_bad_inputs_name_the_value_and_the_allowed_range():
    model, tokenizer, adapter = planted_head()
    with pytest.raises(ValueError, match="confirm=-1"):
        head_effects(model, tokenizer, adapter, PROMPTS, answers=ANSWERS, confirm=-1)
    with pytest.raises(ValueError, match="2 answers for 5 prompts"):
        head_effects(model, tokenizer, adapter, PROMPTS, answers=ANSWERS[:2])
    with pytest.raises(TypeError, match="TinyLoRA"):
        head_effects(model, tokenizer, None, PROMPTS)
    with pytest.raises(ValueError, match="non-empty"):
        head_effects(model, tokenizer, adapter, [])
    with pytest.raises(ValueError, match="needs answers"):
        ablate_heads(model, tokenizer, adapter, PROMPTS, [(0, 0)])
    with pytest.raises(ValueError, match="head=9"):
        ablate_heads(model, tokenizer, adapter, PROMPTS, [(0, 9)], answers=ANSWERS)
    with pytest.raises(ValueError, match="column='nope'"):
        head_effects(model, tokenizer, adapter, PROMPTS).top("nope")
    with pytest.raises(ValueError, match="batch_size=0: must be an integer >= 1"):
        head_effects(model, tokenizer, adapter, PROMPTS, batch_size=0)
    with pytest.raises(ValueError, match="confirm=True"):
        head_effects(model, tokenizer, adapter, PROMPTS, answers=ANSWERS, confirm=True)
    with pytest.raises(ValueError, match="layer=1.5"):
        ablate_heads(model, tokenizer, adapter, PROMPTS, [(1.5, 0)], answers=ANSWERS)


def test_head_gates_are_in_the_models_dtype_and_their_gradients_fp32():
    from tinylab.analysis.head_ablation import Scorer, ablation_gates, unit_gates
    from tinylab.model.attention import attention_blocks

    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer, adapter = planted_head(dtype=dtype)
        blocks = attention_blocks(model)
        head, kv = unit_gates(blocks)
        assert {(g.dtype, g.device) for g in [*head.values(), *kv.values()]} == {(dtype, model.device)}
        head, kv = ablation_gates(blocks, [(1, 3)])
        assert list(head) == [1] and head[1].tolist() == [1, 1, 1, 0] and kv[1].tolist() == [1, 0]
        scorer = Scorer(model, tokenizer, PROMPTS, ANSWERS, None, None, 2)
        grads[dtype] = scorer.gate_gradients(adapter, blocks)
        assert {g.dtype for g in [*grads[dtype][0].values(), *grads[dtype][1].values()]} == {torch.float32}
        assert int(grads[dtype][0][1].abs().argmax()) == 2  # the planted head
    fp32, bf16 = grads[torch.float32][0][1][2], grads[torch.bfloat16][0][1][2]
    assert float(bf16) == pytest.approx(float(fp32), rel=0.1)


def _all_public(model, tokenizer, adapter):
    examples = [_Example(p, a) for p, a in zip(PROMPTS, ANSWERS)]
    return (head_effects(model, tokenizer, adapter, PROMPTS, answers=ANSWERS, confirm=2),
            head_effects(model, tokenizer, adapter, examples, task=_ReplyLengthTask(), confirm=1),
            ablate_heads(model, tokenizer, adapter, PROMPTS, [(1, 2)], answers=ANSWERS),
            attention_patterns(model, tokenizer, PROMPTS[0], 1, 2, adapter))


def _check_all_public(results, expected=None):
    """The planted head found by every measure; with `expected`, the same numbers as it."""
    logprob, reward, joint, patterns = results
    for column in EVIDENCE:
        assert logprob.top(column, 1) == [(1, 2)], column
    assert joint.ablated == pytest.approx(logprob.base, abs=1e-6)  # its head carries the whole update
    assert reward.metric == "reward" and reward.table["gate_grad"].notna().all()
    assert patterns.base.dtype == torch.float32 and patterns.base.device.type == "cpu"
    assert (patterns.base - patterns.adapted).abs().max() > 1e-3
    assert torch.allclose(patterns.adapted.sum(-1), torch.ones(len(patterns.tokens)), atol=1e-2)
    if expected is not None:
        for got, want in zip(results[:2], expected[:2]):
            assert got.table.equals(want.table) and (got.adapted, got.base) == (want.adapted, want.base)
        assert joint == expected[2]
        assert torch.equal(patterns.base, expected[3].base) and torch.equal(patterns.adapted, expected[3].adapted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_public_function_keeps_to_the_models_device(gpu_stand_in, dtype):
    """head_effects (log-prob and reward metrics), ablate_heads and attention_patterns with torch's
    default device elsewhere than the model (meta): a tensor made without the model's device fails."""
    model, tokenizer, adapter = planted_head(dtype=dtype)
    with gpu_stand_in():
        inside = _all_public(model, tokenizer, adapter)
    _check_all_public(inside, expected=_all_public(model, tokenizer, adapter))
    assert all(v.grad is None for v in adapter.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_public_function_on_cuda(dtype):
    model, tokenizer, adapter = planted_head(dtype=dtype)
    model.to("cuda")
    _check_all_public(_all_public(model, tokenizer, adapter))


@pytest.mark.slow
def test_embedded_model_grouped_query_attention(embedded):
    """SmolLM2: 9 query heads share 3 KV heads (head_dim 64); a planted head 7 of layer 3 is found."""
    model, tokenizer = embedded
    adapter = apply_tinylora(model, targets=("q_proj",), layers=(3,))
    try:
        q = dict(adapter.named_modules())["model.layers.3.self_attn.q_proj"]
        assert q.out_features == 9 * 64
        with torch.no_grad():
            q.U.zero_()
            q.U[7 * 64:8 * 64] = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) / 8  # (d, r)
            q.P.copy_(torch.eye(2)[None])
            q.v.fill_(4.0)
        effects = head_effects(model, tokenizer, adapter, PROMPTS[:2], answers=ANSWERS[:2], confirm=1)
        t = effects.table
        assert len(t) == 30 * 9 and t.loc[3, "kv_group"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        for column in EVIDENCE:
            assert effects.top(column, 1) == [(3, 7)], column
        assert t.loc[:2, ["weight", "js", "output_change", "gate_grad"]].abs().max().max() == 0  # upstream layers
        assert t.loc[3].drop(index=7)[["weight", "js", "output_change", "gate_grad"]].abs().max().max() == 0
        assert model.config._attn_implementation == "sdpa"
    finally:
        adapter.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_base_activity_measured_once_gives_the_same_head_map(gpu_stand_in, dtype):
    """head_effects(base_activity=head_activity(...) of the base) equals head_effects measuring the base;
    attention_shift of the two activities is its js / output_change; under the stand-in too."""
    model, tokenizer, adapter = planted_head(dtype=dtype)
    with gpu_stand_in():
        with adapter.disabled():
            base = head_activity(model, tokenizer, PROMPTS, batch_size=2)
        now = head_activity(model, tokenizer, PROMPTS, batch_size=2)
        fresh = head_effects(model, tokenizer, adapter, PROMPTS, confirm=0, batch_size=2).table
        reused = head_effects(model, tokenizer, adapter, PROMPTS, confirm=0, batch_size=2, base_activity=base).table
        shift = attention_shift(base, now)
    assert len(base) == 3 and base[0].patterns[1].dtype == torch.float32
    assert reused.equals(fresh) and fresh.loc[(1, 2), "js"] > 0
    assert shift["js"].equals(fresh["js"]) and shift["output_change"].equals(fresh["output_change"])
    with pytest.raises(ValueError, match="the prompts make 1"):
        head_effects(model, tokenizer, adapter, PROMPTS, confirm=0, base_activity=base)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_base_activity_measured_once_on_cuda(dtype):
    model, tokenizer, adapter = planted_head(dtype=dtype)
    model.to("cuda")
    with adapter.disabled():
        base = head_activity(model, tokenizer, PROMPTS, batch_size=2)
    reused = head_effects(model, tokenizer, adapter, PROMPTS, confirm=0, batch_size=2, base_activity=base)
    assert base[0].patterns[1].is_cuda and reused.top("js", 1) == [(1, 2)]


def test_causal_measures_warn_where_a_norm_spans_the_heads():
    """OLMo2's q_norm / k_norm normalize all heads together, so removing one head's update is not confined
    to it: head_effects (with answers) and ablate_heads say so; a model with per-head norms does not."""
    import warnings

    from testkit import MIXED_NORM_ARCH

    for arch, expected in ((MIXED_NORM_ARCH, True), ("qwen3", False)):
        model, tokenizer = arch_model(arch)
        adapter = apply_tinylora(model, n_tie=1, u=2)
        adapter.set_vector(torch.linspace(-1, 1, adapter.num_params))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            head_effects(model, tokenizer, adapter, PROMPTS[:2], answers=ANSWERS[:2], confirm=1)
            ablate_heads(model, tokenizer, adapter, PROMPTS[:2], [(0, 0)], answers=ANSWERS[:2])
        said = [str(w.message) for w in caught if "normalize all heads together" in str(w.message)]
        assert len(said) == (2 if expected else 0), (arch, said)
        if expected:
            assert said[0].startswith("k_norm, q_norm of 2 layer(s) normalize all heads together")
