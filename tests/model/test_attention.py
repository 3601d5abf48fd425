"""tinylab/model/attention.py: the rows `AttentionBlock.rows` names are the rows the model's own attention
reads as that head's query, key and value, on every layout it recognises."""

import pytest
import torch
from testkit import MIXED_NORM_ARCH, OTHER_ARCHS, arch_model, observe_layer, seeded_model
from torch import nn

from tinylab.model.attention import attention_blocks, eager_attention, observe_heads
from tinylab.model.tiny import TINY_ARCHS


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
    base_pattern, base_output = observe_layer(model, blocks, ids, block.layer)
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
            pattern, output = observe_layer(model, blocks, ids, block.layer)
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
    base_pattern, _ = observe_layer(model, blocks, ids, block.layer)
    attr, rows = block.rows("q")
    handle = getattr(block.module, attr).register_forward_hook(lambda m, a, out: out + torch.zeros_like(out).index_fill(
        -1, rows[head], 1.0) * torch.arange(out.shape[-2], dtype=out.dtype)[:, None])
    try:
        pattern, _ = observe_layer(model, blocks, ids, block.layer)
    finally:
        handle.remove()
    mixes = arch == MIXED_NORM_ARCH
    assert [b.cross_head_norms() for b in blocks] == [["q_norm", "k_norm"] if mixes else []] * len(blocks)
    assert _moved(pattern, base_pattern, 0) == (set(range(block.n_heads)) if mixes else {head})


def test_only_the_language_decoders_own_self_attention_counts():
    """BART as a causal LM: its decoder layers' cross-attention (`encoder_attn`, never run without an
    encoder) is not taken for the layer's block. Gemma 3 with its vision tower: only the language
    model's blocks, not the tower's, whose layers reuse the same numbers; Phi-4-multimodal's audio
    encoder inside the decoder: the decoder's own layers. DiffLlama's differential
    attention is not split (a head's output mixes two heads' patterns). HRM's two stacks of one class
    of layer share numbers and run in turn: numbered one after the other. A stack of another class
    beside the layers sharing their numbers has no order: refused by name rather than merged."""
    import transformers as tr

    small = dict(vocab_size=128, max_position_embeddings=64)
    bart = seeded_model(tr.BartConfig(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
                               encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, **small))
    blocks = attention_blocks(bart)
    assert [b.layer for b in blocks] == [0, 1]
    assert all(b.name.endswith(f"layers.{b.layer}.self_attn") for b in blocks)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, **small)
    tower = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    gemma3 = seeded_model(tr.Gemma3Config(
        text_config=dict(text, sliding_window=64, layer_types=["sliding_attention"] * 2),
        vision_config=dict(tower, num_hidden_layers=2, image_size=28, patch_size=14)))
    blocks = attention_blocks(gemma3)
    assert [b.layer for b in blocks] == [0, 1] and all("language_model" in b.name for b in blocks)
    with pytest.raises(ValueError, match="no attention block found"):
        attention_blocks(seeded_model(tr.DiffLlamaConfig(**text)))
    phi4 = seeded_model(tr.Phi4MultimodalConfig(**text, pad_token_id=0, audio_config=tower,
                                                vision_config=dict(tower, num_hidden_layers=2)))
    blocks = attention_blocks(phi4)  # its audio encoder sits inside the decoder, numbered from 0 too
    assert [b.name for b in blocks] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    hrm = seeded_model(tr.AutoConfig.for_model("hrm_text", **text, num_layers_per_stack=2))
    blocks = attention_blocks(hrm)  # its L and H stacks, each numbered from 0, run in turn: one after the other
    assert [(b.layer, b.name) for b in blocks] == [(0, "model.L_module.layers.0.self_attn"),
                                                    (1, "model.L_module.layers.1.self_attn"),
                                                    (2, "model.H_module.layers.0.self_attn"),
                                                    (3, "model.H_module.layers.1.self_attn")]
    llama = seeded_model(tr.LlamaConfig(**text))
    side = type("Side", (nn.Module,), {})  # a stack beside the layers, of another class: no order between them
    llama.model.side = nn.ModuleList([side() for _ in range(2)])
    for i, layer in enumerate(llama.model.side):
        layer.self_attn = type(llama.model.layers[0].self_attn)(llama.config, layer_idx=i)
    with pytest.raises(ValueError, match=r"layer 0 has 2 attention blocks \(model.layers.0.self_attn, "
                                         r"model.side.0.self_attn\); the head analyses need one per layer number"):
        attention_blocks(llama)


def test_a_block_that_returns_no_attention_weights_is_named():
    """A block of a known layout that returns no weights (here: a hook drops them, as linear attention
    does) is named, instead of failing inside a hook."""
    import transformers as tr

    model = seeded_model(tr.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    blocks = attention_blocks(model)
    drop = blocks[1].module.register_forward_hook(lambda module, args, out: (out[0], None))
    try:
        with pytest.raises(ValueError, match="attention block of layer 1 .* returned no attention weights"):
            with torch.no_grad(), eager_attention(model), observe_heads(blocks):
                model(input_ids=torch.arange(5)[None])
    finally:
        drop.remove()


def _observed_vs_asked(model, language_model, ids):
    """(each layer's observed patterns [B, H, T, T], the same model's `output_attentions=True` ones)."""
    blocks = attention_blocks(model)
    with torch.no_grad(), eager_attention(model), observe_heads(blocks) as (patterns, _):
        model(input_ids=ids, use_cache=False)
    with torch.no_grad(), eager_attention(model):
        asked = language_model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    return [patterns[b.layer] for b in blocks], list(asked)


def test_a_block_that_returns_its_weights_only_when_asked_is_asked():
    """TrOCR's and MVP's decoder blocks (BART-style) return their attention weights only with
    `output_attentions=True`: observing their heads asks them, and sees the patterns the model itself
    returns when asked."""
    import transformers as tr

    ids = torch.tensor([[5, 9, 2, 7, 7, 3]])
    for config in (tr.TrOCRConfig(vocab_size=128, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                  decoder_ffn_dim=64, max_position_embeddings=64),
                   tr.MvpConfig(vocab_size=128, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                decoder_ffn_dim=64, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64,
                                max_position_embeddings=64)):
        model = seeded_model(config)
        observed, asked = _observed_vs_asked(model, model, ids)
        assert len(observed) == len(asked) == 2
        for mine, theirs in zip(observed, asked):
            assert mine.shape == (1, 4, 6, 6)
            torch.testing.assert_close(mine, theirs.float())


def test_eager_attention_reaches_a_text_model_whose_parent_already_says_eager():
    """GOT-OCR2's own config says "eager" while its text model's config says "sdpa": eager attention
    switches the text model too (its blocks return their weights) and gives every config its own
    setting back afterwards."""
    import transformers as tr

    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    vision = dict(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16, mlp_dim=32, global_attn_indexes=[0])
    model = seeded_model(tr.GotOcr2Config(text_config=text, vision_config=vision, image_token_index=127))
    model.config.text_config._attn_implementation = "sdpa"
    model.config._attn_implementation_internal = "eager"
    before = [(c, c._attn_implementation) for c in (model.config, model.config.text_config, model.config.vision_config)]
    observed, asked = _observed_vs_asked(model, model.model.language_model, torch.tensor([[5, 9, 2, 7]]))
    for mine, theirs in zip(observed, asked):
        torch.testing.assert_close(mine, theirs.float())
    assert [(c, c._attn_implementation) for c, _ in before] == before


def test_a_hybrid_models_blocks_carry_their_own_layer_numbers():
    """Zamba2's attention block, shared by its hybrid layers, says layer_idx=-1: its layer is the one
    its name holds (as the adapter's plan numbers it). Asking for a layer without softmax attention
    (Qwen3-Next's linear-attention layer 0) names the layers that have a block."""
    import transformers as tr

    from tinylab.adapter.config import TinyLoRAConfig
    from tinylab.adapter.targets import plan_modules
    from tinylab.model.attention import attention_block

    zamba2 = seeded_model(tr.Zamba2Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, attention_head_dim=16, kv_channels=16, mamba_d_state=16,
        layers_block_type=["mamba", "hybrid"]))
    blocks = attention_blocks(zamba2)
    assert [(b.layer, b.name) for b in blocks] == [(1, "model.layers.1.shared_transformer.self_attn")]
    planned = {m.layer for m in plan_modules(zamba2, TinyLoRAConfig()) if m.name.startswith(blocks[0].name + ".")}
    assert planned == {1}
    hybrid, _ = arch_model("qwen3_next_hybrid")
    assert [b.layer for b in attention_blocks(hybrid)] == [1]
    with pytest.raises(ValueError, match=r"layer=0 has no attention block .* the layers that have one, 1\.\.1"):
        attention_block(hybrid, 0, 0)
