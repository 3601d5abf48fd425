"""Log-probabilities of chosen tokens from the output head's input, with no [tokens, vocab] tensor.

Scoring a completion token needs log p(token) = z[token] - logsumexp(z), z = head(h) / temperature, over
the whole vocabulary. The plain way (`tinylab.model.generation.token_logprobs` on the model's logits)
builds every position's logits [N, V], their log-softmax, and in the backward their gradient [N, V]:
at a 50k-150k vocabulary the largest tensors of a training step (0.2-0.6 MB per token in fp32), each
written and read several times. Here the logits exist one chunk of rows at a time.

A token's log-probability depends on its own hidden state h only, so its gradient with respect to h is
one vector, computed in the forward from the chunk's probabilities p:

    d logp / d h = -(p - onehot(token)) W / temperature        (W: the head's weight [V, d])

and the backward only scales it by the incoming gradient. The matrix products are the plain ones (h W^T
forward, p W backward); what is saved is a [N, d] fp32 tensor per target instead of [N, V] ones.
Several targets under one row's distribution (a group's completions share their first position)
share that row's logits. The head's weight and bias get no gradient: under autograd the fused path
is only taken when they are frozen.

Which models: `head_scorer(model)` returns a scorer when the model's output head is a plain
`nn.Linear` (no hooks, frozen) whose output *is* the model's logits: checked once per model and head on
a 3-token input, by the forward's own logits against the head applied to what the forward gave it. A model
that scales, caps or slices its logits after the head (Gemma 2's soft-capping, Granite's logit scaling)
or never calls its head module gets None, and its caller scores the plain way.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _modules

from tinylab.model.device import model_device
from tinylab.model.eval_mode import eval_mode

__all__ = ["HeadScorer", "head_scorer"]

_CHUNK_ELEMENTS = 2**24  # logits per chunk (64 MB in fp32): rows = this // vocabulary, at least 1
_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (head, HeadScorer or None)


class HeadScorer:
    """Fused log-probabilities for one model whose output head `head` gives its logits unchanged."""

    def __init__(self, head: nn.Linear):
        self.head = head

    @contextlib.contextmanager
    def outputs(self) -> Iterator[None]:
        """Inside the block, the model's forward puts the hidden states its head was given (with their
        graph) where its logits would be, `out.logits` [..., d], and the head computes nothing."""
        given = []

        def take(module, args):
            given.append(args[0])
            return (args[0].narrow(-2, 0, 0),)  # the head multiplies no row

        def give(module, args, output):
            return given.pop()

        handles = [self.head.register_forward_pre_hook(take), self.head.register_forward_hook(give)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log p(target) under softmax(head(hidden) / temperature), fp32, differentiable with respect to
        `hidden` [..., d] (as `outputs` gives it). `targets` [...] long -> [...]; or [..., k] (the
        rank of `hidden`): k targets scored under each row's one distribution -> [..., k]."""
        weight, bias = self.head.weight, self.head.bias  # [V, d], [V] or None
        flat = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)  # [N, d]
        picks = targets.reshape(flat.shape[0], -1)  # [N, k]
        rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        if torch.is_grad_enabled() and flat.requires_grad:
            out = _FusedLogprobs.apply(flat, weight, bias, picks, float(temperature), rows)  # [N, k]
        else:
            with torch.no_grad():
                out, _ = _chunked(flat, weight, bias, picks, float(temperature), rows, False)
        return out.view(targets.shape)


def _chunked(hidden, weight, bias, targets, temperature: float, rows: int, with_grad: bool):
    """(log p(target) [N, k] fp32, d logp / d hidden [N, k, d] fp32 or None) for targets [N, k], `rows`
    rows of logits at a time."""
    n, k = targets.shape
    out = torch.empty(n, k, dtype=torch.float32, device=hidden.device)  # [N, k]
    jac = torch.empty(n, k, hidden.shape[1], dtype=torch.float32, device=hidden.device) if with_grad else None
    for s in range(0, n, rows):
        t = targets[s:s + rows]  # [c, k]
        z = F.linear(hidden[s:s + rows], weight, bias).float()  # [c, V], as the model's own logits
        if temperature != 1.0:
            z.div_(temperature)  # in place: the fresh product (or its fp32 copy)
        top = z.amax(dim=-1, keepdim=True)  # [c, 1]
        picked = z.gather(1, t) - top  # [c, k]
        total = z.sub_(top).exp_().sum(dim=-1, keepdim=True)  # [c, 1]; z is now exp(z - top), in place
        out[s:s + rows] = picked - total.log()
        if with_grad:  # -(p - onehot(target)) W / T = (W[target] - p W) / T
            expected = (z.div_(total).to(weight.dtype) @ weight).float()  # [c, d]: p W, p in place
            jac[s:s + rows] = (weight[t].float() - expected[:, None]).mul_(1.0 / temperature)  # [c, k, d]
    return out, jac


class _FusedLogprobs(torch.autograd.Function):
    """`_chunked` with the gradient with respect to the hidden states (the head's weight and bias frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, rows):
        out, jac = _chunked(hidden, weight, bias, targets, temperature, rows, True)
        ctx.save_for_backward(jac)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (jac,) = ctx.saved_tensors  # [N, k, d]
        hidden_grad = torch.einsum("nk,nkd->nd", grad.float(), jac)  # [N, d]: summed over the k targets
        return hidden_grad.to(ctx.hidden_dtype), None, None, None, None, None


def head_scorer(model: nn.Module) -> HeadScorer | None:
    """A `HeadScorer` for `model`, or None where its logits are not plainly its head's output (see the
    module's docstring). The check runs once per model and head, and again if the head is replaced; a
    head with a trained weight or bias is scored the plain way under autograd."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not _plain_frozen_linear(head):
        return None
    kept = _VERDICTS.get(model)
    if kept is None or kept[0] is not head:
        kept = _VERDICTS[model] = (head, _probe(model, HeadScorer(head)))
    return kept[1]


def _plain_frozen_linear(head) -> bool:
    """A plain `nn.Linear` with no hooks, frozen (or called without autograd)."""
    trained = head is not None and any(p.requires_grad for p in head.parameters())
    return (type(head) is nn.Linear and not (trained and torch.is_grad_enabled())
            and "forward" not in head.__dict__ and not (head._forward_hooks or head._forward_pre_hooks)
            and not (_modules._global_forward_hooks or _modules._global_forward_pre_hooks))


def _probe(model: nn.Module, scorer: HeadScorer) -> HeadScorer | None:
    """`scorer` if the model's logits on a 3-token input equal its head applied to the hidden states the
    head was given, else None."""
    device = model_device(model)
    ids = torch.arange(3, device=device)[None]  # [1, 3]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(3, device=device)[None],
                  use_cache=False)
    given = []
    try:
        with torch.no_grad(), eval_mode(model):
            logits = model(**kwargs).logits
            handle = scorer.head.register_forward_pre_hook(lambda module, args: given.append(args[0]))
            try:
                with scorer.outputs():
                    hidden = model(**kwargs).logits
            finally:
                handle.remove()
            if len(given) != 1 or hidden.shape != given[0].shape:
                return None
            again = scorer.head(given[0])
    except Exception:  # a model this call does not fit: the plain path meets (and reports) it
        return None
    plain = logits.shape == again.shape and torch.equal(logits.float(), again.float())
    return scorer if plain and torch.equal(hidden.to(given[0].dtype), given[0]) else None
