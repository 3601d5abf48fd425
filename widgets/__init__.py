"""Notebook components for tinylab (ipywidgets + plotly)."""

from .budget import BudgetSlider
from .heads import HeadInspector
from .heatmap import ImportanceHeatmap
from .training import TrainingPanel

__all__ = ["BudgetSlider", "HeadInspector", "ImportanceHeatmap", "TrainingPanel"]
