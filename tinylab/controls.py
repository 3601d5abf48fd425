"""Controls for a comparison: what a prompt would have done, and what any direction of the same size does.

A gain from a few trained numbers is a finding only if cheaper explanations fail:

- prompt control: the base model with the instruction made explicit or one worked example
  prepended. A task says how through a `control_prompt(prompt)` method (capitals,
  capitals_answer, the synthetic tasks and GSM8K have one); `control_examples` applies it.
- random-direction control: the adapter's vectors replaced, per tying group, by vectors of the
  same norm in seeded random directions (`random_directions`). If those score like the trained
  vector, the direction did not matter, only the size of the perturbation.

`tinylab.evaluation.compare(..., controls=("prompt", "random"))` runs both beside base and adapted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from tinylab.checks import check_int
from tinylab.seeds import generator
from tinylab.tasks.base import Example

__all__ = ["control_examples", "random_directions"]


def control_examples(task, examples: Sequence[Example]) -> list[Example]:
    """The same examples with the task's control prompt (`task.control_prompt(prompt)`); answers kept."""
    make = getattr(task, "control_prompt", None)
    if not callable(make):
        raise ValueError(f"task {getattr(task, 'name', task)!r} has no prompt control; give it a method "
                         "control_prompt(prompt) -> prompt (an explicit instruction or one worked example), "
                         "as tinylab's capitals, capitals_answer and gsm8k tasks have")
    return [Example(make(ex.prompt), ex.answer, ex.solution) for ex in examples]


@contextlib.contextmanager
def random_directions(adapter, *, draws: int = 3, seed: int = 0) -> Iterator[Iterator[torch.Tensor]]:
    """Inside the block, iterate over `draws` seeded random settings of the adapter's vectors.

    Each setting gives every tying group a vector with the norm of that group's current vector in a
    random direction (N(0, I) normalised, seeded by (seed, draw, group)); the iterator yields the
    whole new vector (fp32, CPU, groups in order) after setting it. The adapter's own vectors are
    restored bit for bit when the block ends, also on error.

        with random_directions(adapter, draws=3, seed=0) as settings:
            scores = [evaluate(model, tok, task, n=64).strict for _ in settings]
    """
    check_int("draws", draws, low=1)
    check_int("seed", seed)
    if adapter.merged:
        raise ValueError("the adapter is merged; unmerge() it before a random-direction control")
    saved = [v.detach().clone() for v in adapter.vectors]  # one (u,) fp32 vector per group

    def settings() -> Iterator[torch.Tensor]:
        for draw in range(draws):
            with torch.no_grad():
                for group, (v, own) in enumerate(zip(adapter.vectors, saved)):
                    g = generator("random-direction control", seed, draw, group, device=own.device)
                    d = torch.randn(own.shape, generator=g, device=own.device, dtype=torch.float32)  # (u,)
                    v.copy_(d * (own.float().norm() / d.norm()))  # (u,): the group's norm, a random direction
            yield adapter.vector()

    try:
        yield settings()
    finally:
        with torch.no_grad():
            for v, own in zip(adapter.vectors, saved):
                v.copy_(own)
