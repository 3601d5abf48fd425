"""Is a difference real or noise? Paired statistics over per-example outcomes of the same examples.

`paired(before, after)` takes one boolean per example for each of two models (or a model before
and after training) on the SAME examples, and returns a `PairedDifference`:

- `diff`: the change in accuracy, after minus before, as a fraction;
- `low`, `high`: a 95% interval of `diff` for paired data, Newcombe's hybrid score interval
  (method 10 of R. G. Newcombe, "Improved confidence intervals for the difference between binomial
  proportions based on paired data", Statistics in Medicine 17:2635-2650, 1998);
- `p_value`: the exact McNemar test: a two-sided binomial test of the discordant pairs (only the
  examples that changed carry information), `gained` of `gained + lost` against p = 1/2; 1.0 when
  no example changed;
- `gained` (wrong -> right), `lost` (right -> wrong) and `n`.

A paired test is the right one here: the same examples are scored twice, so an unpaired test of two
rates would count the examples' own difficulty as noise and call real changes insignificant.

The interval: Wilson score intervals `[l1, u1]` for the share right before and `[l2, u2]` after,
combined by "square and add" with the correlation `phi` of the two outcomes (Newcombe's continuity-
corrected estimate, 0 when a margin of the 2x2 table is empty):

    low  = diff - sqrt((after - l2)^2 - 2 phi (after - l2)(u1 - before) + (u1 - before)^2)
    high = diff + sqrt((u2 - after)^2 - 2 phi (u2 - after)(before - l1) + (before - l1)^2)

It stays inside [-1, 1] and keeps a width where the data sit at the boundary: 20 examples that all
went wrong -> right give +100 points with the interval [+77.2, +100], not a single point. Earlier
versions of this module gave a paired percentile bootstrap instead (with `n_boot` and `seed`
arguments, now gone), which collapses to zero width whenever every changed example changed the same
way or none changed; results saved by them (notebook outputs, older results files) show its intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedDifference", "paired"]

_Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class PairedDifference:
    """The difference between two sets of outcomes on the same `n` examples; rates are fractions."""

    n: int  # examples
    before: float  # share right before (or under A)
    after: float  # share right after (or under B)
    diff: float  # after - before
    low: float  # Newcombe's paired 95% interval of diff (method 10), lower end
    high: float  # upper end
    p_value: float  # exact McNemar (two-sided binomial test on the discordant pairs); 1.0 when there are none
    gained: int  # examples wrong before and right after
    lost: int  # examples right before and wrong after

    @property
    def beyond_noise(self) -> bool:
        """The 95% interval excludes 0 and McNemar's p < 0.05: more than noise at the usual level."""
        return (self.low > 0 or self.high < 0) and self.p_value < 0.05

    @property
    def verdict(self) -> str:
        """"more than noise", "within noise (...)" or "borderline (...)", as `line` prints it."""
        return ("more than noise" if self.beyond_noise
                else "within noise (the interval includes 0)" if self.low <= 0 <= self.high
                else "borderline (the interval excludes 0, McNemar p >= 0.05)")

    def line(self, label: str = "") -> str:
        """One line, in this shape: `LABEL  BEFORE% -> AFTER%  +DIFF points [95% CI +LOW, +HIGH]  gained G,
        lost L of N, McNemar p = P: VERDICT` (the verdict as `verdict` gives it)."""
        verdict = self.verdict
        head = f"{label}  " if label else ""
        return (f"{head}{self.before:.1%} -> {self.after:.1%}  {100 * self.diff:+.1f} points "
                f"[95% CI {100 * self.low:+.1f}, {100 * self.high:+.1f}]  gained {self.gained}, lost {self.lost} "
                f"of {self.n}, McNemar p = {self.p_value:.2g}: {verdict}")


def _booleans(name: str, values) -> np.ndarray:
    """`values` as a 1-D numpy bool array, or a ValueError naming the first value that is not a bool."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    if hasattr(values, "to_numpy"):  # a pandas Series
        values = values.to_numpy()
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise ValueError(f"{name}={values!r:.80}: allowed: a list (or 1-D array) of booleans, one per example")
    array = np.asarray(values, dtype=object) if not isinstance(values, np.ndarray) else values
    if array.ndim != 1:
        raise ValueError(f"{name} has shape {array.shape}: allowed: a list (or 1-D array) of booleans, one per example")
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
    term = tail = 1  # C(m, 0)
    for k in range(min(gained, lost)):  # C(m, k+1) from C(m, k): exact, one small product per term
        term = term * (m - k) // (k + 1)
        tail += term
    return min(1.0, 2 * tail / 2**m)  # exact integers, one correctly rounded division


def _wilson(right: int, n: int) -> tuple[float, float]:
    """Wilson's 95% score interval for a share of `right` out of `n`."""
    p, z2 = right / n, _Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _newcombe_interval(both: int, lost: int, gained: int, neither: int) -> tuple[float, float]:
    """Newcombe's method-10 95% interval for `after - before` from the paired 2x2 table: `both` right
    before and after, `lost` right only before, `gained` right only after, `neither` right."""
    n = both + lost + gained + neither
    before, after = (both + lost) / n, (both + gained) / n
    l1, u1 = _wilson(both + lost, n)
    l2, u2 = _wilson(both + gained, n)
    margins = (both + lost) * (gained + neither) * (both + gained) * (lost + neither)
    cross = both * neither - lost * gained  # > 0: the outcomes agree more often than chance would
    corrected = cross - n / 2 if cross > n / 2 else 0.0 if cross >= 0 else cross
    phi = corrected / math.sqrt(margins) if margins else 0.0
    after_down, before_up = after - l2, u1 - before  # the two ways diff can be smaller
    after_up, before_down = u2 - after, before - l1  # the two ways it can be larger
    low = (after - before) - math.sqrt(max(0.0, after_down**2 - 2 * phi * after_down * before_up + before_up**2))
    high = (after - before) + math.sqrt(max(0.0, after_up**2 - 2 * phi * after_up * before_down + before_down**2))
    return max(-1.0, low), min(1.0, high)


def paired(before: Sequence[bool], after: Sequence[bool]) -> PairedDifference:
    """Paired difference of per-example outcomes (`after` minus `before`), Newcombe's paired 95% interval
    and the exact McNemar p-value; see the module docstring.

    >>> r = paired([False] * 20, [True] * 20)
    >>> r.diff, round(r.low, 4), r.high, r.gained, r.lost, round(r.p_value, 8)
    (1.0, 0.7721, 1.0, 20, 0, 1.91e-06)
    """
    b, a = _booleans("before", before), _booleans("after", after)
    if len(b) != len(a):
        raise ValueError(f"before has {len(b)} outcomes and after has {len(a)}: they must be the same examples, "
                         "one outcome each")
    if len(b) == 0:
        raise ValueError("before and after are empty: paired statistics need at least one example")
    n = len(b)
    gained, lost = int(np.sum(~b & a)), int(np.sum(b & ~a))
    both = int(np.sum(b & a))
    low, high = _newcombe_interval(both, lost, gained, n - both - lost - gained)
    return PairedDifference(n=n, before=float(b.mean()), after=float(a.mean()), diff=(gained - lost) / n,
                            low=low, high=high, p_value=_mcnemar_exact(gained, lost), gained=gained, lost=lost)
