"""Notebook components for tinylab (ipywidgets + plotly)."""

from .budget import BudgetSlider
from .budget_sweep_plot import budget_sweep_figure
from .heads import HeadInspector
from .heatmap import ImportanceHeatmap
from .knobs import KnobPanel, landscape_figure, sweep_figure
from .static import show_png, static_figures
from .training import TrainingPanel

__all__ = ["BudgetSlider", "HeadInspector", "ImportanceHeatmap", "KnobPanel", "TrainingPanel", "budget_sweep_figure",
           "landscape_figure", "show_png", "static_figures", "sweep_figure"]

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
