"""Which attention heads did the trained scalars change? Three kinds of evidence per (layer, head).

1. Weight space: the norm of the update U diag(S) R Vh restricted to the head's slice (rows of
   q_proj for the head, rows of k_proj / v_proj for its KV group, columns of o_proj for the head;
   the same rows of a fused qkv map: `tinylab.model.attention` says where they are),
   relative to the norm of the same slice of the frozen weight. Computed from the factors through
   (r, r) Gram matrices: no (out, in) update is ever built.
2. Activation space: base (adapter disabled) vs adapted on the same prompts, with eager attention
   switched on for the measurement: the mean Jensen-Shannon divergence (bits, 0..1) of the head's
   attention rows over the real (unpadded) query positions, and the relative change of the head's
   output (its slice of the input of o_proj, read by a forward pre-hook).
3. Causal: the drop of a metric when the update's contribution to one head is removed: the rows
   of q_proj and the columns of o_proj for the head, and the rows of k_proj / v_proj for its KV
   group (shared with the group's other query heads: k and v are computed once per group). The
   metric is the mean per-token log-probability of reference answers, or with a `task`, its mean
   reward on greedy replies. A first-order estimate from head gates (`gate_grad`) ranks all
   heads; the top `confirm` of them are measured by real ablation (`ablation`). Where a norm spans
   the heads (OLMo2's q_norm), removing one head's update reaches the others: a warning says so.

Hooks only observe (`tinylab.model.attention`: added in context managers, removed in `finally`); the
ablation (`tinylab.analysis.head_ablation`) swaps the adapted modules for gated copies and puts the
originals back in `finally`. Everything runs on the model's device and in its dtype; the sums
behind each measure are fp32 and the returned tensors and tables are on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from tinylab import tasks
from tinylab.adapter.attach import TinyLoRA, check_adapter
from tinylab.analysis.head_ablation import Scorer, ablation_gates, adapted_module, gated
from tinylab.basics.checks import check_int, is_int
from tinylab.model.attention import (
    AttentionBlock,
    attention_block,
    attention_blocks,
    eager_attention,
    observe_heads,
)
from tinylab.model.batch import left_pad, pad_token_id, prompt_rows
from tinylab.model.device import model_device
from tinylab.model.eval_mode import eval_mode

__all__ = [
    "Ablation",
    "EVIDENCE",
    "HeadActivity",
    "HeadEffects",
    "ablate_heads",
    "attention_shift",
    "eager_attention",
    "forward_last",
    "head_activity",
    "head_effects",
    "measuring",
]

EVIDENCE = ("weight", "js", "output_change", "gate_grad", "ablation")


class HeadEffects(NamedTuple):
    """Per-head evidence: `table` is indexed by (layer, head), one column per measure.

    Columns: kv_group; weight (all adapted slices together), weight_q/_k/_v/_o (NaN where the
    module is not adapted); js; output_change; gate_grad (first-order estimate of `ablation`, in
    the units of the log-probability objective); ablation (metric drop, NaN for heads not
    confirmed); ablation_share (ablation / (adapted - base)).
    """

    table: pd.DataFrame
    metric: str | None  # "logprob", "reward", or None when no answers were given
    adapted: float  # the metric with the adapter on
    base: float  # the metric with the adapter disabled

    def top(self, column: str = "weight", k: int = 5) -> list[tuple[int, int]]:
        """Up to k (layer, head) pairs with the largest |column|; NaN and exact zeros are left out."""
        if column not in self.table.columns:
            raise ValueError(f"column={column!r} is not in the table; allowed: {list(self.table.columns)}")
        ranked = self.table[column].abs().dropna().sort_values(ascending=False, kind="stable")
        return [(int(layer), int(head)) for layer, head in ranked[ranked > 0].index[:k]]

    def agreement(self, k: int = 5, columns: Sequence[str] = EVIDENCE) -> pd.DataFrame:
        """Size of the overlap of the top-k heads between each pair of measures (k on the diagonal)."""
        tops = {c: set(self.top(c, k)) for c in columns}
        return pd.DataFrame({a: {b: len(tops[a] & tops[b]) for b in columns} for a in columns})


class HeadActivity(NamedTuple):
    """What every head did on one batch of prompts: per layer its attention weights [B, H, T, T]
    and outputs [B, T, H, d] (fp32, on the block's device), and the batch's mask [B, T] (0 on the
    left padding). Reuse one as the base of `attention_shift` or `head_effects(base_activity=...)`."""

    patterns: dict[int, torch.Tensor]
    outputs: dict[int, torch.Tensor]
    mask: torch.Tensor

    def first(self, positions: int) -> HeadActivity:
        """The first `positions` tokens only: in a forward of prompt + continuation, the prompt's
        own activity (attention is causal, so later tokens change nothing before them)."""
        return HeadActivity({k: p[:, :, :positions, :positions] for k, p in self.patterns.items()},
                            {k: o[:, :positions] for k, o in self.outputs.items()}, self.mask[:, :positions])


class Ablation(NamedTuple):
    """The metric with the update removed from some heads, next to the adapted and base values."""

    heads: list[tuple[int, int]]
    metric: str  # "logprob" or "reward"
    ablated: float
    adapted: float
    base: float

    @property
    def share(self) -> float:
        """Share of the adapter's gain (adapted - base) that the ablation removes."""
        gain = self.adapted - self.base
        return (self.adapted - self.ablated) / gain if gain != 0 else math.nan


# ---------------------------------------------------------------------------------------------
# Switches and tokens


@contextlib.contextmanager
def measuring(model: nn.Module, adapter: TinyLoRA | None):
    """Eval mode and an unmerged adapter inside; the previous state after. An adapter attached to
    another model, or removed, is `check_adapter`'s ValueError."""
    if adapter is not None:
        check_adapter(adapter, model)
    with eval_mode(model), (adapter.unmerged() if adapter is not None else contextlib.nullcontext()):
        yield


def forward_last(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1)


# ---------------------------------------------------------------------------------------------
# 1. Weight space


@torch.no_grad()
def _weight_norms(adapter: TinyLoRA, block: AttentionBlock) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """part ("q", "k", "v", "o") -> (squared update norm, squared weight norm) per query head [H] (k, v: of
    the head's group), fp32 on the weights' device. The head's rows of q/k/v and columns of the output map
    are `block.rows` and `block.maps`' (fused maps are sliced the same way)."""
    H, d, group = block.n_heads, block.head_dim, block.group
    found = {}
    for part in ("q", "k", "v", "o"):
        m = adapted_module(adapter, block, block.maps["qkvo".index(part)])
        if m is None:
            continue
        US = (m.U.float() * m.S.float()) @ m.R().float()  # (out, r): U diag(S) R
        Vh, W = m.Vh.float(), m.base.weight.float()  # (r, in), (out, in)
        if part == "o":  # columns of the head: ||US Vh[:, cols]||^2
            B = Vh.unflatten(1, (H, d))  # (r, H, d)
            upd = torch.einsum("rhd,rs,shd->h", B, US.T @ US, B)  # [H]
            own = W.unflatten(1, (H, d)).pow(2).sum((0, 2))  # [H]
        else:  # rows of the head (q) or of its KV group (k, v): ||US[rows] Vh||^2
            rows = block.rows(part)[1].to(US.device)  # [H or KV, d]
            A = US[rows]  # (heads or groups, d, r)
            upd = torch.einsum("hdr,rs,hds->h", A, Vh @ Vh.T, A)  # [H or KV]
            own = W[rows].pow(2).sum((1, 2))  # [H or KV]
            if part != "q":
                upd, own = upd.repeat_interleave(group), own.repeat_interleave(group)  # [H]
        found[part] = (upd.clamp(min=0), own)
    return found


# ---------------------------------------------------------------------------------------------
# 2. Activation space


def _js_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits along the last axis (0 <= js <= 1)."""
    m = 0.5 * (p + q)
    kl_p = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_q = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return (0.5 * (kl_p + kl_q) / math.log(2)).clamp(min=0)


def _observed(patterns: dict, outputs: dict, mask: torch.Tensor) -> HeadActivity:
    return HeadActivity(dict(patterns), dict(outputs), mask)


def _prompt_batches(model, tokenizer, prompts, batch_size) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rows, device, pad = prompt_rows(tokenizer, prompts), model_device(model), pad_token_id(tokenizer)
    return [left_pad(rows[i:i + batch_size], pad, device) for i in range(0, len(rows), batch_size)]  # [B, T] each


@torch.no_grad()
def head_activity(model: nn.Module, tokenizer, prompts: Sequence, *, batch_size: int = 8) -> list[HeadActivity]:
    """The heads of the model as it is (with an adapter: inside `adapter.disabled()` for the base) on
    `prompts`, one HeadActivity per batch of `batch_size`, measured with eager attention."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (strings, chat messages or Examples)")
    prompts = [p.prompt if hasattr(p, "prompt") else p for p in prompts]
    check_int("batch_size", batch_size, low=1)
    found = []
    with eval_mode(model), eager_attention(model), observe_heads(attention_blocks(model)) as (patterns, outputs):
        for ids, mask in _prompt_batches(model, tokenizer, prompts, batch_size):
            forward_last(model, ids, mask)
            found.append(_observed(patterns, outputs, mask))
    return found


def _shift_sums(sums: dict, base: HeadActivity, now: HeadActivity) -> None:
    """Add one batch's JS divergence and output change per head to `sums` (layer -> [4, H] fp32)."""
    if not torch.equal(base.mask.cpu(), now.mask.cpu()):
        raise ValueError(f"a base batch with mask {tuple(base.mask.shape)} does not match the batch "
                         f"{tuple(now.mask.shape)}: measure the base on the same prompts and batch_size")
    for layer, p1 in now.patterns.items():
        (p0, o0), o1 = (base.patterns[layer], base.outputs[layer]), now.outputs[layer]
        if layer not in sums:  # fp32 sums on the block's device (MPS has no fp64)
            sums[layer] = torch.zeros(4, p1.shape[1], dtype=torch.float32, device=p1.device)  # [4, H]
        s, valid = sums[layer], now.mask.bool().to(p1.device)  # [4, H], [B, T]
        js = _js_bits(p0, p1).permute(0, 2, 1)[valid]  # [N, H]
        s[0] += js.sum(0)
        s[1] += js.shape[0]
        s[2] += (o1 - o0)[valid].pow(2).sum((0, 2))  # [H]
        s[3] += o0[valid].pow(2).sum((0, 2))  # [H]


def attention_shift(base: Sequence[HeadActivity], now: Sequence[HeadActivity]) -> pd.DataFrame:
    """Per (layer, head), `now` against `base`, batch by batch on the same prompts: js, the mean
    Jensen-Shannon divergence (bits) of the attention rows over the real query positions, and
    output_change, the relative change of the head's output (`head_effects`' columns of that name)."""
    if len(base) != len(now) or not now:
        raise ValueError(f"got {len(base)} base and {len(now)} batches of activity; give one base per batch")
    sums: dict[int, torch.Tensor] = {}
    for b, n in zip(base, now):
        _shift_sums(sums, b, n)
    return _shift_table(sums)


def _shift_table(sums: dict) -> pd.DataFrame:
    rows = []
    for layer in sorted(sums):
        s = sums[layer].cpu().double()  # [4, H]
        change = s[2].sqrt() / s[3].sqrt().clamp(min=1e-30)  # [H]
        rows += [(layer, h, float(s[0, h] / s[1, h]), float(change[h])) for h in range(s.shape[1])]
    return pd.DataFrame(rows, columns=["layer", "head", "js", "output_change"]).set_index(["layer", "head"])


@torch.no_grad()
def _activation_shift(model, tokenizer, adapter, blocks, prompts, batch_size, base) -> pd.DataFrame:
    """js and output_change per (layer, head): adapted against the base (measured here unless given)."""
    batches = _prompt_batches(model, tokenizer, prompts, batch_size)
    if base is not None and len(base) != len(batches):
        raise ValueError(f"base has {len(base)} batches of activity, the prompts make {len(batches)} "
                         f"(batch_size={batch_size}): measure it with head_activity on the same prompts")
    sums: dict[int, torch.Tensor] = {}  # batch by batch: no batch's activity is kept after its sums
    with eager_attention(model), observe_heads(blocks) as (patterns, outputs):
        for k, (ids, mask) in enumerate(batches):
            if base is None:
                with adapter.disabled():
                    forward_last(model, ids, mask)
            before = _observed(patterns, outputs, mask) if base is None else base[k]
            forward_last(model, ids, mask)
            _shift_sums(sums, before, _observed(patterns, outputs, mask))
    return _shift_table(sums)


# ---------------------------------------------------------------------------------------------
# Public entry points


def _check(model, adapter, prompts, answers, task):
    check_adapter(adapter, model)
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (strings, chat messages or Examples)")
    if answers is None and all(hasattr(p, "prompt") and hasattr(p, "answer") for p in prompts):
        answers = [p.answer for p in prompts]
    prompts = [p.prompt if hasattr(p, "prompt") else p for p in prompts]
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"got {len(answers)} answers for {len(prompts)} prompts; give one answer per prompt")
    if task is not None and answers is None:
        raise ValueError("a task needs answers to score replies: pass answers=... or Examples")
    if task is not None:
        task = tasks.resolve(task)
    return prompts, (None if answers is None else [str(a) for a in answers]), task


def _warn_if_norms_mix_heads(blocks: Sequence[AttentionBlock]) -> None:
    """Say so when removing one head's update also reaches other heads through a shared norm."""
    mixed = {(b.layer, attr) for b in blocks for attr in b.cross_head_norms()}
    if mixed:
        names = sorted({attr for _, attr in mixed})
        warnings.warn(f"{', '.join(names)} of {len({layer for layer, _ in mixed})} layer(s) normalize all heads "
                      "together: removing one head's update moves the other heads of its layer through that norm, so "
                      "the causal columns (gate_grad, ablation) are not confined to one head (the weight columns still are)",
                      stacklevel=3)


def head_effects(model: nn.Module, tokenizer, adapter: TinyLoRA, prompts: Sequence, *, answers=None, task=None,
                 confirm: int | str = 5, max_new_tokens: int | None = None, batch_size: int = 8,
                 base_activity: Sequence[HeadActivity] | None = None) -> HeadEffects:
    """Per-head evidence of what the adapter changed (see the module docstring for the measures).

    `prompts`: strings, chat messages, or `Example`s (whose answers are used when `answers` is None).
    `answers`: reference answers for the causal measures; without them those columns are NaN.
    `task`: a Task (or its name): the causal metric becomes its mean reward on greedy replies of
    `max_new_tokens` (default: the task's). `confirm`: how many heads, ranked by |gate_grad|, to
    ablate for real; "all" ablates every head. `base_activity`: the base model's `head_activity` on
    the same prompts and batch_size, measured once and reused (e.g. over many adapter vectors)
    instead of a base forward per call. The model's mode, merge state and attention implementation
    are restored afterwards.
    """
    prompts, answers, task = _check(model, adapter, prompts, answers, task)
    if not (confirm == "all" or (is_int(confirm) and confirm >= 0)):
        raise ValueError(f"confirm={confirm!r} is not allowed: an integer >= 0 or 'all'")
    check_int("batch_size", batch_size, low=1)
    blocks = attention_blocks(model)
    index = pd.MultiIndex.from_tuples([(b.layer, h) for b in blocks for h in range(b.n_heads)],
                                      names=["layer", "head"])
    table = pd.DataFrame(index=index, columns=["kv_group", *EVIDENCE[:1], "weight_q", "weight_k", "weight_v",
                                               "weight_o", *EVIDENCE[1:], "ablation_share"], dtype=float)
    metric, adapted, base = None, math.nan, math.nan
    with measuring(model, adapter):
        for b in blocks:
            rows = (b.layer, slice(None))
            table.loc[rows, "kv_group"] = np.arange(b.n_heads) // b.group
            norms = _weight_norms(adapter, b)
            for part, (upd, own) in norms.items():
                table.loc[rows, f"weight_{part}"] = (upd.sqrt() / own.sqrt().clamp(min=1e-30)).cpu().numpy()
            if norms:
                upd, own = (sum(v[i] for v in norms.values()) for i in (0, 1))
                table.loc[rows, "weight"] = (upd.sqrt() / own.sqrt().clamp(min=1e-30)).cpu().numpy()
            else:
                table.loc[rows, "weight"] = 0.0
        shift = _activation_shift(model, tokenizer, adapter, blocks, prompts, batch_size, base_activity)
        table["js"], table["output_change"] = shift["js"], shift["output_change"]
        if answers is not None:
            _warn_if_norms_mix_heads(blocks)
            scorer = Scorer(model, tokenizer, prompts, answers, task, max_new_tokens, batch_size)
            replies = scorer.replies() if scorer.metric == "reward" else None
            metric, adapted = scorer.metric, scorer.score(replies)
            with adapter.disabled():
                base = scorer.score()
            head_grads, kv_grads = scorer.gate_gradients(adapter, blocks, replies)
            for b in blocks:
                est = head_grads[b.layer] + kv_grads[b.layer].repeat_interleave(b.group)  # [H]
                table.loc[(b.layer, slice(None)), "gate_grad"] = est.numpy()
            chosen = table["gate_grad"].abs().sort_values(ascending=False).index
            chosen = chosen if confirm == "all" else chosen[:confirm]
            for layer, head in chosen:
                with gated(adapter, blocks, *ablation_gates(blocks, [(layer, head)])):
                    table.loc[(layer, head), "ablation"] = adapted - scorer.score()
            gain = adapted - base
            table["ablation_share"] = table["ablation"] / gain if gain != 0 else math.nan
    table["kv_group"] = table["kv_group"].astype(int)
    return HeadEffects(table, metric, adapted, base)


def ablate_heads(model: nn.Module, tokenizer, adapter: TinyLoRA, prompts: Sequence, heads: Sequence[tuple[int, int]],
                 *, answers=None, task=None, max_new_tokens: int | None = None, batch_size: int = 8,
                 reference: HeadEffects | None = None) -> Ablation:
    """The causal metric with the update removed from all of `heads` at once (same removal as
    `head_effects`: q rows and o columns of each head, k/v rows of its KV group).

    `reference`: a HeadEffects measured on the same prompts and metric; its adapted and base
    values are reused instead of measured again.
    """
    prompts, answers, task = _check(model, adapter, prompts, answers, task)
    if answers is None:
        raise ValueError("ablate_heads needs answers (or Examples) to score")
    blocks = attention_blocks(model)
    for layer, head in heads:
        attention_block(model, layer, head)  # a ValueError naming a head the model lacks
    heads = [(int(layer), int(head)) for layer, head in heads]
    _warn_if_norms_mix_heads(blocks)
    scorer = Scorer(model, tokenizer, prompts, answers, task, max_new_tokens, batch_size)
    if reference is not None and reference.metric != scorer.metric:
        raise ValueError(f"reference.metric={reference.metric!r} differs from this ablation's {scorer.metric!r}")
    with measuring(model, adapter):
        if reference is not None:
            adapted, base = reference.adapted, reference.base
        else:
            adapted = scorer.score()
            with adapter.disabled():
                base = scorer.score()
        with gated(adapter, blocks, *ablation_gates(blocks, heads)):
            ablated = scorer.score()
    return Ablation(heads, scorer.metric, ablated, adapted, base)
