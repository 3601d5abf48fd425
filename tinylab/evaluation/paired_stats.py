"""Is a difference real or noise? Paired statistics over per-example outcomes of the same examples.

`paired(before, after)` takes one boolean per example for each of two models (or a model before
and after training) on the SAME examples, and returns a `PairedDifference`:

- `diff`: the change in accuracy, after minus before, as a fraction;
- `low`, `high`: a paired bootstrap 95% percentile interval of `diff` (examples resampled with
  replacement, each keeping its pair of outcomes; seeded, so it is reproducible);
- `p_value`: the exact McNemar test: a two-sided binomial test of the discordant pairs (only the
  examples that changed carry information), `gained` of `gained + lost` against p = 1/2; 1.0 when
  no example changed;
- `gained` (wrong -> right), `lost` (right -> wrong) and `n`.

A paired test is the right one here: the same examples are scored twice, so an unpaired test of two
rates would count the examples' own difficulty as noise and call real changes insignificant.

Bootstrap detail: the resampled difference depends only on how many of the `n` drawn examples are
gained and lost pairs, so each replicate draws those two counts from a multinomial (the same
distribution as resampling indices, in O(n_boot) time).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tinylab.basics.checks import check_int

__all__ = ["PairedDifference", "paired"]


@dataclass(frozen=True)
class PairedDifference:
    """The difference between two sets of outcomes on the same `n` examples; rates are fractions."""

    n: int  # examples
    before: float  # share right before (or under A)
    after: float  # share right after (or under B)
    diff: float  # after - before
    low: float  # paired bootstrap 95% interval of diff, lower end
    high: float  # upper end
    p_value: float  # exact McNemar (two-sided binomial test on the discordant pairs); 1.0 when there are none
    gained: int  # examples wrong before and right after
    lost: int  # examples right before and wrong after

    @property
    def beyond_noise(self) -> bool:
        """The 95% interval excludes 0 and McNemar's p < 0.05: more than noise at the usual level."""
        return (self.low > 0 or self.high < 0) and self.p_value < 0.05

    def line(self, label: str = "") -> str:
        """One line: `strict  0.0% -> 41.6%  +41.6 points [95% CI +33.3, +50.4]  gained 54, lost 0 of 129,
        McNemar p = 1.1e-16: more than noise`."""
        verdict = ("more than noise" if self.beyond_noise
                   else "within noise (the interval includes 0)" if self.low <= 0 <= self.high
                   else "borderline (the interval excludes 0, McNemar p >= 0.05)")
        head = f"{label}  " if label else ""
        return (f"{head}{self.before:.1%} -> {self.after:.1%}  {100 * self.diff:+.1f} points "
                f"[95% CI {100 * self.low:+.1f}, {100 * self.high:+.1f}]  gained {self.gained}, lost {self.lost} "
                f"of {self.n}, McNemar p = {self.p_value:.2g}: {verdict}")


def _booleans(name: str, values) -> np.ndarray:
    """`values` as a 1-D numpy bool array, or a ValueError naming the first value that is not a bool."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=object).reshape(-1) if not isinstance(values, np.ndarray) else values.reshape(-1)
    if array.dtype != np.bool_:
        for i, x in enumerate(array):
            if not isinstance(x, (bool, np.bool_)):
                shown = x.item() if isinstance(x, np.generic) else x
                raise ValueError(f"{name}[{i}]={shown!r}: the outcomes must be booleans (True = right), one per example")
        array = array.astype(bool)
    return array


def _mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact binomial test of min(gained, lost) out of gained + lost against p = 1/2."""
    m = gained + lost
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(gained, lost) + 1))
    return min(1.0, 2 * tail / 2**m)  # exact integers, one correctly rounded division


def paired(before: Sequence[bool], after: Sequence[bool], *, n_boot: int = 10_000, seed: int = 0) -> PairedDifference:
    """Paired difference of per-example outcomes (`after` minus `before`), its bootstrap 95% interval
    (`n_boot` resamples, seeded by `seed`) and the exact McNemar p-value; see the module docstring.

    >>> r = paired([False] * 10, [True] * 10)
    >>> r.diff, r.low, r.high, r.gained, r.lost, round(r.p_value, 6)
    (1.0, 1.0, 1.0, 10, 0, 0.001953)
    """
    check_int("n_boot", n_boot, low=1)
    check_int("seed", seed)
    b, a = _booleans("before", before), _booleans("after", after)
    if len(b) != len(a):
        raise ValueError(f"before has {len(b)} outcomes and after has {len(a)}: they must be the same examples, "
                         "one outcome each")
    if len(b) == 0:
        raise ValueError("before and after are empty: paired statistics need at least one example")
    n = len(b)
    gained, lost = int(np.sum(~b & a)), int(np.sum(b & ~a))
    counts = np.random.default_rng(seed).multinomial(n, [gained / n, lost / n, 1 - (gained + lost) / n],
                                                     size=n_boot)  # [n_boot, 3]: gained, lost, unchanged
    diffs = (counts[:, 0] - counts[:, 1]) / n  # [n_boot]
    low, high = np.quantile(diffs, [0.025, 0.975])
    return PairedDifference(n=n, before=float(b.mean()), after=float(a.mean()), diff=(gained - lost) / n,
                            low=float(low), high=float(high), p_value=_mcnemar_exact(gained, lost),
                            gained=gained, lost=lost)
