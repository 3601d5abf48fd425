"""ImportanceHeatmap: layers x module types, a score dropdown, outlines, and a per-head drill-down.

Takes an `Importance` (from `tinylab.analysis.importance.module_importance`) or a `WeightImportance`
(from `weight_importance`); give the latter as `weights=` too to drill down into heads from a
module-importance map. Click a cell (or call `select(layer, module)`) to see that module's
per-head Taylor scores (rows of q/k/v, columns of o). `outline(cells)` draws a box around cells:
the budget slider marks the modules a plan adapts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from tinylab.adapter.targets import kind_order
from tinylab.analysis.importance import SCORES, SPREAD, Importance, WeightImportance
from tinylab.basics.checks import check_choice

__all__ = ["ImportanceHeatmap", "module_grid"]

_WEIGHT_SCORES = ("taylor", "taylor_per_weight")
_WEIGHT_SPREAD = {"taylor": "taylor_std", "taylor_per_weight": None}
_LABELS = {
    "fisher": "Fisher: mean |dJ/dR|^2 over prompts",
    "grad": "|batch gradient| of R",
    "abs_mean": "mean |dJ/dR| over prompts",
    "consistency": "consistency: |mean g|^2 / mean |g|^2",
    "taylor": "Taylor |W * dJ/dW| (sum per module)",
    "taylor_per_weight": "Taylor |W * dJ/dW| per weight",
}


def module_grid(layers: list[int], kinds: list[str], *, title: str = "") -> go.FigureWidget:
    """An empty layers x module-types heatmap; x is the type's index so outlines are simple boxes."""
    figure = go.FigureWidget(go.Heatmap(x=list(range(len(kinds))), y=layers, colorscale="Viridis",
                                        hoverongaps=False, xgap=1, ygap=1))
    figure.update_layout(title=title, width=460, height=max(280, 16 * len(layers) + 130),
                         margin=dict(l=50, r=10, t=50, b=70), yaxis_title="layer")
    figure.update_xaxes(tickvals=list(range(len(kinds))), ticktext=list(kinds), tickangle=-45)
    figure.update_yaxes(autorange="reversed", dtick=1 if len(layers) <= 12 else 5)
    return figure


def outline_shapes(cells: Iterable[tuple[int, str]], kinds: list[str], color: str = "crimson") -> list[dict]:
    """Rectangle shapes around (layer, module type) cells of a `module_grid`."""
    column = {k: i for i, k in enumerate(kinds)}
    return [dict(type="rect", xref="x", yref="y", x0=column[k] - 0.5, x1=column[k] + 0.5,
                 y0=layer - 0.5, y1=layer + 0.5, line=dict(color=color, width=2))
            for layer, k in cells if k in column]


class ImportanceHeatmap(widgets.VBox):
    """Layers x module types coloured by an importance score; hover shows the score and its spread."""

    def __init__(self, importance: Importance | WeightImportance, *, kind: str | None = None,
                 weights: WeightImportance | None = None):
        if not isinstance(importance, (Importance, WeightImportance)):
            raise TypeError(f"importance must be an Importance or WeightImportance, got {type(importance).__name__}")
        if weights is None and isinstance(importance, WeightImportance):
            weights = importance
        if weights is not None and not isinstance(weights, WeightImportance):
            raise TypeError(f"weights must be a WeightImportance, got {type(weights).__name__}")
        self.importance, self.weights = importance, weights
        kinds_allowed = SCORES if isinstance(importance, Importance) else _WEIGHT_SCORES
        kind = kind or kinds_allowed[0]
        check_choice("kind", kind, kinds_allowed)
        table = importance.table
        self.layers = sorted({int(layer) for layer, _ in table.index})
        present = {k for _, k in table.index}
        self.kinds = kind_order(present)  # the columns in the order the budget slider uses
        self.selected: tuple[int, str] | None = None
        self.outlined: list[tuple[int, str]] = []

        self.kind = widgets.Dropdown(options=[(_LABELS.get(k, k), k) for k in kinds_allowed], value=kind,
                                     description="score", layout=widgets.Layout(width="420px"))
        self.figure = module_grid(self.layers, self.kinds, title=f"{getattr(importance, 'objective', '')} importance")
        self.figure.data[0].on_click(self._clicked)
        self.heads_figure = go.FigureWidget(go.Bar(x=[], y=[]))
        self.heads_figure.update_layout(width=360, height=280, margin=dict(l=50, r=10, t=50, b=40),
                                        title="click a cell for its heads", xaxis_title="head")
        self.kind.observe(lambda _: self._draw(), names="value")
        self._draw()
        children = [self.kind, widgets.HBox([self.figure] + ([self.heads_figure] if weights is not None else []))]
        super().__init__(children)

    def values(self, kind: str | None = None) -> np.ndarray:
        """[layers, module types] scores (NaN where a module is missing)."""
        return self._grid(self.importance.table, kind or self.kind.value)

    def _grid(self, table, column: str | None) -> np.ndarray:
        z = np.full((len(self.layers), len(self.kinds)), np.nan)
        if column is None:
            return z
        row, col = {layer: i for i, layer in enumerate(self.layers)}, {k: j for j, k in enumerate(self.kinds)}
        for (layer, k), value in table[column].items():
            z[row[int(layer)], col[k]] = float(value)
        return z

    def _draw(self) -> None:
        kind = self.kind.value
        spread = (SPREAD if isinstance(self.importance, Importance) else _WEIGHT_SPREAD).get(kind)
        z, s = self.values(kind), self._grid(self.importance.table, spread)
        custom = [[[k, "" if math.isnan(s[i, j]) else f" ± {s[i, j]:.2g}"] for j, k in enumerate(self.kinds)]
                  for i in range(len(self.layers))]
        with self.figure.batch_update():
            trace = self.figure.data[0]
            trace.z, trace.customdata = z, custom
            trace.hovertemplate = f"layer %{{y}} · %{{customdata[0]}}<br>{kind} = %{{z:.3g}}%{{customdata[1]}}<extra></extra>"
            trace.colorbar.title = kind

    def outline(self, cells: Iterable[tuple[int, str]], color: str = "crimson") -> None:
        """Draw a box around each (layer, module type) cell; replaces the previous outlines."""
        self.outlined = [(int(layer), str(k)) for layer, k in cells]
        self.figure.layout.shapes = outline_shapes(self.outlined, self.kinds, color)

    def _clicked(self, trace, points, selector) -> None:
        if points.point_inds:
            i, j = points.point_inds[0]
            self.select(self.layers[i], self.kinds[j])

    def select(self, layer: int, module: str) -> None:
        """Show the per-head Taylor scores of one module (needs a WeightImportance)."""
        if (layer, module) not in set(self.importance.table.index):
            raise ValueError(f"(layer, module)=({layer}, {module!r}) is not in the map: layers {self.layers}, "
                             f"modules {self.kinds}")
        self.selected = (layer, module)
        if self.weights is None:
            return
        heads = self.weights.heads.taylor
        rows = ((heads.index.get_level_values("layer") == layer)
                & (heads.index.get_level_values("module") == module))  # masks: no lexsort warning
        values = heads[rows].droplevel(["layer", "module"])
        has_heads = len(values) > 0
        with self.heads_figure.batch_update():
            bar = self.heads_figure.data[0]
            bar.x = list(values.index) if has_heads else []
            bar.y = list(values.to_numpy()) if has_heads else []
            title = f"layer {layer} {module}: Taylor per head" if has_heads else f"layer {layer} {module}: no heads"
            self.heads_figure.layout.title = title
