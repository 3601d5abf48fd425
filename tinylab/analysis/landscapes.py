"""The score around the trained point: a sweep along one trained number (or any direction in
v-space), and a 2-D grid over two numbers.

Each point sets v (`set_vector`: no SVD, no re-attach) and measures, on fixed examples, the mean
teacher-forced gold log-probability (`tinylab.measures.gold.GoldSet`: one forward per batch, no
generation), and with a task the greedy-reply scores (strict / flexible / formatted). The vector
is put back exactly afterwards, also when a point raises or the run is interrupted.

    sw = sweep_number(model, tok, adapter, examples, number=3, values=grid_around(float(adapter.vector()[3])))
    sw.table            # value, logprob (, strict, flexible, formatted)
    sw.trained, sw.zero # where the trained value and 0 sit on the swept axis
    ls = landscape(model, tok, adapter, examples, (3, 7))
    ls.logprob          # [len(y), len(x)]; ls.trained and ls.origin mark the two special points
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from tinylab.adapter.attach import TinyLoRA, check_adapter
from tinylab.analysis.knobs import Meter, check_values, number_index, number_label, with_values
from tinylab.basics.checks import check_int, check_number
from tinylab.model.eval_mode import eval_mode

__all__ = ["Landscape", "Sweep", "grid_around", "landscape", "sweep_number"]


class Sweep(NamedTuple):
    """The metrics along one line in v-space.

    For a number: v_i takes each of `values`, the other numbers keep their trained values. For a
    direction d: v = v_trained + t d for each t in `values`.
    """

    label: str  # "v3", "g1.v0", or "direction"
    number: int | None  # flat position swept; None for a direction
    values: np.ndarray  # [K] the swept coordinate
    trained: float  # the trained point's coordinate (v_i trained; 0.0 along a direction)
    zero: float | None  # coordinate where the swept number is 0 (0.0); along a direction, where the
    # line passes through v = 0 if it does, else None
    table: pd.DataFrame  # one row per value: value, logprob (, strict, flexible, formatted)
    per_example: np.ndarray  # [K, N] gold log-prob per example


class Landscape(NamedTuple):
    """The metrics over a grid of two numbers, the others at their trained values."""

    numbers: tuple[int, int]  # flat positions (x axis, y axis)
    labels: tuple[str, str]
    x: np.ndarray  # [K1] values of the first number
    y: np.ndarray  # [K2] values of the second number
    logprob: np.ndarray  # [K2, K1] mean gold log-prob (row: y value, column: x value)
    scores: dict[str, np.ndarray]  # strict / flexible / formatted [K2, K1]; empty without a task
    trained: tuple[float, float]  # the trained point
    origin: tuple[float, float]  # both numbers at 0 (0.0, 0.0)

    def best(self, metric: str = "logprob") -> tuple[float, float]:
        """(x, y) of the grid point with the highest `metric`."""
        grid = self.logprob if metric == "logprob" else self.scores.get(metric)
        if grid is None:
            raise ValueError(f"metric={metric!r} was not measured; measured: {['logprob', *self.scores]}")
        row, col = np.unravel_index(int(np.nanargmax(grid)), grid.shape)
        return float(self.x[col]), float(self.y[row])


def grid_around(value: float, n: int = 9, margin: float = 0.5) -> np.ndarray:
    """`n` evenly spaced values covering 0 and `value` with `margin` x |value| to spare on each side
    (+-1 around 0 when value is 0), with 0 and `value` themselves always included (sorted)."""
    value = check_number("value", value)
    n = check_int("n", n, low=2)
    margin = check_number("margin", margin, low=0)
    scale = abs(value) if value != 0 else 1.0
    low, high = min(0.0, value) - margin * scale, max(0.0, value) + margin * scale
    points = np.concatenate([np.linspace(low, high, n), [0.0, value]])
    return np.unique(points)


def _run(meter: Meter, adapter: TinyLoRA, vectors) -> tuple[list[dict], list[np.ndarray]]:
    found, per_example = [], []
    for v in vectors:
        adapter.set_vector(v)
        metrics, lp = meter()
        found.append(metrics)
        per_example.append(lp)
    return found, per_example


def _direction(adapter: TinyLoRA, direction) -> torch.Tensor:
    d = torch.as_tensor(direction.tolist() if isinstance(direction, np.ndarray) else direction,
                        dtype=torch.float32, device="cpu").reshape(-1)  # (num_params,)
    if d.numel() != adapter.num_params:
        raise ValueError(f"direction has {d.numel()} entries; this adapter has {adapter.num_params} numbers")
    if not torch.isfinite(d).all() or not d.any():
        raise ValueError("direction must be finite and not all zeros")
    return d


def _zero_on_line(trained: torch.Tensor, d: torch.Tensor) -> float | None:
    t = -float(trained @ d) / float(d @ d)
    return t if torch.allclose(trained + t * d, torch.zeros_like(d), atol=1e-6 * (1 + float(trained.abs().max()))) else None


def sweep_number(model, tokenizer, adapter: TinyLoRA, examples, number=None, values=None, *, direction=None, task=None,
          target: str = "answer", max_new_tokens: int | None = None, batch_size: int = 8) -> Sweep:
    """Metrics along one number (`number`: an entry, a flat position or a (group, entry) pair) or
    along `direction` ((num_params,) in v-space, from the trained point); give exactly one.
    `values`: the coordinates (default: `grid_around` the trained value, or t in -1..1 along a
    direction). `task`: also score greedy replies. See `GoldSet` for `target`."""
    check_adapter(adapter, model)
    if (number is None) == (direction is None):
        raise ValueError("give exactly one of number=... or direction=...")
    trained_v = adapter.vector()  # (num_params,) fp32, cpu
    if number is not None:
        i = number_index(adapter, number)
        values = grid_around(float(trained_v[i])) if values is None else check_values("values", values)
        vectors = [with_values(trained_v, {i: x}) for x in values]
        label, trained, zero = number_label(adapter, i), float(trained_v[i]), 0.0
    else:
        d = _direction(adapter, direction)
        values = np.linspace(-1.0, 1.0, 9) if values is None else check_values("values", values)
        vectors = [trained_v + x * d for x in values]
        i, label, trained, zero = None, "direction", 0.0, _zero_on_line(trained_v, d)
    meter = Meter(model, tokenizer, examples, task, target, max_new_tokens, batch_size)
    with adapter.kept_vector(), eval_mode(model):
        found, per_example = _run(meter, adapter, vectors)
    table = pd.DataFrame(found)
    table.insert(0, "value", [float(x) for x in values])
    return Sweep(label, i, np.asarray(values, dtype=float), trained, zero, table, np.stack(per_example))


def landscape(model, tokenizer, adapter: TinyLoRA, examples, numbers, x=None, y=None, *, task=None,
              target: str = "answer", max_new_tokens: int | None = None, batch_size: int = 8) -> Landscape:
    """Metrics over the grid x x y of two numbers (`numbers`: a pair of numbers, each an entry, a
    flat position or a (group, entry) pair), the others at their trained values. `x`, `y`: the
    values (default: `grid_around` each trained value, 7 points plus 0 and the trained value)."""
    check_adapter(adapter, model)
    if isinstance(numbers, str) or not hasattr(numbers, "__len__") or len(numbers) != 2:
        raise ValueError(f"numbers={numbers!r}: give two numbers, e.g. (0, 1) or ((0, 3), (1, 3))")
    a, b = (number_index(adapter, n) for n in numbers)
    if a == b:
        raise ValueError(f"numbers={numbers!r} name the same number twice; give two different ones")
    trained_v = adapter.vector()  # (num_params,) fp32, cpu
    ta, tb = float(trained_v[a]), float(trained_v[b])
    x = grid_around(ta, 7) if x is None else np.asarray(check_values("x", x))
    y = grid_around(tb, 7) if y is None else np.asarray(check_values("y", y))
    vectors = [with_values(trained_v, {a: float(xa), b: float(yb)}) for yb in y for xa in x]
    meter = Meter(model, tokenizer, examples, task, target, max_new_tokens, batch_size)
    with adapter.kept_vector(), eval_mode(model):
        found, _ = _run(meter, adapter, vectors)
    shape = (len(y), len(x))
    grids = {k: np.array([f[k] for f in found], dtype=float).reshape(shape) for k in found[0]}
    logprob = grids.pop("logprob")
    return Landscape((a, b), (number_label(adapter, a), number_label(adapter, b)), np.asarray(x, dtype=float),
                     np.asarray(y, dtype=float), logprob, grids, (ta, tb), (0.0, 0.0))

