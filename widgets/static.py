"""Plots that stay visible in a saved notebook where plotly's JavaScript does not run (GitHub, nbviewer).

`static_figures()` makes every `figure.show()` also embed a PNG beside the interactive figure;
`show_png(figure)` embeds one figure (e.g. a live panel's `FigureWidget`) as a PNG. Both use
plotly's image export (kaleido, which drives a Chromium: Debian's `chromium` package works).
"""

from __future__ import annotations

import plotly.io as pio
from IPython.display import Image, display

__all__ = ["show_png", "static_figures"]

INTERACTIVE = "plotly_mimetype"  # what JupyterLab draws
_default = pio.renderers.default


def static_figures(on: bool = True) -> None:
    """`on`: every `figure.show()` renders as the interactive figure and a PNG; off: as before
    (`plotly.io.renderers.default` says which is in effect)."""
    pio.renderers.default = f"{INTERACTIVE}+png" if on else _default


def show_png(figure, *, scale: float = 1.0) -> None:
    """Display `figure` (a Figure or FigureWidget) as a PNG image in the notebook's output."""
    display(Image(figure.to_image(format="png", scale=scale)))
