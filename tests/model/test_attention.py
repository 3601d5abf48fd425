"""tinylab/model/attention.py: the rows `AttentionBlock.rows` names are the rows the model's own attention
reads as that head's query, key and value, on every layout it recognises."""

import pytest
import torch
from testkit import MIXED_NORM_ARCH, OTHER_ARCHS, arch_model

from tinylab.model.attention import attention_blocks, eager_attention, observe_heads
from tinylab.model.tiny import TINY_ARCHS


def _observe(model, blocks, ids, layer):
    with torch.no_grad(), eager_attention(model), observe_heads(blocks) as (patterns, outputs):
        model(input_ids=ids)
    return patterns[layer][0], outputs[layer][0]  # [H, T, T], [T, H, d]


def _moved(a, b, dim):
    """Which heads (along `dim`) differ between a and b by more than rounding."""
    diff = (a - b).abs().movedim(dim, 0).flatten(1).amax(1)
    return set((diff > 1e-5).nonzero().flatten().tolist())


@pytest.mark.parametrize("arch", TINY_ARCHS + OTHER_ARCHS)
def test_each_part_of_a_heads_rows_moves_what_that_part_reads(arch):
    """Shifting the output rows `rows("q")` names for query head h (in the first layer) moves head h's
    pattern and output only; `rows("k")` for its KV head moves the patterns and outputs of that KV
    group only; `rows("v")` moves no pattern and the outputs of that group only. A layout whose rows
    were off by a head, or had keys and values swapped, fails here."""
    model, tokenizer = arch_model(arch)
    blocks = attention_blocks(model)
    block = blocks[0]
    head = block.n_heads - 1
    group = {h for h in range(block.n_heads) if h // block.group == head // block.group}
    ids = tokenizer(["Once upon a time there was a cat"], return_tensors="pt").input_ids
    base_pattern, base_output = _observe(model, blocks, ids, block.layer)
    expected = {"q": ({head}, {head}), "k": (group, group), "v": (set(), group)}  # (patterns, outputs) moved
    for part, (want_patterns, want_outputs) in expected.items():
        attr, rows = block.rows(part)
        unit = rows[head if part == "q" else head // block.group]  # [d]
        # [T, d], different per token: a key shift the same at every token would not move a softmax
        shift = torch.randn(ids.shape[1], len(unit), generator=torch.Generator().manual_seed(0))

        def move(module, args, out, unit=unit, shift=shift):
            out = out.clone()
            out[..., unit] += shift.to(out.dtype)
            return out

        handle = getattr(block.module, attr).register_forward_hook(move)
        try:
            pattern, output = _observe(model, blocks, ids, block.layer)
        finally:
            handle.remove()
        assert _moved(pattern, base_pattern, 0) == want_patterns, (part, block.layout)
        assert _moved(output, base_output, 1) == want_outputs, (part, block.layout)


@pytest.mark.parametrize("arch", ["qwen3", "gemma", MIXED_NORM_ARCH])
def test_a_norm_over_all_heads_is_named_and_carries_one_heads_query_to_all(arch):
    """OLMo2 normalizes all heads' queries together: shifting one head's query rows moves every head's
    pattern, and `cross_head_norms` names q_norm and k_norm. Qwen3's norm is per head (over head_dim):
    nothing named, and only that head moves. Gemma has no such norm."""
    model, tokenizer = arch_model(arch)
    blocks = attention_blocks(model)
    block, head = blocks[0], 0
    ids = tokenizer(["Once upon a time there was a cat"], return_tensors="pt").input_ids
    base_pattern, _ = _observe(model, blocks, ids, block.layer)
    attr, rows = block.rows("q")
    handle = getattr(block.module, attr).register_forward_hook(lambda m, a, out: out + torch.zeros_like(out).index_fill(
        -1, rows[head], 1.0) * torch.arange(out.shape[-2], dtype=out.dtype)[:, None])
    try:
        pattern, _ = _observe(model, blocks, ids, block.layer)
    finally:
        handle.remove()
    mixes = arch == MIXED_NORM_ARCH
    assert [b.cross_head_norms() for b in blocks] == [["q_norm", "k_norm"] if mixes else []] * len(blocks)
    assert _moved(pattern, base_pattern, 0) == (set(range(block.n_heads)) if mixes else {head})
