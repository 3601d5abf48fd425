"""TrainingPanel: watch a run live and stop it from the notebook.

The panel is a callback: `train_grpo(..., callbacks=[panel])` (or `train_sft`, `resume`). Every
`StepLog` updates four plots and a table:

- reward: mean over the step's completions with its spread (std) as error bars, and the shares
  of completions the task scores as strictly correct and as well formatted (SFT: the loss);
- zero spread: the share of groups whose rewards were all equal (those teach nothing);
- completion length in tokens (mean and longest);
- |v|, the norm of the trained vector;
- the table: a few sampled completions of the last step with their rewards.

Stop asks the run to end after the current step (`run.stop()`; the run checkpoints, and
`tinylab.resume` continues it). A cell that blocks in training handles the click only on
JupyterLab >= 4.4 with ipykernel >= 7 (comms over subshells); elsewhere train with
`background=True` (the cell returns at once) or interrupt the kernel, which also stops cleanly.
"""

from __future__ import annotations

import html
import math

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["TrainingPanel"]

_TITLES = ("reward (mean ± std) and rates", "groups with zero reward spread", "completion length (tokens)", "|v|")
# trace index -> (subplot row, col, name, StepLog field or None for the SFT loss)
_TRACES = (
    (1, 1, "reward", "reward_mean"),
    (1, 1, "strict-correct", "correct_rate"),
    (1, 1, "formatted", "format_rate"),
    (1, 2, "zero spread", "zero_spread"),
    (2, 1, "length (mean)", "completion_len"),
    (2, 1, "length (longest)", "completion_len_max"),
    (2, 2, "|v|", "v_norm"),
)


def _finite(x) -> float | None:
    """Plotly gets None (a gap) for NaN: fields a loop did not measure."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


class TrainingPanel(widgets.VBox):
    """Live plots of a run's StepLogs, a table of sample completions, and a Stop button."""

    def __init__(self, title: str = "", *, max_samples: int = 4, width: int = 900, height: int = 520):
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 0:
            raise ValueError(f"max_samples={max_samples!r} is not allowed: an integer >= 0")
        self.title = title
        self.max_samples = max_samples
        self.run = None  # the run being watched (set by on_start)
        self.logs: list = []  # every StepLog shown, in step order
        base = make_subplots(rows=2, cols=2, subplot_titles=_TITLES, horizontal_spacing=0.1, vertical_spacing=0.16)
        styles = {"strict-correct": dict(dash="dash"), "formatted": dict(dash="dot"),
                  "length (longest)": dict(dash="dot")}
        for row, col, name, _ in _TRACES:
            base.add_trace(go.Scatter(x=[], y=[], name=name, mode="lines+markers", line=styles.get(name, {}),
                                      showlegend=col == 1), row=row, col=col)
        base.update_layout(width=width, height=height, margin=dict(l=50, r=20, t=60, b=40),
                           legend=dict(orientation="h", y=1.1, x=0))
        base.update_xaxes(title_text="step", row=2)
        base.update_xaxes(tick0=1, dtick=1)
        base.update_yaxes(rangemode="tozero")
        self.figure = go.FigureWidget(base)
        self.heading = f"<b>{html.escape(title)}</b> &middot; " if title else ""
        self.status = widgets.HTML(self.heading + "waiting for a run")
        self.samples = widgets.HTML()
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger", disabled=True,
                                          tooltip="end the run after the current step (it checkpoints)")
        self.stop_button.on_click(lambda _: self.stop())
        super().__init__([widgets.HBox([self.stop_button, self.status]), self.figure, self.samples])

    # --- the callback protocol of tinylab.train.run.Run
    def on_start(self, run) -> None:
        """A run starts (or resumes): show the steps it already has, enable Stop."""
        self.run = run
        done = self.logs[-1].step if self.logs else 0
        for entry in getattr(run, "logs", []):
            if entry.step > done:
                self.logs.append(entry)
        self._redraw()
        self.stop_button.disabled = False
        self.stop_button.description = "Stop"
        self._set_status()

    def __call__(self, entry) -> None:
        """One finished step."""
        if self.logs and entry.step <= self.logs[-1].step:  # a new run in the same panel: start over
            self.logs = [e for e in self.logs if e.step < entry.step]
        self.logs.append(entry)
        self._redraw()
        self._set_status()

    def on_end(self, run) -> None:
        self.stop_button.disabled = True
        self._set_status(ended=True)

    # --- user actions
    def stop(self) -> None:
        """Ask the watched run to stop after its current step."""
        if self.run is not None:
            self.run.stop()
            self.stop_button.disabled = True
            self.stop_button.description = "Stopping"

    # --- drawing
    def _redraw(self) -> None:
        logs = self.logs
        steps = [e.step for e in logs]
        sft = bool(logs) and logs[-1].kind == "sft"
        with self.figure.batch_update():
            for trace, (_, _, name, field) in zip(self.figure.data, _TRACES):
                if sft and field == "reward_mean":  # SFT has no reward: plot its loss in that slot
                    trace.name, ys = "loss", [_finite(e.loss) for e in logs]
                    trace.error_y = None
                else:
                    trace.name, ys = name, [_finite(getattr(e, field)) for e in logs]
                if field == "reward_mean" and not sft:
                    trace.error_y = dict(type="data", array=[_finite(e.reward_std) or 0.0 for e in logs],
                                         visible=True, thickness=1)
                trace.x, trace.y = steps, ys
            self.figure.layout.annotations[0].text = "loss (SFT)" if sft else _TITLES[0]
            self.figure.update_xaxes(dtick=max(1, -(-len(steps) // 10)))  # whole steps, at most ~10 ticks
        self.samples.value = self._samples_table(logs[-1]) if logs else ""

    def _samples_table(self, entry) -> str:
        rows = "".join(
            f"<tr><td style='text-align:right;padding:0 8px'>{_format_reward(reward)}</td>"
            f"<td style='text-align:left;white-space:pre-wrap'>{html.escape(str(text))}</td></tr>"
            for text, reward in list(entry.samples)[: self.max_samples])
        if not rows:
            return ""
        return (f"<b>step {entry.step}: sample completions</b><table><tr><th>reward</th>"
                f"<th style='text-align:left'>completion</th></tr>{rows}</table>")

    def _set_status(self, ended: bool = False) -> None:
        run = self.run
        parts = []
        if run is not None:
            total = getattr(run.config, "steps", "?")
            parts.append(f"{run.kind} on {html.escape(str(run.task_name))}: step {run.step}/{total}")
            if ended or run.status != "running":
                parts.append(f"<b>{html.escape(run.status)}</b> ({html.escape(run.reason)})")
        if self.logs:
            last = self.logs[-1]
            if last.kind == "sft":
                parts.append(f"loss {last.loss:.3f}")
            else:
                parts.append(f"reward {last.reward_mean:.3f} ± {last.reward_std:.3f}")
            parts.append(f"|v| {last.v_norm:.3g}")
            if math.isfinite(last.entropy):
                parts.append(f"entropy {last.entropy:.2f} nats/token")
            if math.isfinite(last.step_time):
                parts.append(f"{last.step_time:.1f} s/step (generation {last.gen_time:.1f} s)"
                             if math.isfinite(last.gen_time) and last.gen_time > 0 else f"{last.step_time:.1f} s/step")
        self.status.value = self.heading + (" &middot; ".join(parts) or "waiting for a run")


def _format_reward(reward) -> str:
    try:
        return f"{float(reward):.2f}"
    except (TypeError, ValueError):
        return html.escape(str(reward))
