"""How well a model knows each country's capital before training: the knowledge strata.

The model is asked "What is the capital of X?" and its reply is begun for it with "The capital of X
is"; the probability of the capital's name right after that (the product over the name's tokens; the
most probable of the capital's accepted names) places the country in a stratum
(`tinylab.tasks.world_capitals.stratum`: "knows" >= 0.5, "half" >= 0.1, else "does not know").
A gain only in "knows" is surfacing what the model knew, not learning.

Every prompt is rendered as generation renders it and scored in teacher-forced batches on the
model's device (`tinylab.model.batch.teacher_forced_batch`, `completion_logprobs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from tinylab.basics.checks import check_int
from tinylab.model.batch import teacher_forced_batch
from tinylab.model.device import model_device
from tinylab.model.generation import completion_logprobs
from tinylab.tasks import world_capitals

__all__ = ["CapitalKnowledge", "capital_knowledge"]


class CapitalKnowledge(NamedTuple):
    """One country as the model knows it: `p` is the probability of its capital after "The capital of X is"."""

    code: str
    country: str
    capital: str
    p: float
    stratum: str


@torch.no_grad()
def capital_knowledge(model, tokenizer, countries: Sequence[world_capitals.Country] | None = None, *,
                      batch_size: int = 16) -> dict[str, CapitalKnowledge]:
    """Capital -> `CapitalKnowledge` for `countries` (default: every country of the world set).

    Measures `model` as it is: an attached, enabled adapter counts. For the base model's strata call
    it before attaching, or inside `adapter.disabled()`."""
    check_int("batch_size", batch_size, low=1)
    countries = world_capitals.countries() if countries is None else tuple(countries)
    rows = []  # (country index, question, head tokens, name tokens)
    for k, country in enumerate(countries):
        if not isinstance(country, world_capitals.Country):
            raise ValueError(f"countries[{k}]={country!r:.80}: must be a tinylab.tasks.world_capitals.Country")
        head = tokenizer(f"The capital of {country.name} is", add_special_tokens=False).input_ids
        for name in (country.capital, *country.aliases):
            rows.append((k, [{"role": "user", "content": f"What is the capital of {country.name}?"}], head,
                         tokenizer(f" {name}", add_special_tokens=False).input_ids))
    device = model_device(model)
    best = [-math.inf] * len(countries)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch = teacher_forced_batch(tokenizer, [r[1] for r in chunk], [r[2] + r[3] for r in chunk], device)
        logprobs = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.continuation_mask)  # [B, L]
        positions = torch.arange(logprobs.shape[1], device=device)  # [L]
        starts = torch.tensor([len(r[2]) for r in chunk], device=device)[:, None]  # [B, 1]
        ends = starts + torch.tensor([len(r[3]) for r in chunk], device=device)[:, None]  # [B, 1]
        name_mask = (positions >= starts) & (positions < ends)  # [B, L]: the capital's name only
        for (k, *_), total in zip(chunk, (logprobs * name_mask).sum(1).tolist()):
            best[k] = max(best[k], total)
    out = {}
    for country, logprob in zip(countries, best):
        p = min(math.exp(logprob), 1.0)
        out[country.capital] = CapitalKnowledge(country.code, country.name, country.capital, p,
                                                world_capitals.stratum(p))
    return out
