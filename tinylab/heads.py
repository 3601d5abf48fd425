"""Which attention heads did the trained scalars change? Three kinds of evidence per (layer, head).

1. Weight space: the norm of the update U diag(S) R Vh restricted to the head's slice (rows of
   q_proj for the head, rows of k_proj / v_proj for its KV group, columns of o_proj for the head),
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
   heads; the top `confirm` of them are measured by real ablation (`ablation`).

Hooks only observe (added in context managers, removed in `finally`); the ablation swaps the
adapted modules for gated copies and puts the originals back in `finally`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from tinylab.adapter import TinyLoRA, TinyLoRALinear
from tinylab.rollout import completion_logprobs, generate, left_pad, pad_token_id, prompt_rows

__all__ = [
    "EVIDENCE",
    "Ablation",
    "AttentionPatterns",
    "HeadEffects",
    "ablate_heads",
    "attention_patterns",
    "eager_attention",
    "head_effects",
]

EVIDENCE = ("weight", "js", "output_change", "gate_grad", "ablation")
_LAYER_RE = re.compile(r"\.(\d+)\.")


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


class AttentionPatterns(NamedTuple):
    """One head's attention on one prompt: row i is where token i looks."""

    tokens: list[str]  # [T] each token decoded on its own
    base: torch.Tensor  # [T, T] with the adapter disabled (or the model as is without an adapter)
    adapted: torch.Tensor | None  # [T, T] with the adapter on; None without an adapter
    layer: int
    head: int


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


class _Block(NamedTuple):
    """Geometry of one attention block."""

    layer: int
    name: str  # named_modules() name, e.g. model.layers.0.self_attn
    module: nn.Module
    n_heads: int
    n_kv: int
    head_dim: int


def _blocks(model: nn.Module) -> list[_Block]:
    found = []
    for name, m in model.named_modules():
        if not all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            continue
        layer = getattr(m, "layer_idx", None)
        if layer is None:
            layer = int(_LAYER_RE.search(f".{name}.").group(1))
        d = m.head_dim
        found.append(_Block(layer, name, m, m.o_proj.in_features // d, m.k_proj.out_features // d, d))
    if not found:
        raise ValueError("no attention block with q_proj, k_proj, v_proj, o_proj and head_dim found in this model")
    return sorted(found, key=lambda b: b.layer)


def _block(model: nn.Module, layer: int, head: int) -> _Block:
    blocks = {b.layer: b for b in _blocks(model)}
    if layer not in blocks:
        raise ValueError(f"layer={layer!r} is out of range: this model has layers {min(blocks)}..{max(blocks)}")
    if not isinstance(head, int) or not 0 <= head < blocks[layer].n_heads:
        raise ValueError(f"head={head!r} is out of range: layer {layer} has heads 0..{blocks[layer].n_heads - 1}")
    return blocks[layer]


# ---------------------------------------------------------------------------------------------
# Switches: eager attention, measuring state


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
def _measuring(model: nn.Module, adapter: TinyLoRA | None):
    """Eval mode and an unmerged adapter inside; the previous state after."""
    was_training, was_merged = model.training, adapter is not None and adapter.merged
    model.eval()
    if was_merged:
        adapter.unmerge()
    try:
        yield
    finally:
        if was_merged:
            adapter.merge()
        model.train(was_training)


@contextlib.contextmanager
def _observed(blocks: Sequence[_Block]):
    """Per layer: the attention weights [B, H, T, T] and the head outputs [B, T, H, d] of the last forward."""
    patterns: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []

    def keep_pattern(layer):
        return lambda module, args, out: patterns.__setitem__(layer, out[1].detach().float())

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


# ---------------------------------------------------------------------------------------------
# Tokens


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1)


# ---------------------------------------------------------------------------------------------
# 1. Weight space


def _adapted(adapter: TinyLoRA, block: _Block, kind: str) -> TinyLoRALinear | None:
    m = getattr(block.module, kind)
    return m if isinstance(m, TinyLoRALinear) and m in dict(adapter.named_modules()).values() else None


@torch.no_grad()
def _weight_norms(adapter: TinyLoRA, block: _Block) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """kind -> (squared update norm, squared weight norm) per query head [H] (k, v: of the head's group)."""
    H, d, group = block.n_heads, block.head_dim, block.n_heads // block.n_kv
    found = {}
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
        m = _adapted(adapter, block, kind)
        if m is None:
            continue
        US = (m.U.float() * m.S.float()) @ m.R().float()  # (out, r): U diag(S) R
        Vh, W = m.Vh.float(), m.base.weight.float()  # (r, in), (out, in)
        if kind == "o_proj":  # columns of the head: ||US Vh[:, cols]||^2
            B = Vh.unflatten(1, (H, d))  # (r, H, d)
            upd = torch.einsum("rhd,rs,shd->h", B, US.T @ US, B)  # [H]
            own = W.unflatten(1, (H, d)).pow(2).sum((0, 2))  # [H]
        else:  # rows of the head (q) or of its KV group (k, v): ||US[rows] Vh||^2
            A = US.unflatten(0, (-1, d))  # (heads or groups, d, r)
            upd = torch.einsum("hdr,rs,hds->h", A, Vh @ Vh.T, A)  # [H or KV]
            own = W.unflatten(0, (-1, d)).pow(2).sum((1, 2))  # [H or KV]
            if kind != "q_proj":
                upd, own = upd.repeat_interleave(group), own.repeat_interleave(group)  # [H]
        found[kind] = (upd.clamp(min=0), own)
    return found


# ---------------------------------------------------------------------------------------------
# 2. Activation space


def _js_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits along the last axis (0 <= js <= 1)."""
    m = 0.5 * (p + q)
    kl_p = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_q = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return (0.5 * (kl_p + kl_q) / math.log(2)).clamp(min=0)


@torch.no_grad()
def _activation_shift(model, tokenizer, adapter, blocks, prompts, batch_size) -> tuple[dict, dict]:
    """layer -> mean JS divergence per head [H], and relative output change per head [H]."""
    rows = prompt_rows(tokenizer, prompts)
    sums = {b.layer: torch.zeros(4, b.n_heads, dtype=torch.float64) for b in blocks}  # js, rows, diff^2, base^2
    with eager_attention(model), _observed(blocks) as (patterns, outputs):
        for i in range(0, len(rows), batch_size):
            ids, mask = left_pad(rows[i:i + batch_size], pad_token_id(tokenizer))  # [B, T]
            with adapter.disabled():
                _forward(model, ids, mask)
            base = {k: (patterns[k], outputs[k]) for k in patterns}
            _forward(model, ids, mask)
            valid = mask.bool()  # [B, T]
            for b in blocks:
                (p0, o0), p1, o1 = base[b.layer], patterns[b.layer], outputs[b.layer]
                js = _js_bits(p0, p1).permute(0, 2, 1)[valid]  # [N, H]
                s = sums[b.layer]
                s[0] += js.sum(0).double()
                s[1] += js.shape[0]
                s[2] += (o1 - o0)[valid].pow(2).sum((0, 2)).double()  # [H]
                s[3] += o0[valid].pow(2).sum((0, 2)).double()  # [H]
    js = {k: (s[0] / s[1]).float() for k, s in sums.items()}
    change = {k: (s[2].sqrt() / s[3].sqrt().clamp(min=1e-30)).float() for k, s in sums.items()}
    return js, change


# ---------------------------------------------------------------------------------------------
# 3. Causal: gated updates, metrics, ablation


class _GatedUpdate(nn.Module):
    """A TinyLoRALinear whose update is scaled per output row and per input column (1 = unchanged).

    W' = W + diag(out_gate) U diag(S) R Vh diag(in_gate): same math as TinyLoRALinear.forward.
    """

    def __init__(self, inner: TinyLoRALinear, out_gate: torch.Tensor | None, in_gate: torch.Tensor | None):
        super().__init__()
        self.inner = inner
        self.out_gate, self.in_gate = out_gate, in_gate  # (out,) / (in,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.inner
        y = m.base(x)
        if not m.enabled or m.merged_R is not None:
            return y
        if self.in_gate is not None:
            x = x * self.in_gate.to(x.dtype)  # (..., in)
        M = (m.R().T * m.S.float()).to(x.dtype)  # (r, r): R^T diag(S)
        delta = F.linear(F.linear(x, m.Vh) @ M, m.U)  # (..., out)
        if self.out_gate is not None:
            delta = delta * self.out_gate.to(x.dtype)
        return y + delta


@contextlib.contextmanager
def _gated(adapter: TinyLoRA, blocks: Sequence[_Block], head_gates: dict, kv_gates: dict):
    """Swap the adapted q/k/v/o of each block for gated copies: q rows and o columns follow
    head_gates[layer] [H], k and v rows follow kv_gates[layer] [KV]. Originals back in `finally`."""
    swapped = []
    try:
        for b in blocks:
            if b.layer not in head_gates:
                continue
            per_head = head_gates[b.layer].repeat_interleave(b.head_dim)  # (H*d,)
            per_kv = kv_gates[b.layer].repeat_interleave(b.head_dim)  # (KV*d,)
            gates = {"q_proj": (per_head, None), "k_proj": (per_kv, None), "v_proj": (per_kv, None),
                     "o_proj": (None, per_head)}
            for kind, (out_gate, in_gate) in gates.items():
                m = _adapted(adapter, b, kind)
                if m is not None:
                    setattr(b.module, kind, _GatedUpdate(m, out_gate, in_gate))
                    swapped.append((b.module, kind, m))
        yield
    finally:
        for parent, kind, m in reversed(swapped):
            setattr(parent, kind, m)


def _ablation_gates(blocks: Sequence[_Block], heads: Sequence[tuple[int, int]]) -> tuple[dict, dict]:
    by_layer = {b.layer: b for b in blocks}
    head_gates, kv_gates = {}, {}
    for layer, head in heads:
        b = by_layer[layer]
        head_gates.setdefault(layer, torch.ones(b.n_heads))[head] = 0.0
        kv_gates.setdefault(layer, torch.ones(b.n_kv))[head // (b.n_heads // b.n_kv)] = 0.0
    return head_gates, kv_gates


class _Scorer:
    """The causal metric on fixed prompts: mean token log-prob of answers, or mean task reward."""

    def __init__(self, model, tokenizer, prompts, answers, task, max_new_tokens, batch_size):
        self.model, self.tokenizer, self.prompts, self.answers = model, tokenizer, list(prompts), list(answers)
        self.task, self.batch_size = task, batch_size
        self.metric = "reward" if task is not None else "logprob"
        self.max_new_tokens = max_new_tokens or getattr(task, "max_new_tokens", None) or 64

    def _teacher_batches(self, answers: Sequence[str]):
        rows = prompt_rows(self.tokenizer, self.prompts)
        conts = [self.tokenizer(a, add_special_tokens=False)["input_ids"] or [pad_token_id(self.tokenizer)]
                 for a in answers]
        for i in range(0, len(rows), self.batch_size):
            ids, mask = left_pad(rows[i:i + self.batch_size], pad_token_id(self.tokenizer))  # [B, P]
            chunk = conts[i:i + self.batch_size]
            width = max(len(c) for c in chunk)
            cont = torch.full((len(chunk), width), pad_token_id(self.tokenizer), dtype=torch.long)  # [B, L]
            cmask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, L]
            for j, c in enumerate(chunk):
                cont[j, :len(c)], cmask[j, :len(c)] = torch.tensor(c), 1
            yield torch.cat([ids, cont], 1), torch.cat([mask, cmask], 1), cmask

    def _rollout_batches(self, rollout):
        for i in range(0, len(rollout.completions), self.batch_size):
            rows = slice(i, i + self.batch_size)
            yield rollout.input_ids[rows], rollout.attention_mask[rows], rollout.completion_mask[rows]

    def _token_means(self, batches) -> Iterator[torch.Tensor]:
        for ids, mask, cmask in batches:
            lp = completion_logprobs(self.model, ids, mask, cmask)  # [B, L]
            yield lp.sum(1) / cmask.sum(1).clamp(min=1)  # [B]

    def replies(self):
        """Greedy replies (a Rollout) of the model as it is now."""
        return generate(self.model, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens,
                        temperature=0.0, seed=0, batch_size=self.batch_size)

    @torch.no_grad()
    def score(self, replies=None) -> float:
        """The metric now; `replies`: greedy replies already generated with the model in this state."""
        if self.metric == "logprob":
            return float(torch.cat(list(self._token_means(self._teacher_batches(self.answers)))).mean())
        replies = self.replies() if replies is None else replies
        rewards = [r for r in self.task.reward(replies.completions, self.answers) if r is not None]
        return float(sum(rewards) / len(rewards)) if rewards else math.nan

    def gate_gradients(self, adapter, blocks, replies=None) -> tuple[dict, dict]:
        """d(objective)/d(gates) at gates = 1. The objective is the mean token log-prob of the answers,
        or with a task, of the adapted model's greedy `replies` weighted by their reward."""
        if self.metric == "logprob":
            batches, weights = self._teacher_batches(self.answers), [1.0] * len(self.answers)
        else:
            replies = self.replies() if replies is None else replies
            batches = self._rollout_batches(replies)
            weights = [r or 0.0 for r in self.task.reward(replies.completions, self.answers)]
        head = {b.layer: torch.ones(b.n_heads, requires_grad=True) for b in blocks}
        kv = {b.layer: torch.ones(b.n_kv, requires_grad=True) for b in blocks}
        gates = [*head.values(), *kv.values()]
        grads = [torch.zeros_like(g) for g in gates]
        w = torch.tensor(weights) / len(weights)  # [N]
        with torch.enable_grad(), _gated(adapter, blocks, head, kv):
            start = 0
            for means in self._token_means(batches):
                objective = (means * w[start:start + len(means)]).sum()
                start += len(means)
                if objective.requires_grad:
                    for acc, g in zip(grads, torch.autograd.grad(objective, gates, allow_unused=True)):
                        if g is not None:
                            acc += g
        n = len(head)
        return dict(zip(head, grads[:n])), dict(zip(kv, grads[n:]))


# ---------------------------------------------------------------------------------------------
# Public entry points


def _check(model, adapter, prompts, answers, task):
    if not isinstance(adapter, TinyLoRA):
        raise TypeError(f"adapter must be a TinyLoRA (from apply_tinylora), got {type(adapter).__name__}")
    if not adapter.attached or adapter.model is not model:
        raise ValueError("adapter is not attached to this model: pass the handle apply_tinylora returned for it")
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (strings, chat messages or Examples)")
    if answers is None and all(hasattr(p, "prompt") and hasattr(p, "answer") for p in prompts):
        answers = [p.answer for p in prompts]
    prompts = [p.prompt if hasattr(p, "prompt") else p for p in prompts]
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"got {len(answers)} answers for {len(prompts)} prompts; give one answer per prompt")
    if task is not None and answers is None:
        raise ValueError("a task needs answers to score replies: pass answers=... or Examples")
    if isinstance(task, str):
        from tinylab import tasks

        task = tasks.get(task)
    return prompts, (None if answers is None else [str(a) for a in answers]), task


def head_effects(model: nn.Module, tokenizer, adapter: TinyLoRA, prompts: Sequence, *, answers=None, task=None,
                 confirm: int | str = 5, max_new_tokens: int | None = None, batch_size: int = 8) -> HeadEffects:
    """Per-head evidence of what the adapter changed (see the module docstring for the measures).

    `prompts`: strings, chat messages, or `Example`s (whose answers are used when `answers` is None).
    `answers`: reference answers for the causal measures; without them those columns are NaN.
    `task`: a Task (or its name): the causal metric becomes its mean reward on greedy replies of
    `max_new_tokens` (default: the task's). `confirm`: how many heads, ranked by |gate_grad|, to
    ablate for real; "all" ablates every head. The model's mode, merge state and attention
    implementation are restored afterwards.
    """
    prompts, answers, task = _check(model, adapter, prompts, answers, task)
    if not (confirm == "all" or (isinstance(confirm, int) and not isinstance(confirm, bool) and confirm >= 0)):
        raise ValueError(f"confirm={confirm!r} is not allowed: an integer >= 0 or 'all'")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed: an integer >= 1")
    blocks = _blocks(model)
    index = pd.MultiIndex.from_tuples([(b.layer, h) for b in blocks for h in range(b.n_heads)],
                                      names=["layer", "head"])
    table = pd.DataFrame(index=index, columns=["kv_group", *EVIDENCE[:1], "weight_q", "weight_k", "weight_v",
                                               "weight_o", *EVIDENCE[1:], "ablation_share"], dtype=float)
    metric, adapted, base = None, math.nan, math.nan
    with _measuring(model, adapter):
        for b in blocks:
            rows = (b.layer, slice(None))
            table.loc[rows, "kv_group"] = (torch.arange(b.n_heads) // (b.n_heads // b.n_kv)).numpy()
            norms = _weight_norms(adapter, b)
            for kind, (upd, own) in norms.items():
                table.loc[rows, f"weight_{kind[0]}"] = (upd.sqrt() / own.sqrt().clamp(min=1e-30)).numpy()
            if norms:
                upd, own = (sum(v[i] for v in norms.values()) for i in (0, 1))
                table.loc[rows, "weight"] = (upd.sqrt() / own.sqrt().clamp(min=1e-30)).numpy()
            else:
                table.loc[rows, "weight"] = 0.0
        js, change = _activation_shift(model, tokenizer, adapter, blocks, prompts, batch_size)
        for b in blocks:
            table.loc[(b.layer, slice(None)), "js"] = js[b.layer].numpy()
            table.loc[(b.layer, slice(None)), "output_change"] = change[b.layer].numpy()
        if answers is not None:
            scorer = _Scorer(model, tokenizer, prompts, answers, task, max_new_tokens, batch_size)
            replies = scorer.replies() if scorer.metric == "reward" else None
            metric, adapted = scorer.metric, scorer.score(replies)
            with adapter.disabled():
                base = scorer.score()
            head_grads, kv_grads = scorer.gate_gradients(adapter, blocks, replies)
            for b in blocks:
                est = head_grads[b.layer] + kv_grads[b.layer].repeat_interleave(b.n_heads // b.n_kv)  # [H]
                table.loc[(b.layer, slice(None)), "gate_grad"] = est.numpy()
            chosen = table["gate_grad"].abs().sort_values(ascending=False).index
            chosen = chosen if confirm == "all" else chosen[:confirm]
            for layer, head in chosen:
                with _gated(adapter, blocks, *_ablation_gates(blocks, [(layer, head)])):
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
    blocks = _blocks(model)
    heads = [(int(layer), int(head)) for layer, head in heads]
    for layer, head in heads:
        _block(model, layer, head)
    scorer = _Scorer(model, tokenizer, prompts, answers, task, max_new_tokens, batch_size)
    if reference is not None and reference.metric != scorer.metric:
        raise ValueError(f"reference.metric={reference.metric!r} differs from this ablation's {scorer.metric!r}")
    with _measuring(model, adapter):
        if reference is not None:
            adapted, base = reference.adapted, reference.base
        else:
            adapted = scorer.score()
            with adapter.disabled():
                base = scorer.score()
        with _gated(adapter, blocks, *_ablation_gates(blocks, heads)):
            ablated = scorer.score()
    return Ablation(heads, scorer.metric, ablated, adapted, base)


@torch.no_grad()
def attention_patterns(model: nn.Module, tokenizer, prompt, layer: int, head: int,
                       adapter: TinyLoRA | None = None) -> AttentionPatterns:
    """Where each token of `prompt` looks in (layer, head): base (adapter disabled) and adapted.

    Without an adapter, `base` is the model as it is and `adapted` is None.
    """
    if hasattr(prompt, "prompt"):
        prompt = prompt.prompt
    block = _block(model, layer, head)
    ids, mask = left_pad(prompt_rows(tokenizer, [prompt]), pad_token_id(tokenizer))  # [1, T]
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    with _measuring(model, adapter), eager_attention(model), _observed([block]) as (patterns, _):
        if adapter is None:
            _forward(model, ids, mask)
            return AttentionPatterns(tokens, patterns[layer][0, head].clone(), None, layer, head)
        with adapter.disabled():
            _forward(model, ids, mask)
        base = patterns[layer][0, head].clone()  # [T, T]
        _forward(model, ids, mask)
        return AttentionPatterns(tokens, base, patterns[layer][0, head].clone(), layer, head)
