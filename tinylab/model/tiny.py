"""Tiny randomly initialised models of real architectures, with a real offline tokenizer (tests, demos)."""

from __future__ import annotations

import copy

import torch

from tinylab.model.embedded import embedded_tokenizer

__all__ = ["TINY_ARCHS", "tiny_model"]

TINY_ARCHS = ("llama", "qwen2", "mistral", "gemma", "qwen3", "phi3", "opt", "gpt_neox", "gpt2")
"""phi3 fuses qkv_proj and gate_up_proj; OPT names its maps q/k/v/out_proj, fc1, fc2; GPT-NeoX
query_key_value, dense, dense_h_to_4h, dense_4h_to_h; GPT-2 c_attn, c_proj, c_fc, c_proj, as
transformers `Conv1D` layers, whose weights are stored transposed (see `tinylab.adapter.targets`)."""


_TOKENIZER_PROTOTYPE = []


def _tiny_tokenizer():
    """A fresh copy of the embedded model's real tokenizer (49,152 tokens, chat template).

    Loaded from its own cache folder once per process, then deep-copied (cheaper than a reload),
    so callers may change their copy (pad token, padding side) without touching anyone else's.
    """
    if not _TOKENIZER_PROTOTYPE:
        _TOKENIZER_PROTOTYPE.append(embedded_tokenizer())
    return copy.deepcopy(_TOKENIZER_PROTOTYPE[0])


def _without(fields: dict, *names: str) -> dict:
    return {k: v for k, v in fields.items() if k not in names}


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny model (2 layers, hidden 64) with a real offline tokenizer.

    `arch` is one of `TINY_ARCHS`; the same seed gives bit-identical weights (initialised in fp32,
    then cast to `dtype`: bf16 and fp16 stand in for what GPUs run). For tests and demos:
    it has the same module names as the real architecture, so adapters and analyses apply as is.
    """
    import transformers

    if arch not in TINY_ARCHS:
        raise ValueError(f"arch={arch!r} is not a tiny architecture; choose one of {list(TINY_ARCHS)}")
    tokenizer = _tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common, tie_word_embeddings=True),
        "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
        "gemma": lambda: transformers.GemmaConfig(**common, head_dim=16),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True),
        "phi3": lambda: transformers.Phi3Config(**common),
        "opt": lambda: transformers.OPTConfig(**_without(common, "intermediate_size", "num_key_value_heads"),
                                              ffn_dim=128, word_embed_proj_dim=64),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**_without(common, "num_key_value_heads")),
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=common["vocab_size"], n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=512,
            **{k: common[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}),
    }
    config = configs[arch]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(dtype).eval()
    return model, tokenizer
