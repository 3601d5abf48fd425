"""Notebook components for tinylab (ipywidgets + plotly)."""
