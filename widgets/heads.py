"""HeadInspector: a layer x head heatmap of one kind of evidence, and the attention of a chosen head.

Click a cell (or call `inspector.select(layer, head)`) to see that head's attention on a chosen
prompt, base and adapted side by side, and the head's row of the `HeadEffects` table.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tinylab.analysis.heads import EVIDENCE, HeadEffects
from tinylab.analysis.patterns import AttentionPatterns, attention_patterns
from tinylab.basics.checks import check_choice

__all__ = ["HeadInspector"]

_LABELS = {
    "weight": "weight: |update| / |weight| on the head's slices",
    "js": "attention shift: mean Jensen-Shannon (bits)",
    "output_change": "output change: |adapted - base| / |base|",
    "gate_grad": "causal estimate: gate gradient",
    "ablation": "causal: metric drop when the head's update is removed",
}
_SIGNED = ("gate_grad", "ablation")


def _prompt_label(i: int, prompt) -> str:
    prompt = getattr(prompt, "prompt", prompt)
    text = prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt)
    text = " ".join(text.split())
    return f"{i}: {text[:60]}{'...' if len(text) > 60 else ''}"


class HeadInspector(widgets.VBox):
    """Layer x head heatmap with an evidence dropdown; a selected head's base vs adapted attention."""

    def __init__(self, effects: HeadEffects, model, tokenizer, adapter, prompts: Sequence, *,
                 evidence: str = "weight"):
        if not isinstance(effects, HeadEffects):
            raise TypeError(f"effects must be a HeadEffects (from head_effects), got {type(effects).__name__}")
        check_choice("evidence", evidence, EVIDENCE)
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of prompts")
        self.effects, self.model, self.tokenizer, self.adapter = effects, model, tokenizer, adapter
        self.prompts = list(prompts)
        self.selected: tuple[int, int] | None = None
        self.patterns: AttentionPatterns | None = None
        self._cache: dict[tuple[int, int, int], AttentionPatterns] = {}
        table = effects.table
        self._layers = sorted({int(layer) for layer, _ in table.index})
        self._heads = sorted({int(head) for _, head in table.index})

        self.evidence = widgets.Dropdown(options=[(_LABELS[c], c) for c in EVIDENCE], value=evidence,
                                         description="evidence", layout=widgets.Layout(width="460px"))
        self.prompt = widgets.Dropdown(options=[(_prompt_label(i, p), i) for i, p in enumerate(self.prompts)],
                                       value=0, description="prompt", layout=widgets.Layout(width="460px"))
        self.heatmap = go.FigureWidget(go.Heatmap(x=self._heads, y=self._layers, hoverongaps=False))
        self.heatmap.update_layout(width=360, height=max(260, 18 * len(self._layers) + 120),
                                   margin=dict(l=50, r=10, t=40, b=40), xaxis_title="head", yaxis_title="layer")
        self.heatmap.update_xaxes(tickvals=self._heads)
        self.heatmap.data[0].on_click(self._clicked)
        figure = make_subplots(rows=1, cols=2, subplot_titles=("base", "adapted"), horizontal_spacing=0.12)
        for col in (1, 2):
            figure.add_trace(go.Heatmap(colorscale="Blues", zmin=0, zmax=1, showscale=col == 2), row=1, col=col)
        figure.update_layout(width=820, height=460, margin=dict(l=90, r=10, t=60, b=90))
        self.pattern_figure = go.FigureWidget(figure)
        self.numbers = widgets.HTML(value="<i>select a head (click a cell)</i>")

        self.evidence.observe(lambda _: self._draw_heatmap(), names="value")
        self.prompt.observe(lambda _: self._draw_patterns(), names="value")
        self._draw_heatmap()
        super().__init__([
            widgets.HBox([self.evidence, self.prompt]),
            widgets.HBox([self.heatmap, widgets.VBox([self.pattern_figure, self.numbers])]),
        ])

    # --- the heatmap
    def values(self, evidence: str | None = None) -> np.ndarray:
        """The [layers, heads] grid of one measure (NaN where not measured)."""
        column = self.effects.table[evidence or self.evidence.value]
        return column.unstack("head").reindex(index=self._layers, columns=self._heads).to_numpy(dtype=float)

    def _draw_heatmap(self) -> None:
        kind = self.evidence.value
        z = self.values(kind)
        signed = kind in _SIGNED
        bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        with self.heatmap.batch_update():
            trace = self.heatmap.data[0]
            trace.z = z
            trace.colorscale = "RdBu" if signed else "Viridis"
            trace.zmid = 0 if signed else None
            trace.zmin, trace.zmax = (-bound, bound) if signed else (0, bound or 1.0)
            trace.hovertemplate = "layer %{y} head %{x}<br>" + kind + " %{z:.4g}<extra></extra>"
            self.heatmap.layout.title = kind

    def _clicked(self, trace, points, selector) -> None:
        if points.xs and points.ys:
            self.select(int(points.ys[0]), int(points.xs[0]))

    # --- the selected head
    def select(self, layer: int, head: int, prompt: int | None = None) -> None:
        """Show (layer, head): its attention on the chosen prompt, base vs adapted, and its numbers."""
        if (layer, head) not in self.effects.table.index:
            raise ValueError(f"(layer, head)=({layer}, {head}) is not in the table: layers "
                             f"{self._layers[0]}..{self._layers[-1]}, heads {self._heads[0]}..{self._heads[-1]}")
        self.selected = (int(layer), int(head))
        if prompt is not None:
            self.prompt.value = prompt  # redraws through the observer
        else:
            self._draw_patterns()

    def _draw_patterns(self) -> None:
        if self.selected is None:
            return
        layer, head = self.selected
        key = (self.prompt.value, layer, head)
        if key not in self._cache:
            self._cache[key] = attention_patterns(self.model, self.tokenizer, self.prompts[key[0]], layer, head,
                                                  self.adapter)
        self.patterns = p = self._cache[key]
        ticks = list(range(len(p.tokens)))
        labels = [repr(t)[1:-1] for t in p.tokens]
        grids = (p.base, p.adapted if p.adapted is not None else p.base)
        with self.pattern_figure.batch_update():
            for trace, grid in zip(self.pattern_figure.data, grids):
                trace.z = grid.float().cpu().numpy()  # [T, T]
                trace.customdata = [[[labels[i], labels[j]] for j in ticks] for i in ticks]
                trace.hovertemplate = "%{customdata[0]} -> %{customdata[1]}: %{z:.3f}<extra></extra>"
            self.pattern_figure.update_xaxes(tickvals=ticks, ticktext=labels, tickangle=-60, tickfont_size=9)
            self.pattern_figure.update_yaxes(tickvals=ticks, ticktext=labels, autorange="reversed", tickfont_size=9)
            self.pattern_figure.layout.title = f"layer {layer}, head {head}: where each token (row) looks"
        self.numbers.value = self._numbers_html(layer, head)

    def _numbers_html(self, layer: int, head: int) -> str:
        row = self.effects.table.loc[(layer, head)]
        cells = "".join(
            f"<tr><td>{html.escape(name)}</td><td style='text-align:right'>"
            f"{'-' if isinstance(value, float) and math.isnan(value) else f'{value:.4g}'}</td></tr>"
            for name, value in row.items()
        )
        e = self.effects
        metric = "" if e.metric is None else f"<br>{e.metric}: adapted {e.adapted:.4g}, base {e.base:.4g}"
        return f"<b>layer {layer}, head {head}</b>{metric}<table>{cells}</table>"
