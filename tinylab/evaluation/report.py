"""Greedy evaluation of a model on a task, with format and correctness kept apart.

`evaluate` generates one greedy reply per example (batched, left-padded, through
`tinylab.model.generation.generate`), scores it with the task, and returns an `EvalReport`: strict and
flexible accuracy, format compliance, reply length, and one row per example in a DataFrame.
Prompts are batched by length (fewer pad tokens) and the rows are put back in example order; the
replies do not depend on `batch_size`.

`compare` evaluates the same examples twice: the base model (inside `adapter.disabled()`, never a
second copy) and the adapted one, lines the replies up in one table, and reports for strict,
flexible and formatted the paired difference (`tinylab.paired`: Newcombe's paired 95% interval, exact McNemar p,
examples gained and lost). With `controls=("prompt", "random")` it also evaluates the prompt
control (the base model, the task's control prompt) and the random-direction control (the
adapter's vectors at the same norms in random directions), see `tinylab.evaluation.controls`.

The model stays where it is: any device and dtype (replies are generated on the model's device).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import pandas as pd
import torch
from torch import nn

from tinylab import tasks as _tasks
from tinylab.adapter.attach import check_adapter
from tinylab.adapter.file_format import load_adapter
from tinylab.basics.checks import check_choice, check_int
from tinylab.evaluation.controls import checked_vectors, control_examples, other_vectors, random_directions
from tinylab.evaluation.paired_stats import PairedDifference, paired
from tinylab.measures.replies import MEASURES, greedy_replies
from tinylab.model.eval_mode import eval_mode
from tinylab.tasks.base import Example, Task

__all__ = ["CONTROLS", "MEASURES", "Comparison", "EvalReport", "RandomControl", "compare", "evaluate"]

CONTROLS = ("prompt", "random")
_RATES = {"strict": "strict", "flexible": "flexible", "formatted": "formatted", "mean_length": "mean_length",
          "truncated": "truncated"}  # Comparison.record's names -> EvalReport fields


class EvalReport(NamedTuple):
    """Greedy-decoding results of one model on `n` examples of a task. Rates are fractions in [0, 1]."""

    task: str  # task name
    split: str  # "train" or "test"
    n: int  # examples evaluated
    strict: float  # share of replies correct under the strict reading
    flexible: float  # share correct under the flexible reading
    formatted: float  # share following the answer format
    mean_length: float  # generated tokens per reply, the end-of-turn token not counted
    truncated: float  # share of replies cut off at max_new_tokens
    max_new_tokens: int
    params: int | None  # trained parameters of the adapter in effect; None without an adapter
    seconds: float  # wall-clock time of generation and scoring
    table: pd.DataFrame  # one row per example: prompt, reply, extracted, gold, flags, length, reward

    def summary(self) -> str:
        """One line, in this shape: `TASK/SPLIT n=N [P params]: strict S% | flexible F% | format M% | T tokens/reply, ...`."""
        adapter = "" if self.params is None else f" [{self.params} params]"
        return (f"{self.task}/{self.split} n={self.n}{adapter}: strict {self.strict:.1%} | flexible "
                f"{self.flexible:.1%} | format {self.formatted:.1%} | {self.mean_length:.1f} tokens/reply, "
                f"{self.truncated:.0%} cut at {self.max_new_tokens} | {self.seconds:.1f} s")


class RandomControl(NamedTuple):
    """The random-direction control: the adapter's vectors at their norms in `len(reports)` random directions."""

    reports: tuple[EvalReport, ...]  # one per draw
    vectors: tuple[tuple[float, ...], ...]  # the vector each draw set, groups in order

    def rates(self) -> pd.DataFrame:
        """Rows strict, flexible, formatted; columns mean, std (over draws; 0 for one draw), min, max."""
        rows = ["strict", "flexible", "formatted"]
        values = pd.DataFrame({r: [getattr(rep, r) for rep in self.reports] for r in rows})
        return pd.DataFrame({"mean": values.mean(), "std": values.std(ddof=0), "min": values.min(),
                             "max": values.max()})


class Comparison(NamedTuple):
    """Base vs adapted model on the same examples, with paired statistics and the controls asked for."""

    base: EvalReport  # adapter disabled
    adapted: EvalReport  # adapter enabled
    table: pd.DataFrame  # per example: prompt, gold, base_/adapted_(/prompt_) reply, extracted, flags; `change`
    paired: dict[str, PairedDifference]  # adapted vs base for "strict", "flexible", "formatted"
    prompt: EvalReport | None = None  # prompt control: the base model with the task's control prompt
    prompt_paired: dict[str, PairedDifference] | None = None  # adapted vs the prompt control
    random: RandomControl | None = None  # random-direction control
    others: dict[str, EvalReport] | None = None  # other vectors of the same adapter by name (e.g. "SFT")
    others_paired: dict[str, dict[str, PairedDifference]] | None = None  # adapted vs each other vector

    def summary(self) -> pd.DataFrame:
        """Rates side by side: rows strict, flexible, formatted, mean_length, truncated; columns base,
        adapted, delta, then (rates only) the paired interval low/high, McNemar p, gained, lost and
        whether the difference is more than noise; with controls, their rates too."""
        rows = ["strict", "flexible", "formatted", "mean_length", "truncated"]
        frame = pd.DataFrame({
            "base": [getattr(self.base, r) for r in rows],
            "adapted": [getattr(self.adapted, r) for r in rows],
        }, index=rows)
        frame["delta"] = frame["adapted"] - frame["base"]
        for column in ("low", "high", "p_value", "gained", "lost", "beyond_noise"):
            frame[column] = [getattr(self.paired[m], column) for m in MEASURES] + [None, None]
        if self.prompt is not None:
            frame["prompt_control"] = [getattr(self.prompt, r) for r in rows]
        if self.random is not None:
            rates = self.random.rates()
            frame["random_mean"] = list(rates["mean"]) + [None, None]
            frame["random_std"] = list(rates["std"]) + [None, None]
        for name, other in (self.others or {}).items():
            frame[name] = [getattr(other, r) for r in rows]
        return frame

    def record(self) -> dict:
        """The numbers as JSON-ready data: the task, split and example count; per model (base, adapted,
        the prompt control and other vectors when present) its rates; per comparison (adapted vs base,
        vs the prompt control, vs each other vector) and measure the paired statistics
        (`PairedDifference` fields and `beyond_noise`); the random-direction control's rates per draw."""
        def rates(report: EvalReport) -> dict:
            return {m: getattr(report, r) for m, r in _RATES.items()}

        def stats(by_measure: dict[str, PairedDifference]) -> dict:
            return {m: {**dataclasses.asdict(d), "beyond_noise": d.beyond_noise} for m, d in by_measure.items()}

        models = {"base": self.base, "adapted": self.adapted, "prompt_control": self.prompt, **(self.others or {})}
        pairs = {"adapted_vs_base": self.paired, "adapted_vs_prompt_control": self.prompt_paired,
                 **{f"adapted_vs_{name}": d for name, d in (self.others_paired or {}).items()}}
        return {
            "task": self.adapted.task, "split": self.adapted.split, "n": self.adapted.n,
            "params": self.adapted.params, "max_new_tokens": self.adapted.max_new_tokens,
            "rates": {name: rates(r) for name, r in models.items() if r is not None},
            "paired": {name: stats(d) for name, d in pairs.items() if d is not None},
            "random_control": None if self.random is None else [rates(r) for r in self.random.reports],
        }

    def report(self) -> str:
        """One line per measure: rates, paired 95% interval, gained/lost, McNemar p, noise or not;
        the same against the prompt control, and the random-direction control's mean and spread."""
        lines = [f"{self.adapted.task}/{self.adapted.split}, {self.adapted.n} examples, adapted "
                 f"({self.adapted.params} params) vs base:"]
        lines += [self.paired[m].line(f"  {m:9s}") for m in MEASURES]
        if self.prompt_paired is not None:
            lines.append("adapted vs prompt control (base model, the task's control prompt):")
            lines += [self.prompt_paired[m].line(f"  {m:9s}") for m in MEASURES]
        for name, by_measure in (self.others_paired or {}).items():
            lines.append(f"adapted vs {name} (another vector of the same adapter):")
            lines += [by_measure[m].line(f"  {m:9s}") for m in MEASURES]
        if self.random is not None:
            rates = self.random.rates()
            lines.append(f"random-direction control ({len(self.random.reports)} draws at the trained norms), "
                         "mean +- std: " + ", ".join(f"{m} {rates.loc[m, 'mean']:.1%} +- {rates.loc[m, 'std']:.1%}"
                                                       for m in MEASURES))
        return "\n".join(lines)


def _prompt_text(prompt) -> str:
    """The user's words of a prompt: the last user message of a chat, or the raw string."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return str(users[-1] if users else prompt[-1].get("content", ""))


def _score_table(task: Task, examples: Sequence[Example], replies: list[str], counts: list[int],
                 cut: list[bool]) -> pd.DataFrame:
    scores = [task.score(reply, ex.answer) for reply, ex in zip(replies, examples)]
    rewards = task.reward(replies, [ex.answer for ex in examples])
    return pd.DataFrame({
        "prompt": [_prompt_text(ex.prompt) for ex in examples],
        "reply": replies,
        "extracted": [s.extracted for s in scores],
        "gold": [ex.answer for ex in examples],
        "formatted": [bool(s.formatted) for s in scores],
        "correct_strict": [bool(s.correct_strict) for s in scores],
        "correct_flexible": [bool(s.correct_flexible) for s in scores],
        "length": counts,
        "truncated": cut,
        "reward": [float("nan") if r is None else float(r) for r in rewards],
    })


def _resolve_adapter(model: nn.Module, adapter):
    """(adapter handle or None, loaded_here): a path is loaded now and removed by the caller."""
    if adapter is None:
        return None, False
    if isinstance(adapter, (str, os.PathLike)):
        return load_adapter(model, adapter), True
    return check_adapter(adapter, model), False


def _run(model, tokenizer, task: Task, examples: list[Example], *, split: str, batch_size: int,
         max_new_tokens: int, params: int | None, progress: bool) -> EvalReport:
    began = time.perf_counter()
    with eval_mode(model):
        replies, counts, cut = greedy_replies(model, tokenizer, [ex.prompt for ex in examples],
                                              batch_size=batch_size, max_new_tokens=max_new_tokens,
                                              progress=progress, desc=f"evaluate {task.name}")
    table = _score_table(task, examples, replies, counts, cut)
    shares = {measure: float(table[column].mean()) for measure, column in MEASURES.items()}  # strict, flexible, formatted
    return EvalReport(
        task=task.name, split=split, n=len(examples), **shares, mean_length=float(table["length"].mean()),
        truncated=float(table["truncated"].mean()), max_new_tokens=max_new_tokens, params=params,
        seconds=time.perf_counter() - began, table=table,
    )


def _setup(task, n, split, seed, batch_size, max_new_tokens):
    task = _tasks.resolve(task)
    check_int("n", n, low=1)
    check_int("batch_size", batch_size, low=1)
    max_new_tokens = check_int("max_new_tokens", task.max_new_tokens if max_new_tokens is None else max_new_tokens,
                               low=1)
    examples = task.examples(split=split, n=n, seed=seed)
    if len(examples) == 0:
        raise ValueError(f"task {task.name!r} gave no examples for split={split!r}")
    return task, examples, max_new_tokens


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, task: str | Task, *, n: int, split: str = "test", seed: int | None = 0,
             batch_size: int = 16, max_new_tokens: int | None = None, adapter=None,
             progress: bool = True) -> EvalReport:
    """Greedy replies to `n` examples of `task` (a name or a Task), scored; see `EvalReport`.

    `seed` picks the examples (`task.examples(split, n, seed)`); `max_new_tokens` defaults to the
    task's. `adapter`: a TinyLoRA handle attached to `model` (its parameter count goes in the report),
    or the path of a saved adapter, loaded for this evaluation and removed afterwards.
    """
    task, examples, max_new_tokens = _setup(task, n, split, seed, batch_size, max_new_tokens)
    handle, loaded_here = _resolve_adapter(model, adapter)
    try:
        return _run(model, tokenizer, task, examples, split=split, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, params=None if handle is None else handle.num_params,
                    progress=progress)
    finally:
        if loaded_here:
            handle.remove()


def _paired(before: EvalReport, after: EvalReport) -> dict[str, PairedDifference]:
    return {m: paired(list(before.table[c]), list(after.table[c])) for m, c in MEASURES.items()}


@torch.no_grad()
def compare(model: nn.Module, tokenizer, task: str | Task, adapter, *, n: int, split: str = "test",
            seed: int | None = 0, batch_size: int = 16, max_new_tokens: int | None = None,
            controls: Sequence[str] = (), draws: int = 3, control_seed: int = 0,
            vectors: Mapping[str, Sequence[float] | torch.Tensor] | None = None, progress: bool = True) -> Comparison:
    """The base model (adapter disabled) and the adapted one on the same examples, with paired statistics.

    `adapter`: a TinyLoRA handle attached to `model`, or a saved adapter's path (loaded, then removed).
    The table's `change` column reads "gained" / "lost" (strict correctness), "kept" or "neither".
    `controls`: any of "prompt" (the base model with the task's `control_prompt`; its replies go in
    the table as `prompt_*` columns) and "random" (`draws` seeded random directions at the trained
    norms, `control_seed` seeds them; the adapter's vectors are restored after).
    `vectors`: other vectors of the same adapter by name, each scored as its own row with its paired
    statistics against the adapted model, e.g. `{"SFT": sft_run.vector}` for SFT at the same budget
    (an adapter of the same config trained by `train_sft`); replies go in the table as `<name>_*`.
    """
    controls = tuple(check_choice("controls", c, CONTROLS) for c in controls)
    check_int("draws", draws, low=1)
    check_int("control_seed", control_seed)
    task, examples, max_new_tokens = _setup(task, n, split, seed, batch_size, max_new_tokens)
    prompted = control_examples(task, examples) if "prompt" in controls else None  # fails early without one
    handle, loaded_here = _resolve_adapter(model, adapter)
    if handle is None:
        raise ValueError("compare needs an adapter (a TinyLoRA handle or an adapter file path), got None")
    kwargs = dict(split=split, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    prompt = random = None
    others: dict[str, EvalReport] = {}
    try:
        reserved = {"base", "adapted", "prompt"} & set(vectors or {})
        if reserved:
            raise ValueError(f"vector name(s) {sorted(reserved)} are taken by the comparison's own rows; "
                             "choose another name (e.g. 'SFT')")
        checked = checked_vectors(handle, vectors or {})
        with handle.disabled():
            base = _run(model, tokenizer, task, examples, params=None, **kwargs)
            if prompted is not None:
                prompt = _run(model, tokenizer, task, prompted, params=None, **kwargs)
        adapted = _run(model, tokenizer, task, examples, params=handle.num_params, **kwargs)
        if "random" in controls:
            with random_directions(handle, draws=draws, seed=control_seed) as settings:
                runs = [(_run(model, tokenizer, task, examples, params=handle.num_params, **kwargs),
                         tuple(vector.tolist())) for vector in settings]
            random = RandomControl(tuple(r for r, _ in runs), tuple(v for _, v in runs))
        if checked:
            with other_vectors(handle, checked) as names:
                others = {name: _run(model, tokenizer, task, examples, params=handle.num_params, **kwargs)
                          for name in names}
    finally:
        if loaded_here:
            handle.remove()
    per_model = ["reply", "extracted", "formatted", "correct_strict", "correct_flexible", "length", "reward"]
    table = base.table[["prompt", "gold"]].copy()
    for column in per_model:
        table[f"base_{column}"] = base.table[column]
        table[f"adapted_{column}"] = adapted.table[column]
        if prompt is not None:
            table[f"prompt_{column}"] = prompt.table[column]
        for name, other in others.items():
            table[f"{name}_{column}"] = other.table[column]
    before, after = base.table["correct_strict"], adapted.table["correct_strict"]
    table["change"] = [
        "kept" if b and a else "lost" if b else "gained" if a else "neither" for b, a in zip(before, after)
    ]
    return Comparison(base=base, adapted=adapted, table=table, paired=_paired(base, adapted),
                      prompt=prompt, prompt_paired=None if prompt is None else _paired(prompt, adapted),
                      random=random, others=others or None,
                      others_paired={name: _paired(other, adapted) for name, other in others.items()}
                      or None)
