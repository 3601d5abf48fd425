"""The budget sweep's figure: held-out score against trained parameters, one panel per measure.

`budget_sweep_figure(results, base)` takes the rows of `tinylab.experiments.budget_sweep` (one per
method, budget and seed) and draws each method's mean over seeds with one standard deviation as error
bars, on a log axis whose ticks are the budgets that were run, and the base model as a dashed line.
Every line stays visible where it lies on 0 or 1, or on another: the y axis runs a little past both
ends, points carry markers, the methods sit slightly apart at each budget, and the base model's line
is drawn first, wide and pale, with its value written at its end, so a method's line on top of it
leaves it showing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["budget_sweep_figure"]

MEASURES = ("formatted", "strict", "flexible")
COLORS = {"GRPO": "#1f77b4", "SFT": "#ff7f0e"}
_BASE_COLOR = "#555555"
_MARGIN = 0.05  # the y axis runs from -5% to 105%: lines on 0 or 1 stay clear of the axes
_DODGE = 1.08  # methods drawn at budget / 1.08 and budget * 1.08 (a log axis: the same gap at every budget)


def _base_rate(base, measure: str) -> float | None:
    if base is None:
        return None
    if isinstance(base, Mapping):
        return base.get(measure)
    return getattr(base, measure, None)


def budget_sweep_figure(results: pd.DataFrame, base=None, *, measures: Sequence[str] = MEASURES,
                        title: str | None = None) -> go.Figure:
    """The figure described in the module docstring. `results` has columns method, params, seed and
    one column per measure (shares in [0, 1]); `base` is an `EvalReport` or a mapping measure -> share
    (the dashed line; None: no line)."""
    missing = [c for c in ("method", "params", *measures) if c not in results.columns]
    if missing:
        raise ValueError(f"results lacks the columns {missing}: expected the rows of budget_sweep (method, params, "
                         f"seed, {', '.join(measures)})")
    if results.empty:
        raise ValueError("results is empty: there is nothing to draw")
    summary = results.groupby(["method", "params"])[list(measures)].agg(["mean", "std"]).fillna(0.0)
    methods = sorted(set(results["method"]), key=lambda m: (m not in COLORS, list(COLORS).index(m) if m in COLORS else 0, m))
    budgets = sorted(results["params"].unique())
    shift = {m: _DODGE ** (i - (len(methods) - 1) / 2) for i, m in enumerate(methods)}
    figure = make_subplots(rows=1, cols=len(measures), subplot_titles=list(measures), shared_yaxes=True,
                           horizontal_spacing=0.04)
    for col, measure in enumerate(measures, start=1):
        rate = _base_rate(base, measure)
        if rate is not None:  # first, wide and pale: a method's line on top of it leaves its edges showing
            figure.add_trace(go.Scatter(
                x=[budgets[0] / _DODGE**2, budgets[-1] * _DODGE**2], y=[rate, rate], mode="lines",
                line=dict(color=_BASE_COLOR, width=8), opacity=0.3, name="base model",
                legendgroup="base", showlegend=col == 1,
                hovertemplate=f"base model: {rate:.1%}<extra>{measure}</extra>"), row=1, col=col)
            figure.add_annotation(x=1, xref="x domain" if col == 1 else f"x{col} domain", y=rate, yref=f"y{col}"
                                  if col > 1 else "y", text=f"base {rate:.1%}", showarrow=False, xanchor="right",
                                  yanchor="bottom", yshift=3, font=dict(size=11, color=_BASE_COLOR))
        for method in methods:
            part = summary.loc[method, measure]
            figure.add_trace(go.Scatter(
                x=[p * shift[method] for p in part.index], y=part["mean"], name=method, legendgroup=method,
                error_y=dict(type="data", array=part["std"], thickness=1.5, width=4),
                mode="lines+markers", line=dict(color=COLORS.get(method), width=2.5),
                marker=dict(size=8, color=COLORS.get(method), line=dict(width=1, color="white")),
                customdata=list(part.index), showlegend=col == 1,
                hovertemplate=f"{method}, %{{customdata}} params: %{{y:.1%}}<extra>{measure}</extra>"), row=1, col=col)
    figure.update_xaxes(type="log", tickvals=budgets, ticktext=[str(b) for b in budgets], tickangle=0,
                        minor=dict(showgrid=False), title_text="trained parameters (log scale)")
    figure.update_yaxes(range=[-_MARGIN, 1 + _MARGIN], tickvals=[0, 0.25, 0.5, 0.75, 1], tickformat=".0%",
                        zeroline=True, zerolinecolor="#999999", zerolinewidth=1)
    n = results.groupby(["method", "params"]).size().max()
    figure.update_yaxes(title_text="share of held-out prompts", col=1)
    figure.update_layout(width=1050, height=430, title=title or f"{n} seed(s) per point: mean, error bars 1 s.d.",
                         legend=dict(orientation="h", yanchor="bottom", y=-0.32, xanchor="center", x=0.5),
                         margin=dict(b=110))
    return figure
