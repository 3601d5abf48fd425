"""What a task is: the `Task` protocol, the `Example` and `Score` records, and reward shaping.

A task knows its prompts, how to read an answer out of a reply, and its reward. Any object with
the attributes of `Task` is a task: `tinylab.evaluate` and the training loop only use those.
`ScoredTask` is an optional base class that derives `reward` from `score`, and makes the same
reward callable the way TRL's `GRPOTrainer` calls reward functions:
`reward(prompts=[...], completions=[...], completion_ids=[...], answer=[...], **other_columns)`,
where `completions` are strings or lists of chat messages (`[{"role": "assistant", "content": ...}]`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from tinylab.basics.checks import check_int, check_number

__all__ = [
    "EXACT_MATCH", "SPLITS", "Example", "RewardShape", "Score", "ScoredTask", "Task", "check_split", "completion_text", "sample",
    "with_worked_example",
]

SPLITS = ("train", "test")


class Example(NamedTuple):
    """One problem: what the model sees, the reference answer, and a reference reply for SFT."""

    prompt: str | list[dict[str, str]]  # chat messages [{"role": "user", "content": ...}] or a raw string
    answer: str  # the gold answer, as `score(reply, answer)` expects it
    solution: str | None = None  # a reply that scores as correct and well formatted (SFT target), if any


class Score(NamedTuple):
    """How one reply fares against one gold answer; format and correctness are kept apart."""

    formatted: bool  # the reply follows the task's answer format
    correct_strict: bool  # the answer read in the required format is right
    correct_flexible: bool  # a lenient reading of the reply finds the right answer
    extracted: str | None  # what was read out of the reply (the strict reading when formatted)


@runtime_checkable
class Task(Protocol):
    """Anything tinylab can train and evaluate on.

    `examples(split, n, seed)`: `split` is "train" or "test" (never sharing a prompt); `n=None` is
    all of them; `seed=None` keeps the task's own order, an int draws a seeded sample.
    `reward(completions, answers)`: one float (or None: "does not apply") per completion.
    Optional: `control_prompt(prompt) -> prompt`, the prompt control of `tinylab.evaluation.controls` (the
    instruction made explicit or one worked example prepended); tinylab's tasks have one.
    """

    name: str
    max_new_tokens: int

    def examples(self, split: str = "train", n: int | None = None, seed: int | None = 0) -> list[Example]: ...

    def reward(self, completions: Sequence, answers: Sequence[str] | None = None, **kwargs) -> list[float | None]: ...

    def score(self, completion: str, answer: str) -> Score: ...


@dataclass(frozen=True)
class RewardShape:
    """Reward from a `Score`: the first level a reply reaches, from strict-correct down to formatted.

    The default is the paper's exact-match reward (1 for strict-correct, else 0). Partial credit helps
    when correct replies are too rare for any group to see a non-zero reward, but credit for format
    alone tends to get learned first (see docs/method.md).
    """

    correct: float = 1.0
    """Reward for a strict-correct reply."""
    flexible: float = 0.0
    """Reward for a reply that is right only under the flexible reading (e.g. the city somewhere in it)."""
    formatted: float = 0.0
    """Reward for a well-formatted but wrong reply."""

    def __post_init__(self):
        for field in ("correct", "flexible", "formatted"):
            check_number(f"RewardShape.{field}", getattr(self, field))

    def __call__(self, score: Score) -> float:
        if score.correct_strict:
            return float(self.correct)
        if score.correct_flexible:
            return float(self.flexible)
        if score.formatted:
            return float(self.formatted)
        return 0.0


EXACT_MATCH = RewardShape()
"""The paper's reward: 1 for a strict-correct reply, else 0."""


def completion_text(completion: Any) -> str:
    """The reply text of a completion: a string, or TRL's conversational form (a list of messages,
    the last one the assistant's, whose content may be a string or a list of text parts).

    >>> completion_text([{"role": "assistant", "content": "Paris"}])
    'Paris'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion and all(isinstance(m, dict) for m in completion):
        content = completion[-1].get("content", "")
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise TypeError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}: {completion!r:.80}"
    )


def sample(items: Sequence, n: int | None, seed: int | None, what: str) -> list:
    """`n` items (all when None): in order when `seed` is None, else a seeded random sample."""
    items = list(items)
    if n is None:
        n = len(items)
    try:
        check_int("n", n, low=0, high=len(items))
    except ValueError as err:
        raise ValueError(f"{err} ({what} has {len(items)} examples; None takes all)") from None
    if seed is None:
        return items[:n]
    return random.Random(seed).sample(items, n)


def with_worked_example(prompt, example: Example):
    """`prompt` with one worked example before it: a user turn and the reference reply for chats,
    "question\\nreply\\n\\n" before a raw string.

    >>> with_worked_example([{"role": "user", "content": "2+2?"}], Example([{"role": "user", "content": "1+1?"}], "2", "2"))
    [{'role': 'user', 'content': '1+1?'}, {'role': 'assistant', 'content': '2'}, {'role': 'user', 'content': '2+2?'}]
    """
    if example.solution is None:
        raise ValueError(f"the worked example {example.prompt!r:.60} has no reference reply (solution)")
    if isinstance(prompt, str):
        shown = example.prompt if isinstance(example.prompt, str) else example.prompt[-1]["content"]
        return f"{shown}\n{example.solution}\n\n{prompt}"
    shown = [{"role": "user", "content": example.prompt}] if isinstance(example.prompt, str) else list(example.prompt)
    return [*shown, {"role": "assistant", "content": example.solution}, *prompt]


def check_split(split: str, name: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a split of task {name!r}; choose one of {list(SPLITS)}")


class ScoredTask:
    """Base class: `reward` is `shape(score(reply, gold))` for each reply; subclasses define `score`."""

    name: str = "task"
    max_new_tokens: int = 16
    shape: RewardShape = EXACT_MATCH

    def score(self, completion: str, answer: str) -> Score:  # pragma: no cover - abstract
        raise NotImplementedError

    def reward(self, completions: Sequence, answers: Sequence[str] | None = None, **kwargs) -> list[float | None]:
        """One reward per completion; also callable as a TRL reward function (keyword columns).

        `answers` may come as TRL's dataset column `answer=[...]`; other keywords (`prompts`,
        `completion_ids`, `trainer_state`, ...) are accepted and ignored.
        """
        if answers is None:
            answers = kwargs.get("answer")
        if answers is None:
            raise TypeError(f"{self.name}.reward needs the gold answers: reward(completions, answers) "
                            "or, as TRL calls it, a dataset column `answer`")
        if isinstance(completions, str) or isinstance(answers, str):
            raise TypeError("completions and answers must be lists (one entry per completion), not a single string")
        completions, answers = list(completions), list(answers)
        if len(completions) != len(answers):
            raise ValueError(f"got {len(completions)} completions but {len(answers)} answers; they must pair up")
        return [self.shape(self.score(completion_text(c), str(a))) for c, a in zip(completions, answers)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, max_new_tokens={self.max_new_tokens}, shape={self.shape})"
