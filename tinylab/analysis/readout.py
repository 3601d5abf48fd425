"""What the knob panel reads out of the model at one point of v: the greedy replies to a few
prompts, the gold log-probability of each held-out example, and the heads' activity on the
prompts, from as few model calls as the inputs allow.

Everything is tokenized once. When the held-out examples have the reply prompts (the same
prompts in the same order), each batch takes ONE forward of prompt + gold continuation, with
eager attention and the heads observed (`tinylab.model.attention`):
- its last L+1 logits score the gold tokens (as `GoldSet.logprobs` / `completion_logprobs` do);
- the heads on the prompt positions are the prompt's own (attention is causal: the continuation
  changes nothing before it), the activity `tinylab.analysis.heads.attention_shift` compares with the base;
- the greedy replies start where they would without the forward: the greedy token at each gold
  position is its argmax, so as long as every row's argmax equals its gold token, the replies are
  the gold's first m tokens, already read (speculative decoding with the gold as the draft; m is
  kept in `Reader.from_gold`, per batch). Its KV cache cropped to the prompt and those m tokens,
  and the logits that follow them, are the prefill from which the greedy replies continue
  (`tinylab.model.generation.greedy_from_prefill`: the decoding of `generate(..., temperature=0)`).
Otherwise one forward of the prompts gives the activity and the prefill, and the gold set takes
its own forward. The numbers agree with the separate calls up to float rounding (eager against
sdpa attention, other matrix shapes); readouts of one Reader at two points are exactly comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from tinylab.analysis.heads import HeadActivity
from tinylab.basics.checks import check_int
from tinylab.measures.gold import GoldSet, mean_logprob
from tinylab.model.attention import attention_blocks, eager_attention, observe_heads
from tinylab.model.batch import left_pad, pad_token_id, prompt_rows
from tinylab.model.device import model_device
from tinylab.model.eval_mode import eval_mode
from tinylab.model.generation import greedy_from_prefill, stop_token_ids, token_logprobs
from tinylab.model.kv_cache import drop_last, prefill

__all__ = ["Reader", "Readout"]


class Readout(NamedTuple):
    """The model at one point: what the panel shows."""

    replies: list[str]  # greedy reply per prompt
    logprobs: np.ndarray  # [N] fp32: mean gold log-prob per token of each held-out example
    activity: list[HeadActivity]  # the heads on the prompts, one per batch


class Reader:
    """Reads the model as it is now (`reader()`); see the module docstring.

    `prompts`: strings or chat messages. `gold`: the held-out examples, tokenized. `max_new_tokens`:
    the length of the greedy replies (each stops earlier at its end-of-sequence token).
    """

    def __init__(self, model, tokenizer, prompts: Sequence, gold: GoldSet, *, max_new_tokens: int,
                 batch_size: int = 8):
        if not isinstance(gold, GoldSet):
            raise TypeError(f"gold must be a GoldSet (tinylab.measures.gold), got {type(gold).__name__}")
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of prompts (strings or chat messages)")
        self.model, self.tokenizer, self.gold = model, tokenizer, gold
        self.prompts = [getattr(p, "prompt", p) for p in prompts]
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        batch_size = check_int("batch_size", batch_size, low=1)
        try:
            self.blocks = attention_blocks(model)
        except ValueError:  # a layout tinylab does not split into heads: replies and log-probs, no head activity
            self.blocks = []
        self.shared = self.prompts == gold.prompts and batch_size == gold.batch_size
        self.stops = stop_token_ids(model, tokenizer)
        self.from_gold: list[int] = []
        if self.shared:  # (ids [B, P+L], mask [B, P+L], continuation mask [B, L])
            self.batches = [(b.input_ids, b.attention_mask, b.continuation_mask) for b in gold.batches]
        else:  # (ids [B, P], mask [B, P], None)
            rows, device = prompt_rows(tokenizer, self.prompts), model_device(model)
            self.batches = [(*left_pad(rows[i:i + batch_size], pad_token_id(tokenizer), device), None)
                            for i in range(0, len(rows), batch_size)]

    def _greedy_gold(self, logits: torch.Tensor, gold: torch.Tensor, continuation: torch.Tensor) -> int:
        """How many first tokens every row's greedy reply shares with its gold continuation (no stop
        token among them): logits [B, L+1] of the teacher-forced forward, gold and continuation [B, L].
        Position t's argmax is the greedy token after the prompt and gold[:t], so while it equals
        gold[t] the greedy reply is the gold, and the next position's logits continue it."""
        agree = (logits[:, :-1].argmax(-1) == gold) & continuation.bool()  # [B, L]
        agree &= ~torch.isin(gold, torch.tensor(self.stops, device=gold.device))
        return int(agree.long().cumprod(1).sum(1).min())

    @torch.no_grad()
    def __call__(self) -> Readout:
        """Replies, gold log-probs and head activity of the model as it is now."""
        replies, activity, means = [], [], []
        self.from_gold = []  # per batch: reply tokens read from the gold forward, not decoded
        with eval_mode(self.model):
            for ids, mask, continuation in self.batches:
                L = 0 if continuation is None else continuation.shape[1]
                P = ids.shape[1] - L
                with eager_attention(self.model), observe_heads(self.blocks) as (patterns, outputs):
                    out, cache = prefill(self.model, ids, mask, logits_to_keep=L + 1)
                logits = out.logits[:, -(L + 1):]  # [B, L+1, V]: a model may give more than it was asked for
                activity.append(HeadActivity(dict(patterns), dict(outputs), mask).first(P))
                m = 0  # reply tokens the forward already decoded
                if continuation is not None:
                    token_lp = token_logprobs(logits[:, :-1], ids[:, P:])  # [B, L]: position t predicts token t
                    token_lp = token_lp * continuation.to(token_lp.dtype)  # [B, L]
                    means.append(mean_logprob(token_lp, continuation))  # [B]
                    m = min(self._greedy_gold(logits, ids[:, P:], continuation), self.max_new_tokens - 1)
                    if m < L and not drop_last(cache, L - m):  # a recurrent state has read the gold reply
                        _, cache = prefill(self.model, ids[:, :P + m], mask[:, :P + m])
                self.from_gold.append(m)
                replies += greedy_from_prefill(self.model, self.tokenizer, cache, logits[:, m], mask[:, :P + m],
                                               max_new_tokens=self.max_new_tokens, decoded=ids[:, P:P + m])
            logprobs = torch.cat(means) if self.shared else self.gold.logprobs()  # [N] fp32
        return Readout(replies, logprobs.cpu().numpy(), activity)
