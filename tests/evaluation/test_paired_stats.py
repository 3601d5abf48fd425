"""paired: the exact McNemar p-value against scipy and by hand; Newcombe's paired interval against the
published worked examples, scipy's Wilson intervals, its exact coverage at the boundary; the bad inputs."""

import itertools
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from tinylab import paired as exported
from tinylab.evaluation.paired_stats import paired


def _table(both_right, gained, lost, both_wrong):
    """Outcomes of a 2x2 table: (before, after) lists in a fixed order."""
    before = [True] * both_right + [False] * gained + [True] * lost + [False] * both_wrong
    after = [True] * both_right + [True] * gained + [False] * lost + [False] * both_wrong
    return before, after


# Newcombe, R. G. (1998). Improved confidence intervals for the difference between binomial proportions
# based on paired data. Statistics in Medicine 17(22):2635-2650, Table II, method 10 (the hybrid score
# interval), his examples (a)-(d): e pairs positive on both, f positive on the first only, g on the second
# only, h on neither; the interval is for the first share minus the second, 95%, to 4 decimals. The same
# four intervals are the expected values of propint's tests (github.com/m-Py/propint,
# tests/testthat/test_Two_Dependent_Props_CI.R, "the results reported in Newcombe1998").
NEWCOMBE_1998 = [
    ((36, 12, 2, 0), (0.0569, 0.3404)),
    ((18, 12, 2, 18), (0.0562, 0.3290)),
    ((53, 0, 0, 1), (-0.0729, 0.0729)),
    ((0, 30, 0, 0), (0.8395, 1.0000)),  # every pair discordant one way: the boundary case
]


@pytest.mark.parametrize("counts, published", NEWCOMBE_1998)
def test_newcombes_published_examples(counts, published):
    e, f, g, h = counts
    # "after" is Newcombe's first classification, "before" the second: diff = (f - g) / n
    r = paired(*_table(both_right=e, gained=f, lost=g, both_wrong=h))
    assert r.diff == pytest.approx((f - g) / (e + f + g + h))
    assert (round(r.low, 4), round(r.high, 4)) == published


def test_all_flips_one_way_keeps_a_width():
    r = paired([False] * 20, [True] * 20)
    assert (r.diff, r.high, r.gained, r.lost) == (1.0, 1.0, 20, 0)
    assert r.low == pytest.approx(0.7721, abs=1e-4)  # not the zero-width [+100, +100] of a bootstrap
    assert r.p_value == 2 * 0.5**20 and r.beyond_noise
    assert "[95% CI +77.2, +100.0]" in r.line()
    down = paired([True] * 20, [False] * 20)
    assert (down.diff, down.low, down.high, down.p_value) == (-1.0, -1.0, -r.low, r.p_value)


def test_all_pairs_equal_gives_no_difference_p_one_and_an_interval_around_zero():
    before = [True, False, True, True, False, False, True]
    r = paired(before, list(before))
    assert (r.diff, r.gained, r.lost, r.n, r.p_value) == (0.0, 0, 0, 7, 1.0)
    assert r.low < 0 < r.high and r.low == pytest.approx(-r.high)
    assert r.before == r.after == 4 / 7 and not r.beyond_noise
    assert "within noise" in r.line("strict")


def test_uncorrelated_tables_add_scipys_wilson_intervals_in_quadrature():
    # 6 right both times, 7 gained, 4 lost, 6 wrong both: ad - bc = 36 - 28 lies in [0, n/2], so phi = 0
    before, after = _table(6, 7, 4, 6)
    n, b, a = len(before), sum(before), sum(after)
    l1, u1 = stats.binomtest(b, n).proportion_ci(method="wilson")
    l2, u2 = stats.binomtest(a, n).proportion_ci(method="wilson")
    r = paired(before, after)
    assert r.low == pytest.approx(r.diff - math.hypot(a / n - l2, u1 - b / n), rel=1e-9)
    assert r.high == pytest.approx(r.diff + math.hypot(u2 - a / n, b / n - l1), rel=1e-9)


def test_every_small_table_gives_an_interval_inside_minus_one_one_around_the_difference():
    for n in range(1, 9):
        for both, gained, lost in itertools.product(range(n + 1), repeat=3):
            if both + gained + lost > n:
                continue
            r = paired(*_table(both, gained, lost, n - both - gained - lost))
            assert -1.0 <= r.low <= r.diff <= r.high <= 1.0 and r.high - r.low > 0.1, (both, gained, lost, n, r)
            mirror = paired(*reversed(_table(both, gained, lost, n - both - gained - lost)))
            assert (mirror.low, mirror.high) == pytest.approx((-r.high, -r.low), abs=1e-12)


@pytest.mark.parametrize("probabilities", [(0.0, 0.0, 0.9, 0.1), (0.0, 0.02, 0.95, 0.03), (0.4, 0.1, 0.3, 0.2)])
def test_exact_coverage_at_n_20_stays_near_95_percent_at_the_boundary(probabilities):
    # every 2x2 table of 20 pairs, weighted by its multinomial probability: the share whose interval holds
    # the true difference (a zero-width interval at the boundary would miss it whenever all 20 flipped)
    p_both, p_lost, p_gained, p_neither = probabilities
    truth, covered, n = p_gained - p_lost, 0.0, 20
    for both, lost, gained in itertools.product(range(n + 1), repeat=3):
        neither = n - both - lost - gained
        if neither < 0:
            continue
        weight = stats.multinomial.pmf([both, lost, gained, neither], n, probabilities)
        if weight > 0:
            r = paired(*_table(both, gained, lost, neither))
            covered += weight * (r.low <= truth <= r.high)
    assert covered > 0.92


def test_a_known_two_by_two_table():
    # 20 right both times, 10 gained, 2 lost, 8 wrong both times (n = 40)
    before, after = _table(20, 10, 2, 8)
    r = paired(before, after)
    assert (r.n, r.gained, r.lost) == (40, 10, 2) and r.diff == pytest.approx(8 / 40)
    assert r.before == 22 / 40 and r.after == 30 / 40
    hand = 2 * (math.comb(12, 0) + math.comb(12, 1) + math.comb(12, 2)) / 2**12  # 158 / 4096
    assert r.p_value == pytest.approx(hand, rel=1e-12) == pytest.approx(0.0385742, rel=1e-5)
    assert r.p_value == pytest.approx(stats.binomtest(2, 12, 0.5).pvalue, rel=1e-12)
    assert 0 < r.low < r.diff < r.high and r.beyond_noise


@pytest.mark.parametrize("gained, lost", [(0, 1), (1, 0), (3, 3), (7, 2), (15, 4), (40, 31), (0, 25), (120, 95),
                                          (2600, 2400)])  # large: the tail by recurrence, not one comb per term
def test_p_value_is_scipys_binomial_test_of_the_discordant_pairs(gained, lost):
    before, after = _table(13, gained, lost, 9)
    expected = stats.binomtest(gained, gained + lost, 0.5, alternative="two-sided").pvalue
    assert paired(before, after).p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_accepts_numpy_pandas_and_torch_booleans():
    before, after = _table(4, 3, 1, 2)
    plain = paired(before, after)
    assert paired(np.array(before), pd.Series(after)) == plain
    assert paired(torch.tensor(before), torch.tensor(after)) == plain
    assert exported is paired


def test_the_function_does_not_shadow_its_module_and_its_doctest_holds():
    import doctest
    import importlib

    module = importlib.import_module(exported.__module__)  # tinylab.paired is the function
    assert module.__name__ == "tinylab.evaluation.paired_stats" and module.paired is exported
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"before has 3 outcomes and after has 2: they must be the same examples"):
        paired([True, False, True], [True, False])
    with pytest.raises(ValueError, match=r"before and after are empty"):
        paired([], [])
    with pytest.raises(ValueError, match=r"after\[1\]=1: the outcomes must be booleans"):
        paired([True, False], [True, 1])
    with pytest.raises(ValueError, match=r"before\[0\]=0\.5: the outcomes must be booleans"):
        paired(np.array([0.5, 1.0]), [True, False])


@pytest.mark.parametrize("bad, shown", [(None, "before=None"), (True, "before=True"), ({1: True}, "before={1: True}"),
                                        ((x for x in [True]), "before=<generator"), ("TF", "before='TF'")])
def test_a_whole_argument_that_is_no_list_of_outcomes_is_named_as_a_whole(bad, shown):
    with pytest.raises(ValueError, match=re.escape(shown) + r".*allowed: a list \(or 1-D array\) of booleans"):
        paired(bad, [True])


def test_a_table_of_outcomes_is_not_flattened():
    with pytest.raises(ValueError, match=r"before has shape \(1, 2\): allowed: a list \(or 1-D array\)"):
        paired(np.zeros((1, 2), dtype=bool), np.zeros((2, 1), dtype=bool))
