"""The trained numbers one by one: address them, score the model as they move, attribute the gain
to each, and find the heads each one moves.

A *number* is one entry of the adapter's trained vectors. A tied adapter (one vector, e.g.
`u=13, n_tie="all"`) has u numbers, addressed by their entry i (0..u-1). An untied one has
num_groups x u numbers, addressed by (group, entry) or by their flat position in
`adapter.vector()` (group-major: group 0's u entries, then group 1's, ...). Everything here
changes v only (no SVD, no re-attach), and puts the vector back exactly as it found it when it
returns, raises or is interrupted (`TinyLoRA.kept_vector`).

Two metrics, both on a fixed set of examples:
- gold log-probability (`tinylab.measures.gold.GoldSet`): teacher-forced, per example the mean log-probability per
  token of its gold continuation (its answer; with `target="solution"` its reference reply) after
  its prompt, in fp32; one forward per batch, no generation;
- reply scores (`tinylab.measures.replies`, with a task): greedy replies read by the task: the shares of
  replies that are strict-correct, flexible-correct and well formatted.

Per-number attribution (`attribute_numbers`): the drop of the mean gold log-probability when number i is
set to 0 and the others are kept (exact), its first-order estimate v_i * d(score)/d(v_i), and the
interaction left over: the drop from zeroing all numbers minus the sum of the single drops.

Per-number heads (`heads_by_number`): `tinylab.analysis.heads.head_effects` with only number i switched on
(every other number 0): the update's weight on each layer x head, that head's share of it, and
on prompts the attention shift and output change against the base (its activity measured once
for all numbers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from tinylab import tasks
from tinylab.adapter.attach import TinyLoRA, check_adapter
from tinylab.analysis.heads import head_activity, head_effects
from tinylab.basics.checks import check_int, check_number, is_int
from tinylab.measures.gold import GoldSet
from tinylab.measures.replies import MEASURES, scored_replies
from tinylab.model.eval_mode import eval_mode

__all__ = ["REPLY_SCORES", "HeadsByNumber", "Meter", "NumberAttribution", "attribute_numbers", "check_values",
           "heads_by_number", "number_index", "number_label", "with_values"]

REPLY_SCORES = tuple(MEASURES)
"""The greedy-reply scores a number is measured by, with a task (`tinylab.measures.replies.MEASURES`)."""


# ---------------------------------------------------------------------------------------------
# Addressing the numbers


def _index(name: str, value, high: int, what: str) -> int:
    try:
        return check_int(name, value, low=0, high=high)
    except ValueError as error:
        raise ValueError(f"{error} ({what})") from None


def number_index(adapter: TinyLoRA, number) -> int:
    """The flat position in `adapter.vector()` of `number`: an int (entry i of a tied adapter, or a
    flat position 0..num_params-1) or a (group, entry) pair. ValueError names the allowed range."""
    u, groups = adapter.config.u, adapter.num_groups
    if isinstance(number, (tuple, list)):
        if len(number) != 2:
            raise ValueError(f"number={number!r}: give an int or a (group, entry) pair")
        group = _index("group", number[0], groups - 1, f"this adapter has {groups} tying group(s)")
        entry = _index("entry", number[1], u - 1, f"each vector has u={u} numbers")
        return group * u + entry
    return _index("number", number, u * groups - 1,
                  f"this adapter has {u * groups} numbers: u={u} x {groups} group(s)")


def number_label(adapter: TinyLoRA, index: int) -> str:
    """'v3' for entry 3 of a tied adapter; 'g2.v3' for entry 3 of group 2 of an untied one."""
    u = adapter.config.u
    return f"v{index}" if adapter.num_groups == 1 else f"g{index // u}.v{index % u}"


def check_values(name: str, values) -> list[float]:
    """A non-empty list of finite numbers, or a ValueError naming the bad entry."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.tolist()
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name}={values!r}: must be a non-empty list of finite numbers")
    return [check_number(f"{name}[{k}]", x) for k, x in enumerate(values)]


def with_values(base: torch.Tensor, changes: dict[int, float]) -> torch.Tensor:
    out = base.clone()  # (num_params,) fp32, cpu
    for i, x in changes.items():
        out[i] = x
    return out


# ---------------------------------------------------------------------------------------------
# Metrics


class Meter:
    """The metrics of the model as it is now: mean gold log-prob, per-example log-probs, reply scores."""

    def __init__(self, model, tokenizer, examples, task, target, max_new_tokens, batch_size):
        self.gold = GoldSet(model, tokenizer, examples, target=target, batch_size=batch_size)
        task = None if task is None else tasks.resolve(task)
        self.model, self.tokenizer, self.examples, self.task = model, tokenizer, examples, task
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    @torch.no_grad()
    def __call__(self) -> tuple[dict[str, float], np.ndarray]:
        per_example = self.gold.logprobs().cpu().numpy()  # [N]
        found = {"logprob": float(per_example.mean())}
        if self.task is not None:
            shares, _ = scored_replies(self.model, self.tokenizer, self.examples, self.task,
                                     max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
            found.update(shares)
        return found, per_example


# ---------------------------------------------------------------------------------------------
# NumberAttribution


class NumberAttribution(NamedTuple):
    """Which numbers carry the gain. `table`: one row per number (index: flat position) with
    label, group, entry, value (trained), ablation (mean gold log-prob drop when the number alone
    is set to 0), estimate (v_i * gradient, its first-order estimate), and with a task the drops of
    the reply scores (strict, flexible, formatted)."""

    table: pd.DataFrame
    trained: float  # mean gold log-prob with the trained vector
    zero: float  # with every number at 0: the base model exactly

    @property
    def total(self) -> float:
        """The drop from zeroing all numbers at once."""
        return self.trained - self.zero

    @property
    def interaction(self) -> float:
        """What the single drops do not add up to: total - sum of the ablations."""
        return self.total - float(self.table["ablation"].sum())

    def ranked(self, column: str = "ablation") -> list[int]:
        """Flat positions of the numbers, largest |column| first (ties keep vector order)."""
        if column not in self.table.columns:
            raise ValueError(f"column={column!r} is not in the table; allowed: {list(self.table.columns)}")
        return [int(i) for i in self.table[column].abs().sort_values(ascending=False, kind="stable").index]


@contextlib.contextmanager
def _grad_on(adapter: TinyLoRA):
    saved = [p.requires_grad for p in adapter.parameters()]
    for p in adapter.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, was in zip(adapter.parameters(), saved):
            p.requires_grad_(was)


def _gradient(adapter: TinyLoRA, gold: GoldSet) -> torch.Tensor:
    """d(mean gold log-prob)/dv at the current v: (num_params,) fp32 on the CPU."""
    params = list(adapter.parameters())
    with _grad_on(adapter), torch.enable_grad():
        score = gold.logprobs().mean()
        grads = torch.autograd.grad(score, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).detach().float().reshape(-1).cpu()
                      for g, p in zip(grads, params)])  # (num_params,)


def attribute_numbers(model, tokenizer, adapter: TinyLoRA, examples, *, task=None, target: str = "answer",
              max_new_tokens: int | None = None, batch_size: int = 8) -> NumberAttribution:
    """Per number: the exact drop when it alone is set to 0, its first-order estimate, and (with
    `task`) the drops of the greedy-reply scores; see `NumberAttribution`. Numbers already at 0 drop by 0
    exactly and are not measured. The vector is restored afterwards."""
    check_adapter(adapter, model)
    meter = Meter(model, tokenizer, examples, task, target, max_new_tokens, batch_size)
    with adapter.kept_vector() as trained_v, eval_mode(model):
        grad = _gradient(adapter, meter.gold)  # (num_params,)
        trained, _ = meter()
        rows, u = [], adapter.config.u
        for i, x in enumerate(trained_v.tolist()):
            drops = dict.fromkeys(trained, 0.0)
            if x != 0.0:
                adapter.set_vector(with_values(trained_v, {i: 0.0}))
                found, _ = meter()
                drops = {k: trained[k] - found[k] for k in trained}
            rows.append({"label": number_label(adapter, i), "group": i // u, "entry": i % u, "value": x,
                         "ablation": drops.pop("logprob"), "estimate": x * float(grad[i]), **drops})
        adapter.set_vector(torch.zeros_like(trained_v))
        zero, _ = meter()
    table = pd.DataFrame(rows, index=pd.RangeIndex(len(rows), name="number"))
    return NumberAttribution(table, trained["logprob"], zero["logprob"])


# ---------------------------------------------------------------------------------------------
# Heads per number


class HeadsByNumber(NamedTuple):
    """What each number does to the heads when it alone is on. `table`: index (number, layer, head);
    columns label, value (the value it was turned on at), weight (|update| / |weight| on the head's
    slices, as `head_effects`), share (weight / its sum over heads), js (attention shift against the
    base, bits), output_change (relative change of the head's output)."""

    table: pd.DataFrame

    @property
    def numbers(self) -> list[int]:
        return [int(i) for i in self.table.index.get_level_values("number").unique()]

    def grid(self, number: int, column: str = "share") -> pd.DataFrame:
        """The layer x head map of one column for one number (flat position)."""
        if column not in self.table.columns:
            raise ValueError(f"column={column!r} is not in the table; allowed: {list(self.table.columns)}")
        if number not in self.numbers:
            raise ValueError(f"number={number!r} was not measured; measured: {self.numbers}")
        return self.table.loc[number, column].unstack("head")

    def top(self, number: int, column: str = "share", k: int = 5) -> list[tuple[int, int]]:
        """Up to k (layer, head) pairs with the largest |column| for `number`; zeros left out."""
        values = self.grid(number, column).stack().abs().sort_values(ascending=False, kind="stable")
        return [(int(layer), int(head)) for layer, head in values[values > 0].index[:k]]


def _as_list(numbers) -> list:
    if isinstance(numbers, tuple) and len(numbers) == 2 and all(is_int(x) for x in numbers):
        return [numbers]  # one (group, entry) pair
    if is_int(numbers):
        return [numbers]
    if isinstance(numbers, str) or not isinstance(numbers, Sequence) or len(numbers) == 0:
        raise ValueError(f"numbers={numbers!r}: must be None (all) or a non-empty list of numbers")
    return list(numbers)


def heads_by_number(model, tokenizer, adapter: TinyLoRA, prompts: Sequence, *, numbers=None,
                 value: float | None = None, batch_size: int = 8) -> HeadsByNumber:
    """For each of `numbers` (default: all), `head_effects` with only that number on, at its trained
    value (or at `value` for all of them: a number trained to 0 then still shows its heads); every
    other number is 0. `prompts`: strings, chat messages or Examples. The vector is restored."""
    check_adapter(adapter, model)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of prompts (strings, chat messages or Examples)")
    prompts = [p.prompt if hasattr(p, "prompt") else p for p in prompts]
    if value is not None:
        value = check_number("value", value)
    n = adapter.num_params
    chosen = list(range(n)) if numbers is None else [number_index(adapter, x) for x in _as_list(numbers)]
    frames = []
    with adapter.kept_vector() as trained_v:
        with adapter.disabled():
            base = head_activity(model, tokenizer, prompts, batch_size=batch_size)  # once for all numbers
        for i in chosen:
            x = float(trained_v[i]) if value is None else value
            adapter.set_vector(with_values(torch.zeros_like(trained_v), {i: x}))
            effects = head_effects(model, tokenizer, adapter, prompts, confirm=0, batch_size=batch_size,
                                   base_activity=base)
            t = effects.table[["weight", "js", "output_change"]].copy()
            total = float(t["weight"].sum())
            t.insert(1, "share", t["weight"] / total if total > 0 else 0.0)
            t.insert(0, "value", x)
            t.insert(0, "label", number_label(adapter, i))
            frames.append(pd.concat({i: t}, names=["number"]))
    return HeadsByNumber(pd.concat(frames))
