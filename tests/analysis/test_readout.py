"""tinylab/analysis/readout.py: one shared forward reads what separate calls read, on a planted tiny model."""

import numpy as np
import pytest
import torch
from testkit import EXAMPLES, KEY, PLANTED, planted_knobs

from tinylab.analysis.heads import attention_shift, head_activity, head_effects
from tinylab.analysis.readout import Reader
from tinylab.measures.gold import GoldSet
from tinylab.model.generation import generate

PROMPTS = [ex.prompt for ex in EXAMPLES]
NEW_TOKENS = 5


def _from_scratch(model, tokenizer, adapter):
    """The separate calls a readout replaces: gold forward, generate, head_effects (base measured anew)."""
    with torch.no_grad():
        logprobs = GoldSet(model, tokenizer, EXAMPLES).logprobs().cpu().numpy()  # [N]
    replies = generate(model, tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0, seed=0).completions
    js = head_effects(model, tokenizer, adapter, PROMPTS, confirm=0).table["js"]
    return logprobs, replies, js


def _forwards(model):
    """Counts the model calls that take more than one position (prefills and teacher-forced forwards)."""
    calls = []

    def count(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            calls.append(tuple(kwargs["input_ids"].shape))
    return calls, model.register_forward_pre_hook(count, with_kwargs=True)


@pytest.mark.parametrize("shared", [True, False])
def test_a_readout_after_caching_the_base_equals_computing_from_scratch(shared):
    model, tokenizer, adapter = planted_knobs()
    gold = GoldSet(model, tokenizer, EXAMPLES if shared else EXAMPLES[:2], batch_size=2)
    reader = Reader(model, tokenizer, PROMPTS, gold, max_new_tokens=NEW_TOKENS, batch_size=2)
    assert reader.shared == shared
    with adapter.disabled():
        base = reader()  # read once, reused at every point below
    for value in (6.0, 2.5, 0.0):
        adapter.set_vector([0.7, value, -0.4])
        calls, handle = _forwards(model)
        try:
            now = reader()
        finally:
            handle.remove()
        # shared: one forward of prompt + gold per batch of 2 and nothing else; else a prompt forward
        # per batch and the gold set's own forward
        teacher_forced = [tuple(b.input_ids.shape) for b in gold.batches]
        prompt_only = [tuple(ids.shape) for ids, _, _ in reader.batches]
        assert calls == (teacher_forced if shared else prompt_only + teacher_forced), calls
        assert len(calls) == (2 if shared else 3)
        logprobs, replies, js = _from_scratch(model, tokenizer, adapter)
        n = len(gold)
        assert np.allclose(now.logprobs, logprobs[:n], rtol=0, atol=1e-5)
        assert now.replies == replies
        shift = attention_shift(base.activity, now.activity)
        assert np.allclose(shift["js"].to_numpy(), js.to_numpy(), rtol=1e-4, atol=1e-7)
        if value != 0.0:
            assert shift["js"].idxmax() == PLANTED and shift["js"].max() > 1e-4
        else:  # the acting number off: exactly the base, read the same way
            assert not shift["js"].any()
            assert np.array_equal(now.logprobs, base.logprobs) and now.replies == base.replies


def test_the_base_activity_is_the_prompt_forwards_own():
    """The prompt positions of the shared forward (HeadActivity.first) are the prompt's own heads:
    head_effects with that base gives the head map it gives when it measures the base itself."""
    model, tokenizer, adapter = planted_knobs()
    gold = GoldSet(model, tokenizer, EXAMPLES)
    with adapter.disabled():
        shared_base = Reader(model, tokenizer, PROMPTS, gold, max_new_tokens=1)().activity
        own_base = head_activity(model, tokenizer, PROMPTS)
    assert [a.mask.shape for a in shared_base] == [a.mask.shape for a in own_base]
    for got, want in zip(shared_base, own_base):
        assert torch.equal(got.mask, want.mask)
        valid = want.mask.bool()  # [B, T]: the real query positions (padding rows are never read)
        for layer in want.patterns:
            p0, p1 = (a.patterns[layer].permute(0, 2, 1, 3)[valid] for a in (got, want))  # [N, H, T]
            assert torch.allclose(p0, p1, atol=1e-6)
            assert torch.allclose(got.outputs[layer][valid], want.outputs[layer][valid], atol=1e-5)
    fresh = head_effects(model, tokenizer, adapter, PROMPTS, confirm=0).table
    reused = head_effects(model, tokenizer, adapter, PROMPTS, confirm=0, base_activity=shared_base).table
    assert reused.loc[PLANTED, "js"] > 1e-4
    assert np.allclose(reused["js"], fresh["js"], rtol=1e-4, atol=1e-7)
    assert np.allclose(reused["output_change"], fresh["output_change"], rtol=1e-4, atol=1e-7)


def test_a_readout_of_a_model_with_a_recurrent_cache_equals_computing_from_scratch():
    """Qwen3-Next with a linear-attention layer: its recurrent state has read the gold reply and
    cannot be cropped back to the prompt, so the greedy replies start from the prompts run again;
    replies and gold log-probabilities are those of the separate calls."""
    from testkit import other_arch

    from tinylab.adapter.attach import apply_tinylora
    from tinylab.model.tiny import tiny_model

    tokenizer = tiny_model()[1]
    model = other_arch("qwen3_next_hybrid", tokenizer)
    adapter = apply_tinylora(model, u=2, n_tie="all")
    adapter.set_vector([0.4, -0.3])
    gold = GoldSet(model, tokenizer, EXAMPLES, batch_size=2)
    reader = Reader(model, tokenizer, PROMPTS, gold, max_new_tokens=NEW_TOKENS, batch_size=2)
    assert reader.shared
    now = reader()
    with torch.no_grad():
        assert np.allclose(now.logprobs, gold.logprobs().cpu().numpy(), rtol=0, atol=1e-5)
    assert now.replies == generate(model, tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0).completions
    assert len(now.activity) == 2 and all(a.patterns for a in now.activity)


def test_replies_that_begin_as_the_gold_are_read_from_its_forward(gpu_stand_in):
    """Gold continuations that are the model's own greedy replies: the shared forward already holds
    their first tokens (`Reader.from_gold`), so fewer tokens are decoded one by one, and the replies
    are still generate's. A batch with a row whose gold differs from its first token decodes them all."""
    model, tokenizer, adapter = planted_knobs()
    adapter.set_vector([0.7, 2.5, -0.4])
    prompts = ["Once upon a time", "The cat sat on the", "One two three", "a raw prompt with no chat template"]
    expected = generate(model, tokenizer, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, seed=0)
    assert expected.completion_mask.all()  # no reply stops early: every step below is decoded or read
    golds = list(expected.completions)
    for k in range(3):  # the reply's text gives back its tokens
        assert tokenizer(golds[k], add_special_tokens=False)["input_ids"] == expected.completion_ids[k].tolist()
    golds[3] = "zzz" + golds[3]  # the second batch: row 3's gold is not its reply
    assert tokenizer(golds[3], add_special_tokens=False)["input_ids"][0] != int(expected.completion_ids[3, 0])
    gold = GoldSet(model, tokenizer, list(zip(prompts, golds)), batch_size=2)
    reader = Reader(model, tokenizer, prompts, gold, max_new_tokens=NEW_TOKENS, batch_size=2)
    steps = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: steps.append(kwargs["input_ids"].shape[1] == 1), with_kwargs=True)
    try:
        with gpu_stand_in():  # no tensor made off the model's device
            now = reader()
    finally:
        handle.remove()
    assert now.replies == expected.completions
    assert reader.from_gold == [NEW_TOKENS - 1, 0]  # batch 0: nothing left to decode one token at a time
    assert sum(steps) == sum(NEW_TOKENS - 1 - m for m in reader.from_gold)  # one decoding step per token not read


def test_bad_input_is_refused():
    model, tokenizer, adapter = planted_knobs()
    gold = GoldSet(model, tokenizer, EXAMPLES)
    with pytest.raises(TypeError, match="gold must be a GoldSet"):
        Reader(model, tokenizer, PROMPTS, EXAMPLES, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        Reader(model, tokenizer, [], gold, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        Reader(model, tokenizer, PROMPTS, gold, max_new_tokens=0)
    base = Reader(model, tokenizer, PROMPTS, gold, max_new_tokens=1)().activity
    with pytest.raises(ValueError, match="give one base per batch"):
        attention_shift(base, base + base)
    other = Reader(model, tokenizer, PROMPTS[:2], GoldSet(model, tokenizer, EXAMPLES[:2]), max_new_tokens=1)()
    with pytest.raises(ValueError, match="measure the base on the same prompts"):
        attention_shift(other.activity, base)
    with pytest.raises(ValueError, match="the prompts make 2"):
        head_effects(model, tokenizer, adapter, PROMPTS, confirm=0, batch_size=2, base_activity=base)


def _read(model, tokenizer, adapter):
    gold = GoldSet(model, tokenizer, EXAMPLES)
    reader = Reader(model, tokenizer, PROMPTS, gold, max_new_tokens=3)
    with adapter.disabled():
        base = reader()
    now = reader()
    return base, now, attention_shift(base.activity, now.activity)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_readout_keeps_to_the_models_device(gpu_stand_in, dtype):
    model, tokenizer, adapter = planted_knobs(dtype)
    expected = _read(model, tokenizer, adapter)
    with gpu_stand_in():
        base, now, shift = _read(model, tokenizer, adapter)
    assert now.logprobs.dtype == np.float32 and np.array_equal(now.logprobs, expected[1].logprobs)
    assert now.replies == expected[1].replies and shift.equals(expected[2])
    assert now.activity[0].patterns[1].dtype == torch.float32
    assert shift["js"].idxmax() == PLANTED


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_readout_on_cuda(dtype):
    model, tokenizer, adapter = planted_knobs(dtype)
    base, now, shift = _read(model.to("cuda"), tokenizer, adapter)
    assert now.activity[0].patterns[1].is_cuda and now.logprobs.dtype == np.float32
    assert shift["js"].idxmax() == PLANTED
    assert adapter.vector()[KEY] == 6.0
