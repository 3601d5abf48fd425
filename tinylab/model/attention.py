"""The attention blocks of a Hugging Face model, seen per head: their geometry, eager attention for a
measurement, and hooks that observe each head's pattern and output.

Where a head's numbers live in the block's linear maps (`AttentionBlock.rows`, `AttentionBlock.maps`):
the query rows of head h, the key and value rows of its KV group, and the columns h*d..(h+1)*d of the
output map (its input is the heads' outputs side by side). Five layouts are recognised:

    separate     q_proj, k_proj, v_proj; output o_proj, out_proj (Llama, Qwen, Mistral, Gemma, OPT,
                 GPT-J, GPT-Neo), dense (Phi) or Wo (ModernBERT's decoder); Wq, Wk, Wv, dense (CTRL)
    gated        the same maps, q_proj twice as tall: per query head, its query rows, then the rows
                 of the gate that scales its output (Qwen3-Next's and Qwen3.5's full attention; the
                 map is q_gate_proj in MiniCPM5); a head's "q" rows are both
    fused        qkv_proj: all query rows, then key rows, then value rows; output o_proj (Phi-3);
                 c_attn the same way, output c_proj (GPT-2's `Conv1D` maps; GPTBigCode's multi-query);
                 Wqkv the same way, output out_proj (MPT); GPT-1's c_attn and c_proj, whose block
                 names split_size and n_head instead of head_dim
    grouped      query_key_value: per key/value head, the query rows of its group of heads, then its
                 key rows, then its value rows; output dense (GPT-NeoX, BLOOM and Falcon: one head
                 per group, or one group for multi-query Falcon); c_attn the same way, output c_proj,
                 where the block says `multi_query=False` (GPTBigCode without multi-query)
    sharded      qkv_proj in `mp_num` equal shards, each the query rows of its H / mp_num heads, then
                 their value rows, then their key rows; output out_proj (CodeGen; no grouped queries)

`tinylab.analysis.heads` (per-head evidence) and `tinylab.analysis.head_ablation` (removing the update from heads)
both stand on these. Hooks only observe: they are added in a context manager and removed in
`finally`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from tinylab.basics.checks import is_int
from tinylab.model.conv1d import as_linear
from tinylab.model.decoder import language_decoder, layer_numbers, nearest_stacks, stack_of

__all__ = ["AttentionBlock", "attention_block", "attention_blocks", "eager_attention", "head_maps", "observe_heads"]


class AttentionBlock(NamedTuple):
    """Geometry of one attention block: query heads share key/value heads in groups of n_heads // n_kv."""

    layer: int
    name: str  # named_modules() name, e.g. model.layers.0.self_attn
    module: nn.Module
    n_heads: int
    n_kv: int
    head_dim: int
    layout: str = "separate"  # "separate", "gated", "fused", "grouped" or "sharded" (module docstring)
    maps: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")  # attribute of q, k, v, output
    shards: int = 1  # "sharded": the number of shards of the fused map (CodeGen's mp_num)

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv

    def cross_head_norms(self) -> list[str]:
        """Attributes of the block's norms that normalize several heads together (OLMo2's `q_norm` and
        `k_norm` over all heads' queries / keys): through them, a change in one head's rows moves the
        others, so removing one head's update is not confined to that head. Empty when every norm is
        per head (Qwen3's over head_dim; Cohere's per-head weights) or there is none."""
        found = []
        for attr, child in self.module.named_children():
            weight = getattr(child, "weight", None)
            if "norm" not in attr.lower() or not isinstance(weight, torch.Tensor):
                continue
            shape = getattr(child, "normalized_shape", None)  # nn.LayerNorm / nn.RMSNorm: what one norm spans
            span = int(torch.Size(shape).numel()) if shape is not None else (weight.numel() if weight.dim() == 1 else 0)
            if span > self.head_dim:
                found.append(attr)
        return found

    def rows(self, part: str) -> tuple[str, torch.Tensor]:
        """(attribute of the map, [units, head_dim] long CPU indices of its output rows) for part "q"
        (one unit per query head) or "k" / "v" (one per KV head): where each head's numbers are. The
        gated layout's "q" units are 2 * head_dim rows: the head's query rows, then its gate rows."""
        if part not in ("q", "k", "v"):
            raise ValueError(f"part={part!r} is not allowed: 'q', 'k' or 'v'")
        H, KV, d = self.n_heads, self.n_kv, self.head_dim
        i = "qkv".index(part)
        units = H if part == "q" else KV
        if self.layout == "gated" and part == "q":  # per query head: d query rows, then d gate rows
            return self.maps[0], torch.arange(units * 2 * d, device="cpu").view(units, 2 * d)
        if self.layout == "grouped":  # per KV head: its group's G query heads' rows, then k, then v
            G = self.group
            unit = torch.arange(units, device="cpu")[:, None]  # [units, 1]
            if part == "q":  # query head h: group h // G, place h % G in it
                start = (unit // G) * (G + 2) * d + (unit % G) * d
            else:
                start = unit * (G + 2) * d + (G + i - 1) * d  # k after the group's queries, then v
        elif self.layout == "sharded":  # per shard: its heads' q rows, then their v rows, then their k rows
            per = units // self.shards  # heads per shard (as many KV heads as query heads)
            unit = torch.arange(units, device="cpu")[:, None]  # [units, 1]
            start = (unit // per) * 3 * per * d + (0, 2, 1)[i] * per * d + (unit % per) * d
        else:  # separate (and gated k, v) maps start at 0; fused: q rows, then k, then v
            offset = 0 if self.layout in ("separate", "gated") else (0, H * d, (H + KV) * d)[i]
            start = offset + torch.arange(units, device="cpu")[:, None] * d  # [units, 1]
        return self.maps[i], start + torch.arange(d, device="cpu")[None, :]  # [units, d]


# (layout, attributes of q, k, v and the output map) in the order they are tried
_LAYOUTS = (
    ("separate", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("gated", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("gated", ("q_gate_proj", "k_proj", "v_proj", "o_proj")),
    ("separate", ("q_proj", "k_proj", "v_proj", "out_proj")),
    ("separate", ("q_proj", "k_proj", "v_proj", "dense")),
    ("separate", ("q_proj", "k_proj", "v_proj", "Wo")),
    ("separate", ("Wq", "Wk", "Wv", "dense")),
    ("fused", ("qkv_proj", "qkv_proj", "qkv_proj", "o_proj")),
    ("fused", ("c_attn", "c_attn", "c_attn", "c_proj")),
    ("fused", ("Wqkv", "Wqkv", "Wqkv", "out_proj")),
    ("grouped", ("c_attn", "c_attn", "c_attn", "c_proj")),
    ("grouped", ("query_key_value", "query_key_value", "query_key_value", "dense")),
    ("sharded", ("qkv_proj", "qkv_proj", "qkv_proj", "out_proj")),
)


def _as_map(module):
    """A Conv1D seen as a linear map (`as_linear`: in_features, out_features), anything else as is."""
    return (as_linear(module) if isinstance(module, nn.Module) else None) or module


def _block(name: str, m: nn.Module, layer: int | None) -> AttentionBlock | None:
    """The block's geometry if `m` is an attention block of a known layout whose sizes agree, else None.
    Not cross-attention (BART's `encoder_attn`, BERT's `crossattention`: a causal LM's text forward
    does not run it) nor differential attention (DiffLlama: a head's output mixes two heads' patterns
    and half-heads of values, so its rows and columns are not its own). `layer`: its layer number, None
    outside the numbered layers (then it is no block: its heads have no layer to be keyed by)."""
    d = getattr(m, "head_dim", None) or getattr(m, "head_size", None)
    if d is None and is_int(getattr(m, "split_size", None)) and is_int(getattr(m, "n_head", None)) and m.n_head > 0:
        d = m.split_size // m.n_head  # GPT-1: the heads' width and their number
    attr = name.rsplit(".", 1)[-1].lower()
    if not is_int(d) or d <= 0 or "cross" in attr or attr == "encoder_attn" or hasattr(m, "lambda_q1"):
        return None
    for layout, maps in _LAYOUTS:
        q, k, v, o = (_as_map(getattr(m, attr, None)) for attr in maps)
        if not all(hasattr(x, "out_features") and hasattr(x, "in_features") for x in (q, k, v, o)):
            continue
        H, shards = o.in_features // d, getattr(m, "mp_num", None) if layout == "sharded" else 1
        if not is_int(shards) or shards <= 0 or H % shards:
            continue  # qkv_proj with out_proj but no mp_num dividing the heads: a layout not known here
        if layout in ("separate", "gated"):
            KV = k.out_features // d
            sizes_agree = (q.out_features == (1 if layout == "separate" else 2) * H * d
                           and k.out_features == v.out_features == KV * d)
        else:  # fused or grouped: H query heads and KV key and value heads in one map
            if maps[0] == "c_attn" and (layout == "grouped") != (getattr(m, "multi_query", None) is False):
                continue  # GPTBigCode without multi-query splits c_attn per head; GPT-2 and multi-query do not
            KV = (q.out_features - H * d) // (2 * d)
            sizes_agree = q.out_features == (H + 2 * KV) * d and (layout != "sharded" or KV == H)
        if sizes_agree and o.in_features == H * d and KV > 0 and H % KV == 0:
            if layer is None:  # a block outside any numbered layer: no layer to key its heads by
                return None
            return AttentionBlock(layer, name, m, H, KV, d, layout, maps, int(shards))
    return None


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """Every attention block of a layout in the module docstring, in layer order, in the model's
    language decoder (`tinylab.model.decoder`: not the vision tower of a multimodal model, whose
    blocks would share the text layers' numbers).
    One block per layer: where stacks share layer numbers (an audio encoder inside the decoder), the
    stack nearest the top (shortest module path) is the decoder's own; stacks at the same depth made
    of one class of layer (HRM's, run in turn) are numbered one after another: a block's layer is the
    module plan's number of its name (`tinylab.model.decoder.layer_numbers`). Two blocks with one number left after that are a
    ValueError, as is a decoder with no block of a known layout."""
    prefix, decoder = language_decoder(model)
    number = layer_numbers(model)  # the module plan's numbering (not a block's layer_idx: Zamba2's shared one says -1)
    found = [block for name, m in decoder.named_modules()
             if (block := _block(full := f"{prefix}.{name}".strip("."), m, number(full))) is not None]
    if not found:
        raise ValueError("no attention block found in this model; allowed: a module with head_dim (or head_size, "
                         "or split_size and n_head) and q_proj (queries, or queries and gates, or q_gate_proj), "
                         "k_proj, v_proj with o_proj, out_proj, dense or Wo; qkv_proj with o_proj (or with out_proj "
                         "and mp_num shards); Wqkv with out_proj; c_attn with c_proj; or query_key_value with dense")
    if len({b.layer for b in found}) < len(found):  # layer numbers shared: keep the stack nearest the top
        own = nearest_stacks(b.name for b in found)
        nearest = [b for b in found if stack_of(b.name) in own]
        if len({b.layer for b in nearest}) < len(nearest):
            layer = next(b.layer for b in nearest if sum(c.layer == b.layer for c in nearest) > 1)
            names = [b.name for b in nearest if b.layer == layer]
            raise ValueError(f"layer {layer} has {len(names)} attention blocks ({', '.join(names)}); the "
                             "head analyses need one per layer number (allowed: a decoder whose layers each hold one "
                             "attention block)")
        found = nearest
    return sorted(found, key=lambda b: b.layer)


def head_maps(model: nn.Module) -> dict[str, tuple[AttentionBlock, tuple[str, ...]]]:
    """Module name -> (its attention block, the parts it holds: ("o",) for the output map, else some of
    "q", "k", "v"; all three in a fused map). Empty when the model has no block of a known layout."""
    try:
        blocks = attention_blocks(model)
    except ValueError:  # no block of a known layout: nothing to split per head
        return {}
    maps: dict[str, tuple[AttentionBlock, tuple[str, ...]]] = {}
    for b in blocks:
        for part, attr in zip("qkvo", b.maps):  # a fused map is named for q, k and v
            name = f"{b.name}.{attr}"
            maps[name] = (b, maps.get(name, (b, ()))[1] + (part,))
    return maps


def attention_block(model: nn.Module, layer: int, head: int) -> AttentionBlock:
    """The block of `layer`, after checking that it has a query head `head`."""
    blocks = {b.layer: b for b in attention_blocks(model)}
    if not is_int(layer) or int(layer) not in blocks:
        have = f"{min(blocks)}..{max(blocks)}" if len(blocks) == max(blocks) - min(blocks) + 1 else sorted(blocks)
        raise ValueError(f"layer={layer!r} has no attention block of a known layout; allowed: the layers that have "
                         f"one, {have} (a hybrid model's other layers hold linear attention or state-space mixers)")
    block = blocks[int(layer)]
    if not is_int(head) or not 0 <= head < block.n_heads:
        raise ValueError(f"head={head!r} is out of range: layer {layer} has heads 0..{block.n_heads - 1}")
    return block


def _attention_configs(model: nn.Module) -> list:
    """Every config an attention block of `model` may read its implementation from: the model's,
    its sub-configs' at any depth (a vision-language model's `text_config`) and those of its
    sub-models, parents before their sub-configs."""
    found: dict[int, object] = {}
    queue = [model.config] + [m.config for m in model.modules() if m is not model and hasattr(m, "config")
                              and hasattr(m.config, "_attn_implementation")]
    while queue:
        config = queue.pop(0)
        if id(config) not in found:
            found[id(config)] = config
            queue += [sub for key in getattr(config, "sub_configs", None) or {}
                      if (sub := getattr(config, key, None)) is not None]
    return list(found.values())


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Eager attention inside the block (attention weights are returned) in the model and in every
    sub-model (a model whose own config already says "eager" may hold a text model on "sdpa"); each
    config's previous setting after."""
    configs = _attention_configs(model)
    previous = [config._attn_implementation for config in configs]
    if any(implementation != "eager" for implementation in previous):
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            for config in configs:
                config._attn_implementation = "eager"
    try:
        yield model
    finally:
        for config, implementation in zip(configs, previous):  # each its own, not the parent's (the setter recurses)
            if "_attn_implementation_internal" in vars(config):
                config._attn_implementation_internal = implementation
            else:
                config._attn_implementation = implementation


def _asking_for_weights(module: nn.Module):
    """A forward pre-hook (with kwargs) that passes `output_attentions=True` to a block whose forward
    names that argument (BART-style blocks return their weights only when asked); None for blocks
    that take no such argument (transformers' attention interface returns them under eager)."""
    names = list(inspect.signature(module.forward).parameters)
    if "output_attentions" not in names:
        return None
    index = names.index("output_attentions")

    def ask(module, args, kwargs):
        if index < len(args):
            return args[:index] + (True,) + args[index + 1:], kwargs
        return args, {**kwargs, "output_attentions": True}
    return ask


class _Observed(dict):
    """Per layer, what the hooks saw; a layer whose block never ran is a ValueError that names it."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names

    def __missing__(self, layer):
        raise ValueError(f"the attention block of layer {layer} ({self.names.get(layer, 'not observed')}) did not run "
                         "in this forward; allowed: blocks on the model's text path (not an image encoder's)")


@contextlib.contextmanager
def observe_heads(blocks: Sequence[AttentionBlock]):
    """Per layer: the attention weights [B, H, T, T] and the head outputs [B, T, H, d] of the last
    forward, in fp32 on the block's device (needs `eager_attention` for the weights)."""
    names = {b.layer: b.name for b in blocks}
    patterns: dict[int, torch.Tensor] = _Observed(names)
    outputs: dict[int, torch.Tensor] = _Observed(names)
    handles = []

    def keep_pattern(layer):
        def keep(module, args, out):
            weights = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None  # GPT-1: a list
            if not isinstance(weights, torch.Tensor):
                raise ValueError(f"the attention block of layer {layer} ({type(module).__name__}) returned no attention "
                                 "weights under eager attention; allowed: blocks that return (output, weights), as "
                                 "transformers' softmax attention does (not linear attention)")
            patterns[layer] = weights.detach().float()  # [B, H, T, T]
        return keep

    def keep_output(layer, n_heads):
        return lambda module, args: outputs.__setitem__(
            layer, args[0].detach().float().unflatten(-1, (n_heads, -1)))  # [B, T, H, d]

    try:
        for b in blocks:
            if (ask := _asking_for_weights(b.module)) is not None:
                handles.append(b.module.register_forward_pre_hook(ask, with_kwargs=True))
            handles.append(b.module.register_forward_hook(keep_pattern(b.layer)))
            output_map = getattr(b.module, b.maps[3])
            handles.append(output_map.register_forward_pre_hook(keep_output(b.layer, b.n_heads)))
        yield patterns, outputs
    finally:
        for h in handles:
            h.remove()
