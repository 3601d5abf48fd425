"""PNG copies of figures for saved notebooks: plotly's image export through kaleido and a Chromium."""

import plotly.graph_objects as go
import plotly.io as pio
from tinylab.widgets import show_png, static_figures


def test_static_figures_adds_png_to_the_renderer_and_restores_it():
    before = pio.renderers.default
    static_figures()
    try:
        assert pio.renderers.default == "plotly_mimetype+png"
        figure = go.Figure(go.Bar(y=[1, 3])).to_dict()
        bundle = {}
        for name in pio.renderers.default.split("+"):
            bundle.update(pio.renderers[name].to_mimebundle(figure))
        assert bundle["image/png"] and "application/vnd.plotly.v1+json" in bundle
    finally:
        static_figures(False)
    assert pio.renderers.default == before


def test_show_png_displays_the_figure_as_a_png(monkeypatch):
    shown = []
    monkeypatch.setattr("tinylab.widgets.static.display", shown.append)
    figure = go.FigureWidget(go.Scatter(x=[1, 2, 3], y=[3, 1, 2]))
    show_png(figure)
    (image,) = shown
    assert image.format == "png" and image.data[:8] == b"\x89PNG\r\n\x1a\n"
