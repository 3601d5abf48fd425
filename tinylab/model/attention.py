"""The attention blocks of a Hugging Face model, seen per head: their geometry, eager attention for a
measurement, and hooks that observe each head's pattern and output.

`tinylab.analysis.heads` (per-head evidence) and `tinylab.analysis.head_ablation` (removing the update from heads)
both stand on these. Hooks only observe: they are added in a context manager and removed in
`finally`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from tinylab.basics.checks import is_int

__all__ = ["AttentionBlock", "attention_block", "attention_blocks", "eager_attention", "head_layout", "observe_heads"]

_LAYER_RE = re.compile(r"\.(\d+)\.")


class AttentionBlock(NamedTuple):
    """Geometry of one attention block: query heads share key/value heads in groups of n_heads // n_kv."""

    layer: int
    name: str  # named_modules() name, e.g. model.layers.0.self_attn
    module: nn.Module
    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """Every block with q_proj, k_proj, v_proj, o_proj and head_dim, in layer order."""
    found = []
    for name, m in model.named_modules():
        if not all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            continue
        layer = getattr(m, "layer_idx", None)
        if layer is None:
            layer = int(_LAYER_RE.search(f".{name}.").group(1))
        d = m.head_dim
        found.append(AttentionBlock(layer, name, m, m.o_proj.in_features // d, m.k_proj.out_features // d, d))
    if not found:
        raise ValueError("no attention block with q_proj, k_proj, v_proj, o_proj and head_dim found in this model")
    return sorted(found, key=lambda b: b.layer)


def attention_block(model: nn.Module, layer: int, head: int) -> AttentionBlock:
    """The block of `layer`, after checking that it has a query head `head`."""
    blocks = {b.layer: b for b in attention_blocks(model)}
    if not is_int(layer) or int(layer) not in blocks:
        raise ValueError(f"layer={layer!r} is out of range: this model has layers {min(blocks)}..{max(blocks)}")
    block = blocks[int(layer)]
    if not is_int(head) or not 0 <= head < block.n_heads:
        raise ValueError(f"head={head!r} is out of range: layer {layer} has heads 0..{block.n_heads - 1}")
    return block


def _set_attention(model: nn.Module, implementation: str | None) -> None:
    if implementation == model.config._attn_implementation:
        return
    if implementation is not None and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Eager attention inside the block (attention weights are returned); the previous setting after."""
    previous = model.config._attn_implementation
    _set_attention(model, "eager")
    try:
        yield model
    finally:
        _set_attention(model, previous)


@contextlib.contextmanager
def observe_heads(blocks: Sequence[AttentionBlock]):
    """Per layer: the attention weights [B, H, T, T] and the head outputs [B, T, H, d] of the last
    forward, in fp32 on the block's device (needs `eager_attention` for the weights)."""
    patterns: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []

    def keep_pattern(layer):
        return lambda module, args, out: patterns.__setitem__(layer, out[1].detach().float())  # [B, H, T, T]

    def keep_output(layer, n_heads):
        return lambda module, args: outputs.__setitem__(
            layer, args[0].detach().float().unflatten(-1, (n_heads, -1)))  # [B, T, H, d]

    try:
        for b in blocks:
            handles.append(b.module.register_forward_hook(keep_pattern(b.layer)))
            handles.append(b.module.o_proj.register_forward_pre_hook(keep_output(b.layer, b.n_heads)))
        yield patterns, outputs
    finally:
        for h in handles:
            h.remove()


def head_layout(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) from the model's config."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        raise ValueError("the model's config has no num_attention_heads; cannot split weights per head")
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim
