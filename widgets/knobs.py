"""KnobPanel: one slider per trained number, and what the model does as they move.

Beside the sliders, recomputed after every move (v changes only: no SVD, no re-attach):
- the greedy replies to a few prompts: base | trained | now;
- the teacher-forced gold log-probability of each held-out example as a bar (base, trained, now);
- the layer x head map of the attention shift of "now" against the base (`tinylab.analysis.heads`).
The base and trained sides are read once when the panel is built. A move reads "now" with
`tinylab.analysis.readout.Reader`: when the held-out examples have the reply prompts, one forward per
batch gives the gold log-probs, the heads' activity, the replies' first tokens as long as they agree
with the gold, and the prefill the greedy replies continue from; the head map compares that activity
with the base's (`tinylab.analysis.heads.attention_shift`).

Below: a 1-D sweep of a chosen number and the 2-D landscape of a chosen pair around the trained
point (`sweep_figure`, `landscape_figure`, also usable on their own). The panel drives the adapter it was given: v is
whatever the sliders say until "all trained" (or `panel.reset()`) puts the trained values back.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence

import ipywidgets as widgets
import plotly.graph_objects as go
import torch

from tinylab import tasks
from tinylab.adapter.attach import check_adapter
from tinylab.analysis.heads import attention_shift
from tinylab.analysis.knobs import REPLY_SCORES, number_label
from tinylab.analysis.landscapes import Landscape, Sweep, landscape, sweep_number
from tinylab.analysis.readout import Reader, Readout
from tinylab.basics.checks import check_int, check_number
from tinylab.measures.gold import GoldSet

__all__ = ["KnobPanel", "landscape_figure", "sweep_figure"]



def sweep_figure(result: Sweep) -> go.Figure:
    """The mean gold log-prob along the swept coordinate (reply scores on a second axis when
    measured), with the trained value and 0 marked."""
    if not isinstance(result, Sweep):
        raise TypeError(f"result must be a Sweep (from tinylab.analysis.landscapes.sweep_number), got {type(result).__name__}")
    t = result.table
    figure = go.Figure(go.Scatter(x=t["value"], y=t["logprob"], mode="lines+markers", name="gold log-prob"))
    for column in REPLY_SCORES:
        if column in t.columns:
            figure.add_trace(go.Scatter(x=t["value"], y=t[column], mode="lines+markers", name=column,
                                        yaxis="y2", line_dash="dot"))
    figure.add_vline(x=result.trained, line_color="green", annotation_text="trained")
    if result.zero is not None:
        figure.add_vline(x=result.zero, line_color="gray", line_dash="dash", annotation_text="0")
    axis = "t (v = trained + t d)" if result.number is None else result.label
    figure.update_layout(title=f"sweep of {result.label}", xaxis_title=axis, yaxis_title="mean gold log-prob",
                         width=560, height=360, margin=dict(l=60, r=60, t=50, b=50),
                         yaxis2=dict(title="share of replies", overlaying="y", side="right", range=[0, 1]))
    return figure


def landscape_figure(result: Landscape, metric: str = "logprob") -> go.Figure:
    """A heatmap of `metric` over the grid of two numbers, the trained point (star) and the origin
    (cross) marked."""
    if not isinstance(result, Landscape):
        raise TypeError(f"result must be a Landscape (from tinylab.analysis.landscapes.landscape), got {type(result).__name__}")
    grid = result.logprob if metric == "logprob" else result.scores.get(metric)
    if grid is None:
        raise ValueError(f"metric={metric!r} was not measured; allowed: {['logprob', *result.scores]}")
    (lx, ly), (tx, ty) = result.labels, result.trained
    figure = go.Figure(go.Heatmap(x=result.x, y=result.y, z=grid, colorscale="Viridis", colorbar_title=metric))
    figure.add_trace(go.Scatter(x=[tx], y=[ty], mode="markers", name="trained",
                                marker=dict(symbol="star", size=14, color="red")))
    figure.add_trace(go.Scatter(x=[result.origin[0]], y=[result.origin[1]], mode="markers", name="origin",
                                marker=dict(symbol="x", size=12, color="white")))
    figure.update_layout(title=f"{metric} over {lx} x {ly}", xaxis_title=lx, yaxis_title=ly, width=560,
                         height=460, margin=dict(l=60, r=10, t=50, b=50))
    return figure


def _short(prompt, width: int = 60) -> str:
    prompt = getattr(prompt, "prompt", prompt)
    text = prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt)
    text = " ".join(text.split())
    return text[:width] + ("..." if len(text) > width else "")


class KnobPanel(widgets.VBox):
    """Sliders over the adapter's numbers with the replies, gold log-probs and head map they produce.

    `prompts`: a few prompts for greedy replies (strings, chat messages or Examples). `held_out`:
    Examples whose gold continuations (`target`: "answer" or "solution") are scored per example.
    `task`: marks the replies strict-correct / formatted (needs Examples as prompts).
    `max_new_tokens`: the length of the greedy replies; each token after those the gold forward gives
    is one more decoding step of the update (benchmarks/knobs.py times it). The task's marks need replies long enough to carry its
    answer format (e.g. `max_new_tokens=task.max_new_tokens`). Give the same examples as `prompts`
    and `held_out` for the fastest update (one shared forward per batch).
    `limit`: the sliders run over -limit..limit (default: twice the largest |v|, at least 1).
    """

    def __init__(self, model, tokenizer, adapter, prompts: Sequence, held_out: Sequence, *, task=None,
                 target: str = "answer", max_new_tokens: int = 6, limit: float | None = None,
                 batch_size: int = 8):
        check_adapter(adapter, model)
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of prompts (strings, chat messages or Examples)")
        if adapter.merged:
            adapter.unmerge()  # the sliders set v, which a merged adapter would not see
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.task = None if task is None else tasks.resolve(task)
        self.prompts = [getattr(p, "prompt", p) for p in prompts]
        self.answers = [getattr(p, "answer", None) for p in prompts]
        if task is not None and None in self.answers:
            raise ValueError("a task scores replies against answers: give the prompts as Examples")
        self.held_out = list(held_out)
        self.gold = GoldSet(model, tokenizer, self.held_out, target=target, batch_size=batch_size)
        self.target = target
        self.batch_size = batch_size
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        self.reader = Reader(model, tokenizer, self.prompts, self.gold, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
        self.trained = adapter.vector()  # (num_params,) fp32, cpu
        if limit is None:
            bound = max(2 * float(self.trained.abs().max()), 1.0)
        else:
            bound = check_number("limit", limit, low=float(self.trained.abs().max()), low_open=True)
        self._hold = False
        self.last_update_seconds = float("nan")

        self.sliders = [widgets.FloatSlider(value=float(x), min=-bound, max=bound, step=bound / 200,
                                            description=number_label(adapter, i), continuous_update=False,
                                            readout_format=".4f", layout=widgets.Layout(width="330px"))
                        for i, x in enumerate(self.trained.tolist())]
        rows = []
        for i, slider in enumerate(self.sliders):
            reset = widgets.Button(description="trained", tooltip="back to the trained value",
                                   layout=widgets.Layout(width="70px"))
            zero = widgets.Button(description="0", tooltip="set to zero", layout=widgets.Layout(width="36px"))
            reset.on_click(lambda _, i=i: self.set(i, float(self.trained[i])))
            zero.on_click(lambda _, i=i: self.set(i, 0.0))
            slider.observe(lambda _: self._moved(), names="value")
            rows.append(widgets.HBox([slider, reset, zero]))
        self.all_trained = widgets.Button(description="all trained", button_style="info")
        self.all_zero = widgets.Button(description="all zero (base)")
        self.all_trained.on_click(lambda _: self.reset())
        self.all_zero.on_click(lambda _: self.set_all([0.0] * len(self.sliders)))
        u = adapter.config.u
        groups = adapter.groups()
        boxes = [widgets.VBox([widgets.HTML(f"<b>group {g}</b>: {len(groups[g])} modules"), *rows[g * u:(g + 1) * u]])
                 for g in range(adapter.num_groups)] if adapter.num_groups > 1 else rows
        knobs = widgets.VBox([widgets.HBox([self.all_trained, self.all_zero]), *boxes],
                             layout=widgets.Layout(max_height="640px", overflow_y="auto"))

        self.summary = widgets.HTML()
        self.replies = widgets.HTML()
        with adapter.disabled():
            self.base = self.reader()  # read once: v does not move the base
        trained = self.reader()
        self.base_replies, self.base_logprobs = self.base.replies, self.base.logprobs  # [N]
        self.trained_replies, self.trained_logprobs = trained.replies, trained.logprobs  # [N]
        labels = [f"{k}: {_short(ex, 24)}" for k, ex in enumerate(self.held_out)]
        self.bars = go.FigureWidget([go.Bar(x=labels, y=self.base_logprobs, name="base", marker_color="lightgray"),
                                     go.Bar(x=labels, y=self.trained_logprobs, name="trained",
                                            marker_color="steelblue"),
                                     go.Bar(x=labels, name="now", marker_color="darkorange")])
        self.bars.update_layout(title="gold log-prob per held-out example (mean per token)", barmode="group",
                                width=560, height=320, margin=dict(l=50, r=10, t=40, b=90))
        self.heads = go.FigureWidget(go.Heatmap(colorscale="Viridis", zmin=0,
                                                hovertemplate="layer %{y} head %{x}<br>js %{z:.3g}<extra></extra>"))
        title = ("attention shift now vs base (JS, bits)" if self.reader.blocks
                 else "no head map: this model's attention layout is not split into heads")
        self.heads.update_layout(title=title, width=380, height=420,
                                 margin=dict(l=50, r=10, t=40, b=40), xaxis_title="head", yaxis_title="layer")

        options = [(number_label(adapter, i), i) for i in range(len(self.sliders))]
        self.sweep_number = widgets.Dropdown(options=options, value=0, description="sweep",
                                             layout=widgets.Layout(width="180px"))
        self.pair_x = widgets.Dropdown(options=options, value=0, description="x", layout=widgets.Layout(width="150px"))
        self.pair_y = widgets.Dropdown(options=options, value=min(1, len(options) - 1), description="y",
                                       layout=widgets.Layout(width="150px"))
        sweep_button, pair_button = widgets.Button(description="draw sweep"), widgets.Button(description="draw landscape")
        sweep_button.on_click(lambda _: self.show_sweep(self.sweep_number.value))
        pair_button.on_click(lambda _: self.show_landscape(self.pair_x.value, self.pair_y.value))
        self.sweep_plot = go.FigureWidget(layout=dict(width=560, height=360))
        self.landscape_plot = go.FigureWidget(layout=dict(width=560, height=460))
        self.explore_status = widgets.HTML()

        self._show(trained, float("nan"))  # the sliders start at the trained point: nothing to read again
        super().__init__([
            widgets.HBox([knobs, widgets.VBox([self.summary, self.replies])]),
            widgets.HBox([self.bars, self.heads]),
            widgets.HBox([self.sweep_number, sweep_button, self.pair_x, self.pair_y, pair_button]),
            self.explore_status,
            widgets.HBox([self.sweep_plot, self.landscape_plot]),
        ])

    # --- setting values
    def values(self) -> torch.Tensor:
        """The sliders' values as a (num_params,) fp32 vector."""
        return torch.tensor([s.value for s in self.sliders], dtype=torch.float32, device="cpu")  # (num_params,)

    def set(self, i: int, value: float) -> None:
        """Move slider i (a flat position) to `value`; everything redraws once."""
        self.sliders[i].value = value

    def set_all(self, values: Sequence[float]) -> None:
        """Move every slider at once; everything redraws once."""
        if len(values) != len(self.sliders):
            raise ValueError(f"got {len(values)} values for {len(self.sliders)} sliders")
        self._hold = True
        try:
            for slider, x in zip(self.sliders, values):
                slider.value = float(x)
        finally:
            self._hold = False
        self._update()

    def reset(self) -> None:
        """Every slider back to its trained value: the adapter is the trained one again."""
        self.set_all(self.trained.tolist())

    def _moved(self) -> None:
        if not self._hold:
            self._update()

    # --- what the panel recomputes after a move
    def _mark(self, reply: str, k: int) -> str:
        text = html.escape(reply)
        if self.task is None:
            return text
        score = self.task.score(reply, str(self.answers[k]))
        flag = "&#10003;" if score.correct_strict else ("format" if score.formatted else "&#10007;")
        return f"{text} <small>[{flag}]</small>"

    def _update(self) -> None:
        """Set v from the sliders, then read "now" (replies, gold log-probs, head map) and redraw."""
        began = time.perf_counter()
        self.adapter.set_vector(self.values())
        self._show(self.reader(), began)

    def _show(self, now: Readout, began: float) -> None:
        """Keep `now`, its head map against the base (layers x heads), and redraw; `began`: when the
        update started (perf_counter), NaN when nothing was timed."""
        self.now_replies, self.now_logprobs = now.replies, now.logprobs  # [N]
        self.shift = attention_shift(self.base.activity, now.activity)["js"].unstack("head")  # layers x heads
        self.last_update_seconds = time.perf_counter() - began
        self.draw()

    def draw(self) -> None:
        """Redraw the replies table, the summary, the bars and the head map from what the panel holds."""
        rows = "".join(
            f"<tr><td>{html.escape(_short(p, 40))}</td><td>{self._mark(b, k)}</td><td>{self._mark(t, k)}</td>"
            f"<td><b>{self._mark(n, k)}</b></td></tr>"
            for k, (p, b, t, n) in enumerate(zip(self.prompts, self.base_replies, self.trained_replies,
                                                 self.now_replies)))
        self.replies.value = ("<table><tr><th>prompt</th><th>base</th><th>trained</th><th>now</th></tr>"
                              f"{rows}</table>")
        self.summary.value = (f"mean gold log-prob: base {self.base_logprobs.mean():.4f} | trained "
                              f"{self.trained_logprobs.mean():.4f} | <b>now {self.now_logprobs.mean():.4f}</b>"
                              + ("" if math.isnan(self.last_update_seconds) else
                                 f" &nbsp; ({self.last_update_seconds:.2f} s)"))
        with self.bars.batch_update():
            self.bars.data[2].y = self.now_logprobs
        with self.heads.batch_update():
            trace = self.heads.data[0]
            trace.z = self.shift.to_numpy(dtype=float)
            trace.x, trace.y = list(self.shift.columns), list(self.shift.index)

    # --- exploring around the trained point
    def show_sweep(self, number: int, values=None) -> Sweep:
        """Sweep one number (flat position) around the trained point on the held-out examples; draw it.
        The sliders' point is kept."""
        self.explore_status.value = f"<i>sweeping {number_label(self.adapter, number)} ...</i>"
        with self.adapter.kept_vector():
            self.adapter.set_vector(self.trained)
            result = sweep_number(self.model, self.tokenizer, self.adapter, self.held_out, number=number, values=values,
                           target=self.target, batch_size=self.batch_size)
        self._replace(self.sweep_plot, sweep_figure(result))
        self.explore_status.value = ""
        return result

    def show_landscape(self, x: int, y: int, xs=None, ys=None) -> Landscape:
        """The landscape of numbers x and y (flat positions) around the trained point; draw it. The
        sliders' point is kept."""
        self.explore_status.value = "<i>measuring the landscape ...</i>"
        with self.adapter.kept_vector():
            self.adapter.set_vector(self.trained)
            result = landscape(self.model, self.tokenizer, self.adapter, self.held_out, (x, y), xs, ys,
                               target=self.target, batch_size=self.batch_size)
        self._replace(self.landscape_plot, landscape_figure(result))
        self.explore_status.value = ""
        return result

    @staticmethod
    def _replace(widget: go.FigureWidget, figure: go.Figure) -> None:
        with widget.batch_update():
            widget.data = []
            widget.layout = {}
            widget.add_traces(list(figure.data))
            widget.update_layout(figure.layout)
