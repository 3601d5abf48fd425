"""The gold reply's log-probability: how likely the model finds a reference continuation of a prompt.

One measurement, asked for by the knobs (`tinylab.analysis.knobs`), the head ablations
(`tinylab.analysis.head_ablation`) and the knob panel's readout: examples are tokenized once as
teacher-forced batches on the model's device, and `GoldSet.logprobs()` scores the model as it is
now: per example the mean log-probability per token of its gold continuation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tinylab.basics.checks import check_choice, check_int
from tinylab.model.batch import teacher_forced_batch
from tinylab.model.device import model_device
from tinylab.model.generation import completion_logprobs

__all__ = ["TARGETS", "GoldSet", "gold_pairs", "mean_logprob"]

TARGETS = ("answer", "solution")
"""What the gold continuation is: the example's answer, or its reference reply (solution)."""


def gold_pairs(examples) -> tuple[list, list[str], list[str | None]]:
    """(prompts, answers, solutions) of `examples`: Examples or (prompt, answer) pairs, checked."""
    if isinstance(examples, str) or not isinstance(examples, Sequence) or len(examples) == 0:
        raise ValueError("examples must be a non-empty list of Examples (or (prompt, answer) pairs)")
    prompts, answers, solutions = [], [], []
    for k, ex in enumerate(examples):
        if hasattr(ex, "prompt") and hasattr(ex, "answer"):
            prompts.append(ex.prompt)
            answers.append(str(ex.answer))
            solutions.append(getattr(ex, "solution", None))
        elif isinstance(ex, (tuple, list)) and len(ex) == 2:
            prompts.append(ex[0])
            answers.append(str(ex[1]))
            solutions.append(None)
        else:
            raise ValueError(f"examples[{k}]={ex!r:.80}: must be an Example or a (prompt, answer) pair")
    return prompts, answers, solutions


def mean_logprob(token_logprobs: torch.Tensor, continuation_mask: torch.Tensor) -> torch.Tensor:
    """[B] mean per token of [B, L] token log-probabilities (zero where masked) over the mask [B, L]."""
    return token_logprobs.sum(1) / continuation_mask.sum(1).clamp(min=1).to(token_logprobs.dtype)  # [B]


class GoldSet:
    """Examples tokenized once as teacher-forced batches on the model's device; `logprobs()` scores
    the model as it is now: per example the mean log-probability per token of its gold
    continuation, fp32 [N] (differentiable under grad). `target`: "answer" (the gold answer) or
    "solution" (the example's reference reply; every example needs one)."""

    def __init__(self, model, tokenizer, examples, *, target: str = "answer", batch_size: int = 8):
        check_choice("target", target, TARGETS)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.model, self.tokenizer = model, tokenizer
        self.prompts, self.answers, solutions = gold_pairs(examples)
        if target == "solution" and any(s is None for s in solutions):
            missing = [k for k, s in enumerate(solutions) if s is None]
            raise ValueError(f"target='solution' but examples {missing[:5]} have no solution; use target='answer'")
        self.golds = list(self.answers if target == "answer" else solutions)
        conts = [tokenizer(g, add_special_tokens=False)["input_ids"] for g in self.golds]
        empty = [k for k, c in enumerate(conts) if not c]
        if empty:
            raise ValueError(f"examples {empty[:5]} have a gold {target} of zero tokens; give each some text")
        device = model_device(model)
        self.batches = [teacher_forced_batch(tokenizer, self.prompts[i:i + self.batch_size],
                                             conts[i:i + self.batch_size], device)
                        for i in range(0, len(conts), self.batch_size)]

    def __len__(self) -> int:
        return len(self.prompts)

    def batch_logprobs(self):
        """Per batch, [B] fp32 mean token log-probabilities of the gold continuations (model as it is now)."""
        for b in self.batches:
            lp = completion_logprobs(self.model, b.input_ids, b.attention_mask, b.continuation_mask)  # [B, L] fp32
            yield mean_logprob(lp, b.continuation_mask)  # [B]

    def logprobs(self) -> torch.Tensor:
        """[N] fp32 on the model's device: mean token log-probability of each gold continuation."""
        return torch.cat(list(self.batch_logprobs()))  # [N]
