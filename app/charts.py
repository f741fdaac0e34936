"""Pure figure builders: core results in, plotly figures out (testable without Streamlit)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.recommend import Recommendation
from analysis.run import Run
from analysis.signals import RunSignals, debiased_ema

COLORS = {
    "train": "#1f77b4", "val": "#ff7f0e", "selected": "#2ca02c", "spike": "#d62728",
    "nonfinite": "#111111", "other": "#9e9e9e",
}


def checkpoint_status(signals: RunSignals, selected: set[int]) -> dict[int, str]:
    """Step -> one of selected / spike / nonfinite / mismatch / other, for colouring."""
    status = {}
    for item in signals.checkpoints:
        step = item.ref.step
        if not item.health.finite:
            status[step] = "nonfinite"
        elif item.spike is not None:
            status[step] = "spike"
        elif item.mismatch is not None:
            status[step] = "mismatch"
        else:
            status[step] = "selected" if step in selected else "other"
    return status


def loss_figure(run: Run, signals: RunSignals, selected: set[int], smoothing: float = 0.6,
                log_y: bool = False) -> go.Figure:
    """Train loss (raw faint, smoothed), val loss, spikes shaded, checkpoints marked by status."""
    fig = go.Figure()
    train = run.metric("train_loss")
    if len(train):
        fig.add_trace(go.Scatter(x=train["step"], y=train["value"], mode="lines", name="train loss (raw)",
                                 line={"color": COLORS["train"], "width": 1}, opacity=0.25, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=train["step"], y=debiased_ema(train["value"].to_numpy(), smoothing),
                                 mode="lines", name=f"train loss (EMA {smoothing:g})",
                                 line={"color": COLORS["train"], "width": 2}))
    val = run.metric("val_loss")
    if len(val):
        fig.add_trace(go.Scatter(x=val["step"], y=val["value"], mode="lines+markers", name="val loss",
                                 line={"color": COLORS["val"]}, marker={"size": 5}))
    for spike in signals.spikes:
        fig.add_vrect(x0=spike.onset_after_step, x1=spike.end_step, fillcolor=COLORS["spike"], opacity=0.15,
                      line_width=0, annotation_text=f"{spike.metric} spike", annotation_position="top left")
    _add_checkpoint_markers(fig, signals, selected)
    fig.update_layout(xaxis_title="step", yaxis_title="loss (nats)", hovermode="x unified",
                      legend={"orientation": "h", "y": -0.2}, margin={"t": 30, "b": 10},
                      yaxis_type="log" if log_y else "linear")
    return fig


def _add_checkpoint_markers(fig: go.Figure, signals: RunSignals, selected: set[int]) -> None:
    """One marker trace per status, placed at the checkpoint's val loss (or at the bottom)."""
    status = checkpoint_status(signals, selected)
    labels = {"selected": "checkpoint: selected", "other": "checkpoint", "spike": "checkpoint: in a spike",
              "nonfinite": "checkpoint: NaN/Inf", "mismatch": "checkpoint: mismatched tensors"}
    for kind, label in labels.items():
        items = [s for s in signals.checkpoints if status[s.ref.step] == kind]
        if not items:
            continue
        fig.add_trace(go.Scatter(
            x=[s.ref.step for s in items], y=[s.val.value if s.val else None for s in items],
            mode="markers", name=label,
            marker={"symbol": "diamond" if kind != "nonfinite" else "x", "size": 11,
                    "color": COLORS.get(kind, COLORS["other"]), "line": {"width": 1, "color": "white"}},
            text=[s.ref.name for s in items], hovertemplate="%{text}<br>step %{x}<br>val %{y:.4f}<extra></extra>",
        ))


def training_figure(run: Run) -> go.Figure | None:
    """Learning rate, grad norm and step time, one row each where the logs have them."""
    rows = [(m, t) for m, t in (("lr", "learning rate"), ("grad_norm", "grad norm"),
                                ("step_time_ms", "step time (ms)")) if len(run.metric(m))]
    if not rows:
        return None
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[t for _, t in rows])
    for index, (metric, title) in enumerate(rows, start=1):
        series = run.metric(metric)
        fig.add_trace(go.Scatter(x=series["step"], y=series["value"], mode="lines", name=title,
                                 line={"width": 1}), row=index, col=1)
    fig.update_layout(height=180 * len(rows) + 40, showlegend=False, margin={"t": 30, "b": 10})
    fig.update_xaxes(title_text="step", row=len(rows), col=1)
    return fig


def weights_figure(rec_steps: list[int], weights: list[float]) -> go.Figure:
    """Bar chart of merge weights per checkpoint step."""
    fig = go.Figure(go.Bar(x=[str(s) for s in rec_steps], y=weights, marker_color=COLORS["selected"],
                           hovertemplate="step %{x}<br>weight %{y:.3f}<extra></extra>"))
    fig.update_layout(xaxis_title="checkpoint step", yaxis_title="weight", height=260, margin={"t": 20, "b": 10})
    return fig


def recommendation_steps(rec: Recommendation) -> list[int]:
    return [r.step for r in rec.checkpoints]
