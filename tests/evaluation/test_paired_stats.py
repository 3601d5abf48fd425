"""paired: the exact McNemar p-value against scipy and by hand, the bootstrap interval against
scipy's paired bootstrap and hand-computed cases, and the bad inputs."""

import math

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


def test_all_pairs_equal_gives_no_difference_and_p_one():
    before = [True, False, True, True, False, False, True]
    r = paired(before, list(before))
    assert (r.diff, r.low, r.high, r.gained, r.lost, r.n, r.p_value) == (0.0, 0.0, 0.0, 0, 0, 7, 1.0)
    assert r.before == r.after == 4 / 7 and not r.beyond_noise
    assert "within noise" in r.line("strict")


def test_all_flips_one_way():
    r = paired([False] * 12, [True] * 12)
    # every resample holds only gained pairs: the interval is the point; p = 2 * 0.5**12 by hand
    assert (r.diff, r.low, r.high, r.gained, r.lost) == (1.0, 1.0, 1.0, 12, 0)
    assert r.p_value == 2 * 0.5**12 and r.beyond_noise
    down = paired([True] * 12, [False] * 12)
    assert (down.diff, down.low, down.high, down.p_value) == (-1.0, -1.0, -1.0, r.p_value)


def test_a_known_two_by_two_table():
    # 20 right both times, 10 gained, 2 lost, 8 wrong both times (n = 40)
    before, after = _table(20, 10, 2, 8)
    r = paired(before, after)
    assert (r.n, r.gained, r.lost) == (40, 10, 2) and r.diff == pytest.approx(8 / 40)
    assert r.before == 22 / 40 and r.after == 30 / 40
    hand = 2 * (math.comb(12, 0) + math.comb(12, 1) + math.comb(12, 2)) / 2**12  # 158 / 4096
    assert r.p_value == pytest.approx(hand, rel=1e-12) == pytest.approx(0.0385742, rel=1e-5)
    assert r.p_value == pytest.approx(stats.binomtest(2, 12, 0.5).pvalue, rel=1e-12)


@pytest.mark.parametrize("gained, lost", [(0, 1), (1, 0), (3, 3), (7, 2), (15, 4), (40, 31), (0, 25), (120, 95)])
def test_p_value_is_scipys_binomial_test_of_the_discordant_pairs(gained, lost):
    before, after = _table(13, gained, lost, 9)
    expected = stats.binomtest(gained, gained + lost, 0.5, alternative="two-sided").pvalue
    assert paired(before, after).p_value == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("counts", [(20, 10, 2, 8), (50, 9, 14, 27), (5, 30, 1, 4)])
def test_interval_matches_scipys_paired_percentile_bootstrap(counts):
    before, after = _table(*counts)
    r = paired(before, after, n_boot=20_000, seed=1)
    b, a = np.array(before, float), np.array(after, float)
    ref = stats.bootstrap((b, a), lambda x, y, axis: np.mean(y - x, axis=axis), paired=True, vectorized=True,
                          n_resamples=20_000, method="percentile", random_state=np.random.default_rng(0))
    step = 1.5 / len(before)  # the resampled differences lie on a grid of 1/n; quantiles may differ by a step
    assert r.low == pytest.approx(ref.confidence_interval.low, abs=step)
    assert r.high == pytest.approx(ref.confidence_interval.high, abs=step)
    # and the normal approximation of the paired difference's standard error, by hand
    n, g, lo = len(before), counts[1], counts[2]
    se = math.sqrt(((g + lo) / n - ((g - lo) / n) ** 2) / n)
    assert r.low == pytest.approx(r.diff - 1.96 * se, abs=0.03) and r.high == pytest.approx(r.diff + 1.96 * se, abs=0.03)


def test_interval_is_seeded():
    before, after = _table(30, 8, 5, 17)
    assert paired(before, after, seed=3) == paired(before, after, seed=3)
    lows = {paired(before, after, n_boot=200, seed=s).low for s in range(6)}
    assert len(lows) > 1  # the seed does choose the resamples


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
    with pytest.raises(ValueError, match=r"n_boot=0: must be an integer >= 1"):
        paired([True], [False], n_boot=0)
    with pytest.raises(ValueError, match=r"seed=1\.5: must be an integer"):
        paired([True], [False], seed=1.5)
