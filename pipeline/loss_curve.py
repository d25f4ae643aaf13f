"""A training asset's loss curve as an SVG picture, drawn by matplotlib, for its Dagster metadata.

Why matplotlib rather than a tracker (TensorBoard event files, MLflow's local store): the
Dagster UI shows a materialization's markdown, and an image embedded in it is visible at a
glance beside the rest of the report card, with no second server to start, keep running and
link to (the demo has a ten-minute budget and two cores). The numbers stay in the run's
metrics.jsonl, which any tracker can import. matplotlib draws offline, headless (its Agg/SVG
backends need no display), and its output is made byte-stable here (no date, a fixed id salt),
so an identical run draws an identical file.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

SIZE_INCHES = (6.0, 3.2)
TRAIN_COLOUR, VAL_COLOUR = "#1f77b4", "#d62728"


def read_metrics(metrics_path: Path) -> list[dict]:
    if not metrics_path.exists():
        return []
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def loss_curve_svg(metrics: list[dict], title: str) -> str:
    """Train loss per step (line) and validation loss (dots) against the step, as SVG text."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    # The object-oriented API, not pyplot: no global figure state shared between runs in one process.
    figure = Figure(figsize=SIZE_INCHES, layout="constrained")
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), color=TRAIN_COLOUR, linewidth=1.2, label="train loss")
    if val:
        axes.plot(*zip(*val), "o", color=VAL_COLOUR, markersize=4, label="val loss")
    if not (train or val):
        axes.text(0.5, 0.5, "no steps recorded", ha="center", va="center", transform=axes.transAxes)
    axes.set_title(f"{title}: loss")
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("cross-entropy (nats)")
    axes.grid(True, alpha=0.3)
    if train or val:
        axes.legend(loc="upper right")
    out = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "nanogpt-pipeline", "svg.fonttype": "none"}):
        figure.savefig(out, format="svg", metadata={"Date": None})
    return out.getvalue().decode()


def loss_curve_markdown(svg: str) -> str:
    encoded = base64.b64encode(svg.encode()).decode()
    return f"![loss curve](data:image/svg+xml;base64,{encoded})"
