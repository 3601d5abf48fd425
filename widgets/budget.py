"""BudgetSlider: drag a parameter budget, see where it goes, attach it.

A log-scale slider from 1 number to the LoRA-XS size (one (r, r) matrix per module), a strategy
dropdown (`top` and `proportional` need an importance), a minimum u, a readout of the achieved
count and its size in bf16 and fp32, the planned modules outlined on a layers x module-types map
(the importance heatmap when there is one; otherwise the map shows which trained vector each
module uses), and an Apply button that attaches the plan (removing the adapter it attached
before; the SVD factors are cached by weight fingerprint, so re-attaching is fast).
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable

import ipywidgets as widgets
import numpy as np

from tinylab.adapter.attach import apply_tinylora, find_adapter
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.planner import STRATEGIES, BudgetPlan, lora_xs_size, plan_budget
from tinylab.adapter.targets import kind_order, plan_modules
from tinylab.analysis.importance import Importance, WeightImportance

from .heatmap import ImportanceHeatmap, module_grid, outline_shapes

__all__ = ["BudgetSlider"]


class BudgetSlider(widgets.VBox):
    """Plan a TinyLoRA budget with a slider and attach it with a button."""

    def __init__(self, model, importance: Importance | WeightImportance | None = None, *, n_params: int = 13,
                 strategy: str = "tiled", r: int = 2, on_apply: Callable | None = None):
        self.model, self.importance, self.r, self.on_apply = model, importance, r, on_apply
        self.maximum = lora_xs_size(model, r)
        if not 1 <= n_params <= self.maximum:
            raise ValueError(f"n_params={n_params!r} is out of range: allowed 1..{self.maximum} for this model")
        strategies = STRATEGIES if importance is not None else ("tiled",)
        if strategy not in strategies:
            raise ValueError(f"strategy={strategy!r} is not allowed here: choose one of {list(strategies)}"
                             + ("" if importance is not None else " (top and proportional need an importance)"))
        self.adapter = None  # the adapter this widget attached, if any
        self.plan: BudgetPlan | None = None
        self.apply_seconds: float | None = None
        self._modules = plan_modules(model, TinyLoRAConfig(r=r), warn=False)  # what apply_tinylora adapts
        self._cell = {m.name: (m.layer, m.kind) for m in self._modules}

        self.slider = widgets.FloatLogSlider(value=n_params, base=10, min=0, max=math.log10(self.maximum),
                                             step=0.001, description="params", readout_format=".0f",
                                             continuous_update=False, layout=widgets.Layout(width="460px"))
        self.strategy = widgets.Dropdown(options=list(strategies), value=strategy, description="strategy")
        self.u = widgets.BoundedIntText(value=1, min=1, max=self.maximum, description="min u",
                                        layout=widgets.Layout(width="160px"))
        self.readout = widgets.HTML()
        self.apply_button = widgets.Button(description="Apply", button_style="primary", icon="check")
        self.status = widgets.HTML()
        if importance is not None:
            self.heatmap = ImportanceHeatmap(importance)
            self.figure = self.heatmap.figure
            view = self.heatmap
        else:
            self.heatmap = None
            layers = sorted({m.layer for m in self._modules})
            self._kinds = kind_order(m.kind for m in self._modules)
            self.figure = module_grid(layers, self._kinds, title="trained vector of each module")
            self._layers = layers
            view = self.figure
        for control in (self.slider, self.strategy, self.u):
            control.observe(lambda _: self.replan(), names="value")
        self.apply_button.on_click(lambda _: self.apply())
        self.replan()
        super().__init__([widgets.HBox([self.slider, self.strategy, self.u]), self.readout,
                          widgets.HBox([self.apply_button, self.status]), view])

    @property
    def n_params(self) -> int:
        """The requested count: the slider's value rounded to an integer in 1..LoRA-XS size."""
        return int(min(max(round(self.slider.value), 1), self.maximum))

    def replan(self) -> BudgetPlan:
        """Plan for the current controls; update the readout and the outlines."""
        self.plan = plan_budget(self.model, self.n_params, importance=self.importance,
                                strategy=self.strategy.value, u=self.u.value, r=self.r)
        self._draw()
        return self.plan

    def _draw(self) -> None:
        plan = self.plan
        mark = "exact" if plan.exact else f"nearest to {plan.requested}"
        self.readout.value = (
            f"<b>{plan.achieved:,}</b> params ({mark}) &middot; {plan.nbytes('bf16'):,} B bf16 &middot; "
            f"{plan.nbytes('fp32'):,} B fp32 &middot; {len(plan.groups)} vectors x u={plan.u} over "
            f"{len(plan.modules)} of {len(self._modules)} modules<br><small>{html.escape(plan.reason)}</small>")
        cells = [self._cell[name] for name in plan.modules]
        if self.heatmap is not None:
            self.heatmap.outline(cells)
            return
        z = np.full((len(self._layers), len(self._kinds)), np.nan)
        row, col = {layer: i for i, layer in enumerate(self._layers)}, {k: j for j, k in enumerate(self._kinds)}
        for g, names in enumerate(plan.groups):
            for name in names:
                layer, kind = self._cell[name]
                z[row[layer], col[kind]] = g
        with self.figure.batch_update():
            self.figure.data[0].z = z
            self.figure.data[0].hovertemplate = "layer %{y}<br>vector %{z}<extra></extra>"
            self.figure.layout.shapes = outline_shapes(cells, self._kinds)

    @property
    def outlined(self) -> list[tuple[int, str]]:
        """The (layer, module type) cells outlined on the map."""
        if self.heatmap is not None:
            return list(self.heatmap.outlined)
        kinds = self._kinds
        return [(int(round((s["y0"] + s["y1"]) / 2)), kinds[int(round((s["x0"] + s["x1"]) / 2))])
                for s in self.figure.layout.shapes]

    def apply(self):
        """Attach the current plan (removing the adapter this widget attached before); returns it."""
        if self.adapter is not None and self.adapter.attached:
            self.adapter.remove()
        self.adapter = None
        if find_adapter(self.model):
            self.status.value = ("<span style='color:crimson'>the model has an adapter this slider did not attach: "
                                 "remove it first (adapter.remove())</span>")
            return None
        start = time.perf_counter()
        self.adapter = apply_tinylora(self.model, self.plan.config)
        self.apply_seconds = time.perf_counter() - start
        self.status.value = f"attached {self.adapter.num_params:,} params in {self.apply_seconds:.2f} s"
        if self.on_apply is not None:
            self.on_apply(self.adapter)
        return self.adapter
