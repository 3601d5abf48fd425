"""CPU-sized tasks generated from a seed: number comparison and small arithmetic.

Each task has a fixed universe of prompts, partitioned once into train and test by `split_seed`
(test gets `test_fraction` of it); `examples(split, n, seed)` then samples within one part, so no
prompt is ever in both splits whatever the sampling seed. Replies are short (`max_new_tokens = 16`).
`SyntheticTask` is the base class for such tasks; `tinylab.tasks.capitals` is another.
"""

from __future__ import annotations

import random
import re
from collections.abc import Hashable

from tinylab.basics.checks import check_int, check_number
from tinylab.tasks.base import (
    EXACT_MATCH,
    Example,
    RewardShape,
    Score,
    ScoredTask,
    check_split,
    sample,
    with_worked_example,
)

__all__ = ["ArithmeticTask", "ComparisonTask", "SyntheticTask"]


class SyntheticTask(ScoredTask):
    """A task with a finite universe of examples in groups; a group goes wholly to train or to test.

    Subclasses define `name`, `_groups()` -> list of (key, [Example, ...]) and `score`.
    """

    max_new_tokens = 16
    split_name: str | None = None
    """Seeds the train/test partition with `name` when None; tasks sharing a split_name split alike."""

    def __init__(self, *, split_seed: int = 0, test_fraction: float = 0.2, shape: RewardShape = EXACT_MATCH):
        if not isinstance(shape, RewardShape):
            raise TypeError(f"shape must be a RewardShape, got {type(shape).__name__}")
        test_fraction = check_number("test_fraction", test_fraction, low=0, high=1, low_open=True, high_open=True)
        self.split_seed = check_int("split_seed", split_seed)
        self.test_fraction = float(test_fraction)
        self.shape = shape
        self._parts: dict[str, list[Example]] | None = None

    def _groups(self) -> list[tuple[Hashable, list[Example]]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _split(self) -> dict[str, list[Example]]:
        if self._parts is None:
            groups = sorted(self._groups(), key=lambda g: repr(g[0]))
            random.Random(f"{self.split_name or self.name}/{self.split_seed}").shuffle(groups)
            n_test = max(1, round(len(groups) * self.test_fraction))
            self._parts = {
                "test": [e for _, examples in groups[:n_test] for e in examples],
                "train": [e for _, examples in groups[n_test:] for e in examples],
            }
        return self._parts

    def examples(self, split: str = "train", n: int | None = None, seed: int | None = 0) -> list[Example]:
        """`n` examples of `split` (all when None); a fixed order when `seed` is None."""
        check_split(split, self.name)
        return sample(self._split()[split], n, seed, f"{self.name}/{split}")

    def control_prompt(self, prompt):
        """The prompt control (`tinylab.evaluation.controls`): `prompt` after one worked example, the first
        training example in the split's fixed order (never a held-out one) with its reference reply."""
        return with_worked_example(prompt, self._split()["train"][0])


_LEADING_WORD = re.compile(r"^[^0-9A-Za-z]*([A-Za-z]+)")
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_INTEGER = re.compile(r"-?\d[\d,]*")
_BARE_INTEGER = re.compile(r"-?\d+")


class ComparisonTask(SyntheticTask):
    """"Is a greater than b? Answer yes or no." for a != b in 0..max_value.

    formatted: the reply's first word is yes or no; strict: that word is the answer; flexible: the
    first yes/no anywhere in the reply is the answer. Case and punctuation are ignored.

    >>> task = ComparisonTask()
    >>> task.reward(["Yes.", "No, 3 is smaller.", "I think yes"], ["yes", "yes", "yes"])
    [1.0, 0.0, 0.0]
    >>> task.score("I think yes", "yes")
    Score(formatted=False, correct_strict=False, correct_flexible=True, extracted='yes')
    """

    name = "compare"

    def __init__(self, *, max_value: int = 99, split_seed: int = 0, test_fraction: float = 0.2,
                 shape: RewardShape = EXACT_MATCH):
        max_value = check_int("max_value", max_value, low=2)
        super().__init__(split_seed=split_seed, test_fraction=test_fraction, shape=shape)
        self.max_value = max_value

    def _groups(self):
        groups = []
        for a in range(self.max_value + 1):
            for b in range(self.max_value + 1):
                if a != b:
                    prompt = [{"role": "user", "content": f"Is {a} greater than {b}? Answer yes or no."}]
                    answer = "yes" if a > b else "no"
                    groups.append(((a, b), [Example(prompt, answer, answer.capitalize())]))
        return groups

    def score(self, completion: str, answer: str) -> Score:
        gold = answer.strip().casefold()
        first = _LEADING_WORD.match(completion)
        first_word = first.group(1).casefold() if first else None
        formatted = first_word in ("yes", "no")
        anywhere = _YES_NO.search(completion)
        found = anywhere.group(1).casefold() if anywhere else None
        return Score(
            formatted=formatted,
            correct_strict=formatted and first_word == gold,
            correct_flexible=found == gold,
            extracted=first_word if formatted else found,
        )


class ArithmeticTask(SyntheticTask):
    """"What is a + b? Reply with the number only." for a, b in 0..max_operand and `ops` in "+-*".

    formatted: the whole reply is one integer (a final "." allowed); strict: that integer is right;
    flexible: the last integer in the reply is right.

    >>> task = ArithmeticTask()
    >>> task.reward(["12", "7 + 5 = 12", "13."], ["12", "12", "12"])
    [1.0, 0.0, 0.0]
    >>> task.score("7 + 5 = 12", "12")
    Score(formatted=False, correct_strict=False, correct_flexible=True, extracted='12')
    """

    name = "arithmetic"
    _OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

    def __init__(self, *, max_operand: int = 50, ops: str = "+-", split_seed: int = 0, test_fraction: float = 0.2,
                 shape: RewardShape = EXACT_MATCH):
        max_operand = check_int("max_operand", max_operand, low=1)
        if not ops or any(op not in self._OPS for op in ops) or len(set(ops)) != len(ops):
            raise ValueError(f"ops={ops!r} is not allowed: distinct characters from {''.join(self._OPS)!r}")
        super().__init__(split_seed=split_seed, test_fraction=test_fraction, shape=shape)
        self.max_operand = max_operand
        self.ops = ops

    def _groups(self):
        groups = []
        for op in self.ops:
            for a in range(self.max_operand + 1):
                for b in range(self.max_operand + 1):
                    prompt = [{"role": "user", "content": f"What is {a} {op} {b}? Reply with the number only."}]
                    answer = str(self._OPS[op](a, b))
                    groups.append(((op, a, b), [Example(prompt, answer, answer)]))
        return groups

    def score(self, completion: str, answer: str) -> Score:
        gold = answer.strip()
        reply = completion.strip()
        reply = reply[:-1] if reply.endswith(".") else reply
        formatted = _BARE_INTEGER.fullmatch(reply) is not None
        numbers = [m.replace(",", "") for m in _INTEGER.findall(completion)]
        last = numbers[-1] if numbers else None
        return Score(
            formatted=formatted,
            correct_strict=formatted and _as_int(reply) == _as_int(gold),
            correct_flexible=last is not None and _as_int(last) == _as_int(gold),
            extracted=reply if formatted else last,
        )


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None
