"""budget_sweep_figure: lines on 0 stay visible (y axis past 0 and 1, markers, the base line under the
methods and labelled), the budgets are the ticks, the methods do not hide each other; bad input is named."""

import pandas as pd
import pytest
from tinylab.widgets import budget_sweep_figure

BUDGETS = (1, 13, 840)


def _results():
    rows = []
    for params in BUDGETS:
        for seed in (0, 1):
            rows.append(dict(method="GRPO", params=params, seed=seed, formatted=0.0, strict=0.0, flexible=0.6 + 0.01 * seed))
            rows.append(dict(method="SFT", params=params, seed=seed, formatted=0.5, strict=0.1 * seed, flexible=0.3))
    return pd.DataFrame(rows)


def test_lines_on_zero_are_visible_and_the_budgets_are_the_ticks():
    figure = budget_sweep_figure(_results(), {"formatted": 0.0, "strict": 0.0, "flexible": 0.49})
    layout = figure.layout
    for axis in ("yaxis", "yaxis2", "yaxis3"):
        low, high = layout[axis].range
        assert low < 0 and high > 1  # a line at 0 (or 1) is drawn inside the plot, not on its edge
    for axis in ("xaxis", "xaxis2", "xaxis3"):
        assert layout[axis].type == "log" and tuple(layout[axis].tickvals) == BUDGETS
        assert tuple(layout[axis].ticktext) == tuple(str(b) for b in BUDGETS)
    by_panel = {}
    for index, trace in enumerate(figure.data):
        by_panel.setdefault(trace.xaxis, []).append((index, trace))
    assert len(by_panel) == 3
    for traces in by_panel.values():
        (first, base), *methods = traces
        assert base.name == "base model" and "markers" not in base.mode
        assert [t.name for _, t in methods] == ["GRPO", "SFT"] and all("markers" in t.mode for _, t in methods)
        assert all(first < i and base.line.width > t.line.width for i, t in methods)  # under the methods, wider
        grpo, sft = methods[0][1], methods[1][1]
        assert all(g < b < s for g, b, s in zip(grpo.x, BUDGETS, sft.x))  # side by side around the budget
    formatted = by_panel["x"]
    assert tuple(formatted[1][1].y) == (0.0, 0.0, 0.0) and tuple(formatted[0][1].y) == (0.0, 0.0)
    assert [a.text for a in layout.annotations if a.text.startswith("base")] == ["base 0.0%", "base 0.0%", "base 49.0%"]
    assert sum(t.showlegend is not False for t in figure.data) == 3  # one legend entry each: base, GRPO, SFT


def test_an_eval_report_like_base_and_no_base():
    class Report:
        formatted, strict, flexible = 0.1, 0.2, 0.3

    with_base = budget_sweep_figure(_results(), Report())
    assert [t.y[0] for t in with_base.data if t.name == "base model"] == [0.1, 0.2, 0.3]
    assert not [t for t in budget_sweep_figure(_results()).data if t.name == "base model"]


def test_bad_results_are_named():
    with pytest.raises(ValueError, match=r"results lacks the columns \['strict'\]"):
        budget_sweep_figure(_results().drop(columns="strict"))
    with pytest.raises(ValueError, match="results is empty"):
        budget_sweep_figure(_results().iloc[:0])
