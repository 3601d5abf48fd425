"""Tasks: what a model is trained and judged on.

Built-in tasks by name: `get("gsm8k")`, `get("compare")`, `get("arithmetic")`, `get("capitals")`,
`get("capitals_answer")`;
`names()` lists them. Keyword arguments go to the task's constructor
(`get("gsm8k", source="my_problems.jsonl")`, `get("capitals", shape=RewardShape(flexible=0.2))`).
Your own task is any object with the `Task` attributes; `register(name, factory)` makes it
available by name too.
"""

from __future__ import annotations

from collections.abc import Callable

from tinylab.tasks.base import EXACT_MATCH, Example, RewardShape, Score, ScoredTask, Task, completion_text
from tinylab.tasks.capitals import CapitalAnswerTask, CapitalsTask
from tinylab.tasks.gsm8k import GSM8K
from tinylab.tasks.synthetic import ArithmeticTask, ComparisonTask, SyntheticTask

__all__ = [
    "EXACT_MATCH", "GSM8K", "ArithmeticTask", "CapitalAnswerTask", "CapitalsTask", "ComparisonTask", "Example", "RewardShape", "Score", "ScoredTask",
    "SyntheticTask", "Task", "check_name", "completion_text", "get", "names", "register", "resolve",
]

_REGISTRY: dict[str, Callable[..., Task]] = {
    "arithmetic": ArithmeticTask,
    "capitals": CapitalsTask,
    "capitals_answer": CapitalAnswerTask,
    "compare": ComparisonTask,
    "gsm8k": GSM8K,
}


def names() -> list[str]:
    """The names `get` knows, sorted."""
    return sorted(_REGISTRY)


def get(name: str | Task, **kwargs) -> Task:
    """A new task by name (keyword arguments go to its constructor); a task object is returned as is."""
    if not isinstance(name, str):
        if kwargs:
            raise TypeError("keyword arguments configure a task by name; got a task object")
        return resolve(name)
    return _REGISTRY[check_name(name)](**kwargs)


def check_name(name: str) -> str:
    """`name` when `get` knows it; else the ValueError every function gives for an unknown task name."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of {names()} or register your own")
    return name


def resolve(task: str | Task) -> Task:
    """The task a function was given: a name becomes `get(name)` (an unknown name is a ValueError
    listing the known ones); an object is used as it is (each function uses the parts of the Task
    protocol it needs: `examples` and `reward` to train, `score` to evaluate), as long as it has one."""
    if isinstance(task, str):
        return get(task)
    if not any(hasattr(task, part) for part in ("examples", "reward", "score")):
        raise TypeError(f"task={task!r:.80} is not a task: give a name from {names()} or an object with the "
                        "Task attributes (name, max_new_tokens, examples, reward, score)")
    return task


def register(name: str, factory: Callable[..., Task]) -> None:
    """Make `get(name, **kwargs)` return `factory(**kwargs)`; replaces an earlier registration."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is not allowed: a non-empty string")
    if not callable(factory):
        raise TypeError(f"factory must be callable (a task class or function), got {type(factory).__name__}")
    _REGISTRY[name] = factory

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
