"""Removing the adapter's update from chosen attention heads, and the causal metric it is scored by.

The update's contribution to one head is the rows of q_proj and the columns of o_proj for the head,
and the rows of k_proj / v_proj for its KV group (shared with the group's other query heads: k and
v are computed once per group); in a fused qkv map, the same rows of it (`AttentionBlock.rows`).
`gated` swaps the adapted q/k/v/o for copies whose update is scaled per row and per column by gates
(1 = unchanged, 0 = removed) and puts the originals back in `finally`. The gates are in the model's
dtype on each block's device; their gradients at 1 are the first-order estimate of an ablation
(`Scorer.gate_gradients`, accumulated in fp32).

A head's rows reach only that head where the model keeps heads apart up to the attention. Models
that normalise queries or keys over all heads at once (OLMo2's q_norm and k_norm over heads x
head_dim) mix them: there, removing one head's q or k rows moves every head of the layer, and
an ablation or gate gradient reads the layer's heads together, not one head.

`Scorer` is the metric on fixed prompts: the mean per-token log-probability of reference answers,
or with a task, its mean reward on greedy replies.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tinylab import tasks
from tinylab.adapter.attach import TinyLoRA
from tinylab.adapter.layer import TinyLoRALinear, WrapsLinear
from tinylab.measures.gold import GoldSet, mean_logprob
from tinylab.model.attention import AttentionBlock
from tinylab.model.device import model_device
from tinylab.model.generation import completion_logprobs, generate

__all__ = ["GatedUpdate", "Scorer", "ablation_gates", "adapted_module", "gated", "unit_gates"]


def adapted_module(adapter: TinyLoRA, block: AttentionBlock, attr: str) -> TinyLoRALinear | None:
    """The block's map named `attr` (one of `block.maps`) if `adapter` adapts it, else None."""
    m = getattr(block.module, attr)
    return m if isinstance(m, TinyLoRALinear) and m in dict(adapter.named_modules()).values() else None


class GatedUpdate(WrapsLinear, nn.Module):
    """A TinyLoRALinear whose update is scaled per output row and per input column (1 = unchanged).

    W' = W + diag(out_gate) U diag(S) R Vh diag(in_gate): same math as TinyLoRALinear.forward.
    `out_rows`: pairs (rows, gate), long row indices and one gate per row, that make up out_gate (rows
    not named keep 1); out_gate is assembled in each forward, so every forward has its own graph.
    """

    def __init__(self, inner: TinyLoRALinear, out_rows=(), in_gate: torch.Tensor | None = None):
        super().__init__()
        self.inner = inner
        self.out_rows, self.in_gate = tuple(out_rows), in_gate  # ((rows [n], gate [n]), ...) / (in,)

    @property
    def base(self) -> nn.Module:
        return self.inner.base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.inner
        y = m.base(x)
        if not m.enabled or m.merged_R is not None:
            return y
        if self.in_gate is not None:
            x = x * self.in_gate.to(x.dtype)  # (..., in)
        M = (m.R().T * m.S.float()).to(x.dtype)  # (r, r): R^T diag(S)
        delta = F.linear(F.linear(x, m.Vh) @ M, m.U)  # (..., out)
        if self.out_rows:
            out_gate = torch.ones(delta.shape[-1], dtype=x.dtype, device=delta.device)  # (out,)
            for rows, gate in self.out_rows:
                out_gate = out_gate.index_put((rows,), gate.to(x.dtype))
            delta = delta * out_gate
        return y + delta


@contextlib.contextmanager
def gated(adapter: TinyLoRA, blocks: Sequence[AttentionBlock], head_gates: dict, kv_gates: dict):
    """Swap the adapted q/k/v/output maps of each block for gated copies: q rows and output columns
    follow head_gates[layer] [H], k and v rows follow kv_gates[layer] [KV] (in a fused qkv map, the
    rows `AttentionBlock.rows` names). Originals back in `finally`."""
    swapped = []
    try:
        for b in blocks:
            if b.layer not in head_gates:
                continue
            out_rows: dict[str, list] = {}  # attribute -> [(rows, gate per row)]
            for part, unit_gate in (("q", head_gates[b.layer]), ("k", kv_gates[b.layer]), ("v", kv_gates[b.layer])):
                attr, rows = b.rows(part)  # [units, d]
                out_rows.setdefault(attr, []).append(
                    (rows.flatten().to(unit_gate.device), unit_gate.repeat_interleave(rows.shape[1])))  # unit-major
            for attr in dict.fromkeys([*out_rows, b.maps[3]]):
                m = adapted_module(adapter, b, attr)
                if m is not None:
                    in_gate = head_gates[b.layer].repeat_interleave(b.head_dim) if attr == b.maps[3] else None  # (H*d,)
                    setattr(b.module, attr, GatedUpdate(m, out_rows.get(attr, ()), in_gate))
                    swapped.append((b.module, attr, m))
        yield
    finally:
        for parent, attr, m in reversed(swapped):
            setattr(parent, attr, m)


def unit_gates(blocks: Sequence[AttentionBlock], *, requires_grad: bool = False) -> tuple[dict, dict]:
    """Gates of 1 for every head [H] and KV head [KV] of each block, in the block's weight dtype on its device."""
    head, kv = {}, {}
    for b in blocks:
        w = getattr(b.module, b.maps[0]).weight  # (out, in): the dtype and device the gates meet
        head[b.layer] = torch.ones(b.n_heads, dtype=w.dtype, device=w.device, requires_grad=requires_grad)  # [H]
        kv[b.layer] = torch.ones(b.n_kv, dtype=w.dtype, device=w.device, requires_grad=requires_grad)  # [KV]
    return head, kv


def ablation_gates(blocks: Sequence[AttentionBlock], heads: Sequence[tuple[int, int]]) -> tuple[dict, dict]:
    """Gates that remove the update from `heads` [(layer, head)]: 0 for each head and its KV group."""
    by_layer = {b.layer: b for b in blocks}
    chosen = [by_layer[layer] for layer in dict.fromkeys(layer for layer, _ in heads)]
    head_gates, kv_gates = unit_gates(chosen)
    for layer, head in heads:
        head_gates[layer][head] = 0.0
        kv_gates[layer][head // by_layer[layer].group] = 0.0
    return head_gates, kv_gates


class Scorer:
    """The causal metric on fixed prompts: mean token log-prob of answers, or mean task reward."""

    def __init__(self, model, tokenizer, prompts, answers, task, max_new_tokens, batch_size):
        self.model, self.tokenizer, self.prompts, self.answers = model, tokenizer, list(prompts), list(answers)
        self.task, self.batch_size = (None if task is None else tasks.resolve(task)), batch_size
        self.metric = "reward" if task is not None else "logprob"
        self.max_new_tokens = max_new_tokens or getattr(self.task, "max_new_tokens", None) or 64
        self.device = model_device(model)
        self.gold = GoldSet(model, tokenizer, list(zip(self.prompts, self.answers)), batch_size=batch_size)

    def _rollout_batches(self, rollout):
        for i in range(0, len(rollout.completions), self.batch_size):
            rows = slice(i, i + self.batch_size)
            yield rollout.input_ids[rows], rollout.attention_mask[rows], rollout.completion_mask[rows]

    def _token_means(self, batches) -> Iterator[torch.Tensor]:
        for ids, mask, cmask in batches:
            yield mean_logprob(completion_logprobs(self.model, ids, mask, cmask), cmask)  # [B]

    def replies(self):
        """Greedy replies (a Rollout) of the model as it is now."""
        return generate(self.model, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens,
                        temperature=0.0, seed=0, batch_size=self.batch_size)

    @torch.no_grad()
    def score(self, replies=None) -> float:
        """The metric now; `replies`: greedy replies already generated with the model in this state."""
        if self.metric == "logprob":
            return float(self.gold.logprobs().mean())
        replies = self.replies() if replies is None else replies
        rewards = [r for r in self.task.reward(replies.completions, self.answers) if r is not None]
        return float(sum(rewards) / len(rewards)) if rewards else math.nan

    def gate_gradients(self, adapter, blocks, replies=None) -> tuple[dict, dict]:
        """d(objective)/d(gates) at gates = 1, fp32 on the CPU: layer -> [H] and layer -> [KV]. The
        objective is the mean token log-prob of the answers, or with a task, of the adapted model's
        greedy `replies` weighted by their reward."""
        if self.metric == "logprob":
            batch_means = self.gold.batch_logprobs  # the gold set's own measurement, batch by batch
            weights = [1.0] * len(self.answers)
        else:
            replies = self.replies() if replies is None else replies

            def batch_means():  # the replies' mean token log-probs, batch by batch
                return self._token_means(self._rollout_batches(replies))

            weights = [r or 0.0 for r in self.task.reward(replies.completions, self.answers)]
        head, kv = unit_gates(blocks, requires_grad=True)
        gates = [*head.values(), *kv.values()]
        grads = [torch.zeros(g.shape, dtype=torch.float32, device=g.device) for g in gates]  # fp32 sums
        w = torch.tensor(weights, dtype=torch.float32, device=self.device) / len(weights)  # [N]
        with torch.enable_grad(), gated(adapter, blocks, head, kv):
            start = 0
            for means in batch_means():  # [B] per batch, under grad
                objective = (means * w[start:start + len(means)]).sum()
                start += len(means)
                if objective.requires_grad:
                    for acc, g in zip(grads, torch.autograd.grad(objective, gates, allow_unused=True)):
                        if g is not None:
                            acc += g.float()
        grads = [g.cpu() for g in grads]
        n = len(head)
        return dict(zip(head, grads[:n])), dict(zip(kv, grads[n:]))
