"""The report card of a training asset's checkpoint, as Dagster metadata and as a file beside it.

The card itself is built by nanogpt_core.report_card; this module picks what to compare it
with (the deployed model, on the benchmark the evaluation asset would use by default) and turns
it into metadata: a markdown table to read, the JSON to compare runs by, and the two numbers
worth plotting across materializations (held-out loss, acceptable replies).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg

from nanogpt_core.deployment_manifest import ManifestError
from nanogpt_core.eval.examples import EvalDataError
from nanogpt_core.report_card import build_report_card, card_beside, card_markdown, write_card
from pipeline.assets.deployment import DEFAULT_LIMITS, choose_benchmark
from pipeline.config import EvalConfig
from pipeline.deployment_store import read_current
from pipeline.resources import ArtifactStore


# How much of the frozen held-out set a card measures, by profile (default: all of it). The
# test suite's micro models are scored on a sample: the whole set costs ~10 s a card even at
# that size, because every token goes through the 50,304-wide output layer.
HELD_OUT_WINDOWS = {"micro": 16}


def card_benchmark(profile: str) -> dict[str, Any] | None:
    """What the evaluation asset scores by default for this profile, when that is cheap enough for a card.

    A profile that scores the whole benchmark (gpt2-124m: all 10,042 HellaSwag rows) is left to
    the evaluation asset: the card would double its cost.
    """
    limit = DEFAULT_LIMITS.get(profile)
    if limit is None:
        return None
    benchmark, data_path = choose_benchmark(EvalConfig(profile=profile))
    return {"benchmark": benchmark, "limit": limit, "data_path": data_path}


def previous_deployment(artifacts: ArtifactStore) -> dict[str, Any] | None:
    try:
        current = read_current(artifacts)
    except ManifestError:
        return None  # an unreadable manifest is reported by deployed_model; the card just has no comparison
    if current is None:
        return None
    return {"deployment_id": current.deployment_id, "model_id": current.model_id, "scores": current.scores}


def report_card_metadata(context: dg.AssetExecutionContext, artifacts: ArtifactStore, checkpoint: Path,
                         metrics: list[dict[str, Any]], wall_seconds: float | None, profile: str,
                         held_out: bool) -> dict[str, Any]:
    """Build the card of `checkpoint`, write it beside the checkpoint, and return it as metadata."""
    benchmark = card_benchmark(profile)
    previous = previous_deployment(artifacts)
    try:
        card = build_report_card(checkpoint, metrics=metrics, wall_seconds=wall_seconds,
                                 previous_deployment=previous, benchmark=benchmark, held_out=held_out,
                                 held_out_windows=HELD_OUT_WINDOWS.get(profile))
    except EvalDataError as e:
        context.log.warning(f"report card without this checkpoint's benchmark score: {e}")
        card = build_report_card(checkpoint, metrics=metrics, wall_seconds=wall_seconds,
                                 previous_deployment=previous, benchmark=None, held_out=held_out,
                                 held_out_windows=HELD_OUT_WINDOWS.get(profile))
    path = write_card(card_beside(checkpoint), card)
    replies = card["replies"]
    summary = (f"{replies['acceptable']}/{replies['of']} acceptable replies" if replies["kind"] == "chat"
               else f"held-out loss {card['loss'].get('held_out', float('nan')):.4f}")
    context.log.info(f"report card for {checkpoint.name}: {summary} ({card['card_seconds']:.1f} s)")
    metadata: dict[str, Any] = {
        "report_card": dg.MetadataValue.md(card_markdown(card)),
        "report_card_json": dg.MetadataValue.json(json.loads(json.dumps(card))),
        "report_card_file": dg.MetadataValue.path(str(path)),
    }
    if "held_out" in card["loss"]:
        metadata["held_out_loss"] = card["loss"]["held_out"]
    if replies["kind"] == "chat":
        metadata["replies_acceptable"] = replies["acceptable"]
    return metadata
