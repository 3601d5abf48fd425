"""Greedy replies, scored by the task: the one way tinylab turns a model's replies into scores.

`greedy_replies` generates one greedy reply per prompt (prompts batched by length, so fewer pad
tokens; rows back in prompt order), with its token count and whether it was cut off.
`score_shares` scores replies with the task and gives the share of each measure in `MEASURES`
(strict, flexible, formatted: format compliance and correctness apart). `scored_replies` does both.
Evaluation (`tinylab.evaluation`), the knobs and the sweeps ask this module. The head ablations
(`tinylab.analysis.head_ablation.Scorer`) score by the task's mean reward instead, on a greedy
`Rollout` of their own: their gate gradients need the replies' token ids, not only the texts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from tinylab import tasks
from tinylab.basics.checks import check_int
from tinylab.measures.gold import gold_pairs
from tinylab.model.batch import render_prompts
from tinylab.model.generation import generate, stop_token_ids

__all__ = ["MEASURES", "Replies", "greedy_replies", "score_shares", "scored_replies"]

MEASURES = {"strict": "correct_strict", "flexible": "correct_flexible", "formatted": "formatted"}
"""Measure name -> the `Score` field (and evaluation table column) that holds it. These names are the
keys everywhere a reply score is reported: `Comparison.paired`, `summary()` rows, knob tables, sweep rows."""


class Replies(NamedTuple):
    """Greedy replies in prompt order."""

    texts: list[str]  # the decoded replies
    lengths: list[int]  # generated tokens per reply, the end-of-turn token not counted
    truncated: list[bool]  # cut off at max_new_tokens (no end token)


def greedy_replies(model, tokenizer, prompts: Sequence, *, max_new_tokens: int, batch_size: int = 8,
                   progress: bool = False, desc: str = "replies") -> Replies:
    """One greedy reply per prompt on the model's device; the replies do not depend on `batch_size`
    beyond the numerics of padding (prompts of similar length share a batch)."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    texts = render_prompts(tokenizer, prompts)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))  # similar lengths share a batch
    stop_ids = stop_token_ids(model, tokenizer)
    replies: list[str] = [""] * len(prompts)
    counts, cut = [0] * len(prompts), [False] * len(prompts)
    disable = not progress or bool(os.environ.get("TQDM_DISABLE"))
    with tqdm(total=len(prompts), desc=desc, unit="ex", disable=disable) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out = generate(model, tokenizer, [prompts[i] for i in rows], n=1, max_new_tokens=max_new_tokens,
                           temperature=0.0, seed=0)
            kept = out.completion_mask.bool()  # [b, L]
            stops = torch.tensor(stop_ids, device=out.completion_ids.device)  # [s]
            ended = (torch.isin(out.completion_ids, stops) & kept).any(1)  # [b]
            produced = kept.sum(1) - ended.long()  # [b] tokens before the end token
            for j, i in enumerate(rows):
                replies[i] = out.completions[j]
                counts[i] = int(produced[j])
                cut[i] = not bool(ended[j])
            bar.update(len(rows))
    return Replies(replies, counts, cut)


def score_shares(task, replies: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """The share in [0, 1] of `replies` that are correct (strict, flexible) and well formatted, by `task`."""
    task = tasks.resolve(task)
    scores = [task.score(reply, answer) for reply, answer in zip(replies, answers)]
    n = max(len(scores), 1)
    return {name: sum(bool(getattr(s, field)) for s in scores) / n for name, field in MEASURES.items()}


def scored_replies(model, tokenizer, examples, task, *, max_new_tokens: int | None = None,
                   batch_size: int = 8) -> tuple[dict[str, float], list[str]]:
    """Greedy replies to `examples` (Examples or (prompt, answer) pairs) scored by `task` (a Task or its
    name): ({strict, flexible, formatted} shares in [0, 1], the replies)."""
    task = tasks.resolve(task)
    prompts, answers, _ = gold_pairs(examples)
    max_new_tokens = task.max_new_tokens if max_new_tokens is None else max_new_tokens
    replies = greedy_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return score_shares(task, replies.texts, answers), replies.texts
