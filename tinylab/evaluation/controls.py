"""Controls for a comparison: what a prompt would have done, and what any direction of the same size does.

A gain from a few trained numbers is a finding only if cheaper explanations fail:

- prompt control: the base model with the instruction made explicit or one worked example
  prepended. A task says how through a `control_prompt(prompt)` method (capitals,
  capitals_answer, the synthetic tasks and GSM8K have one); `control_examples` applies it.
- random-direction control: the adapter's vectors replaced, per tying group, by vectors of the
  same norm in seeded random directions (`random_directions`). If those score like the trained
  vector, the direction did not matter, only the size of the perturbation.

- other vectors of the same adapter (same budget, same projections), e.g. the vector SFT trained
  at the same budget for the same steps: `other_vectors` sets each in turn.

`tinylab.evaluation.report.compare(..., controls=("prompt", "random"), vectors={"SFT": v})` runs them all
beside base and adapted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch

from tinylab import tasks
from tinylab.basics.checks import check_int
from tinylab.basics.seeds import generator
from tinylab.tasks.base import Example

__all__ = ["control_examples", "other_vectors", "random_directions"]


def control_examples(task, examples: Sequence[Example]) -> list[Example]:
    """The same examples with the task's (a Task or its name) control prompt (`task.control_prompt(prompt)`);
    answers kept."""
    task = tasks.resolve(task)
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
    restored bit for bit when the block ends, also on error (`adapter.kept_vector`, which also
    unmerges a merged adapter inside and merges it again after).

        with random_directions(adapter, draws=3, seed=0) as settings:
            scores = [evaluate(model, tok, task, n=64).strict for _ in settings]
    """
    check_int("draws", draws, low=1)
    check_int("seed", seed)

    def settings() -> Iterator[torch.Tensor]:
        saved = [v.detach().clone() for v in adapter.vectors]  # one (u,) fp32 vector per group, as found
        for draw in range(draws):
            with torch.no_grad():
                for group, (v, own) in enumerate(zip(adapter.vectors, saved)):
                    g = generator("random-direction control", seed, draw, group, device=own.device)
                    d = torch.randn(own.shape, generator=g, device=own.device, dtype=torch.float32)  # (u,)
                    v.copy_(d * (own.float().norm() / d.norm()))  # (u,): the group's norm, a random direction
            yield adapter.vector()

    with adapter.kept_vector():
        yield settings()


def checked_vectors(adapter, vectors: Mapping[str, Sequence[float] | torch.Tensor]) -> dict[str, torch.Tensor]:
    """`vectors` as fp32 CPU tensors, each checked: a name, `adapter.num_params` finite values."""
    checked = {}
    for name, values in vectors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"vector names must be non-empty strings, got {name!r}")
        t = torch.as_tensor(values, dtype=torch.float32, device="cpu").reshape(-1)  # (n,)
        if t.numel() != adapter.num_params:
            raise ValueError(f"vector {name!r} has {t.numel()} values; this adapter has {adapter.num_params} "
                             "(another vector must come from an adapter with the same config)")
        if not torch.isfinite(t).all():
            raise ValueError(f"vector {name!r} holds NaN or inf at positions "
                             f"{torch.nonzero(~torch.isfinite(t)).reshape(-1).tolist()}; all values must be finite")
        checked[name] = t
    return checked


@contextlib.contextmanager
def other_vectors(adapter, vectors: Mapping[str, Sequence[float] | torch.Tensor]) -> Iterator[Iterator[str]]:
    """Inside the block, iterate over the names of `vectors`, each set as the adapter's vector in turn.

    Each vector has the adapter's `num_params` values, groups in order (what `adapter.vector()`
    returns, e.g. of an SFT run at the same config). The adapter's own vectors are restored bit
    for bit when the block ends, also on error (`adapter.kept_vector`). Bad vectors are refused
    before any is set.
    """
    checked = checked_vectors(adapter, vectors)

    def settings() -> Iterator[str]:
        for name, values in checked.items():
            adapter.set_vector(values)
            yield name

    with adapter.kept_vector():
        yield settings()
