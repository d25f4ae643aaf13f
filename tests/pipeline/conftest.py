"""Fixtures for the pipeline: a temporary Dagster instance and artifacts root."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

ALL_ASSETS = ["raw_fineweb", "token_shards", "dolly_prompts", "pretrained_checkpoint", "finetuned_checkpoint",
              "hellaswag_scores", "deployed_model", "hf_export"]


PROFILED_ASSETS = ("raw_fineweb", "dolly_prompts", "pretrained_checkpoint", "finetuned_checkpoint", "hellaswag_scores")


def micro_run_config(selection: list[str] | None = None, **per_asset: dict) -> dict:
    """Run config selecting the micro profile on every configurable asset in the selection."""
    ops = {name: {"config": {"profile": "micro"}} for name in PROFILED_ASSETS
           if selection is None or name in selection}
    for name, extra in per_asset.items():
        ops.setdefault(name, {"config": {}})["config"].update(extra)
    return {"ops": ops}


def latest_event(instance: dg.DagsterInstance, asset: str):
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    assert event is not None, f"{asset} was not materialized"
    return event.asset_materialization


def data_version(instance: dg.DagsterInstance, asset: str) -> str:
    return latest_event(instance, asset).tags["dagster/data_version"]


@pytest.fixture
def artifacts_root(tmp_path) -> Path:
    return tmp_path / "artifacts"
