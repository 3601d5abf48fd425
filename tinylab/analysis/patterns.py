"""Where each token of a prompt looks in one attention head, with the adapter off and on."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from tinylab.adapter.attach import TinyLoRA
from tinylab.analysis.heads import forward_last, measuring
from tinylab.model.attention import attention_block, eager_attention, observe_heads
from tinylab.model.batch import left_pad, pad_token_id, prompt_rows
from tinylab.model.device import model_device

__all__ = ["AttentionPatterns", "attention_patterns"]


class AttentionPatterns(NamedTuple):
    """One head's attention on one prompt: row i is where token i looks."""

    tokens: list[str]  # [T] each token decoded on its own
    base: torch.Tensor  # [T, T] with the adapter disabled (or the model as is without an adapter)
    adapted: torch.Tensor | None  # [T, T] with the adapter on; None without an adapter
    layer: int
    head: int


@torch.no_grad()
def attention_patterns(model: nn.Module, tokenizer, prompt, layer: int, head: int,
                       adapter: TinyLoRA | None = None) -> AttentionPatterns:
    """Where each token of `prompt` looks in (layer, head): base (adapter disabled) and adapted.

    Without an adapter, `base` is the model as it is and `adapted` is None. Both are fp32 on the CPU.
    """
    if hasattr(prompt, "prompt"):
        prompt = prompt.prompt
    block = attention_block(model, layer, head)
    layer, head = block.layer, int(head)
    rows = prompt_rows(tokenizer, [prompt])
    ids, mask = left_pad(rows, pad_token_id(tokenizer), model_device(model))  # [1, T]
    tokens = [tokenizer.decode([t]) for t in rows[0]]
    with measuring(model, adapter), eager_attention(model), observe_heads([block]) as (patterns, _):
        if adapter is None:
            forward_last(model, ids, mask)
            return AttentionPatterns(tokens, patterns[layer][0, head].cpu(), None, layer, head)
        with adapter.disabled():
            forward_last(model, ids, mask)
        base = patterns[layer][0, head].cpu()  # [T, T]
        forward_last(model, ids, mask)
        return AttentionPatterns(tokens, base, patterns[layer][0, head].cpu(), layer, head)
