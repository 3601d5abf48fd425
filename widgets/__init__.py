"""Notebook components for tinylab (ipywidgets + plotly)."""

from .budget import BudgetSlider
from .heatmap import ImportanceHeatmap

__all__ = ["BudgetSlider", "ImportanceHeatmap"]
