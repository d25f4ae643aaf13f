"""A loss-curve picture for a training asset's metadata, drawn as SVG (no plotting library)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 480, 240, 36


def read_metrics(metrics_path: Path) -> list[dict]:
    if not metrics_path.exists():
        return []
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def loss_curve_svg(metrics: list[dict], title: str) -> str:
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    points = train + val
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="40"><text x="4" y="24">no steps</text></svg>'
    max_step = max(s for s, _ in points) or 1
    low, high = min(v for _, v in points), max(v for _, v in points)
    span = (high - low) or 1.0

    def xy(step: float, value: float) -> str:
        x = MARGIN + (WIDTH - 2 * MARGIN) * step / max_step
        y = HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * (value - low) / span
        return f"{x:.1f},{y:.1f}"

    train_line = " ".join(xy(s, v) for s, v in train)
    val_dots = "".join(f'<circle cx="{xy(s, v).split(",")[0]}" cy="{xy(s, v).split(",")[1]}" r="3" fill="#d62728"/>'
                       for s, v in val)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
            f'font-size="11"><rect width="100%" height="100%" fill="white"/>'
            f'<text x="{MARGIN}" y="16">{title}: train loss (line), val loss (dots)</text>'
            f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#888"/>'
            f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#888"/>'
            f'<text x="2" y="{MARGIN + 4}">{high:.2f}</text><text x="2" y="{HEIGHT - MARGIN}">{low:.2f}</text>'
            f'<text x="{WIDTH - MARGIN - 30}" y="{HEIGHT - 12}">step {max_step}</text>'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{train_line}"/>{val_dots}</svg>')


def loss_curve_markdown(svg: str) -> str:
    encoded = base64.b64encode(svg.encode()).decode()
    return f"![loss curve](data:image/svg+xml;base64,{encoded})"
