"""Fixtures for the pipeline: a temporary Dagster instance and artifacts root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster._core.storage.defs_state.base import set_defs_state_storage
import pytest

from pipeline.definitions import defs
from pipeline.pipes_messages import training_pipes_client
from pipeline.resources import ArtifactStore

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


def materialize(selection: str | list[str], instance: dg.DagsterInstance, artifacts_root: Path,
                **config: dict) -> dg.ExecuteInJobResult:
    """Materialize in-process on the micro profile with real torchrun; failures are returned, not raised."""
    return dg.materialize(
        [*defs.assets, *defs.asset_checks], selection=selection, instance=instance,
        resources={"artifacts": ArtifactStore(root=str(artifacts_root)),
                   "pipes_subprocess_client": training_pipes_client()},
        run_config=micro_run_config(None if selection == "*" else list(selection), **config), raise_on_error=False)


def step_failure_text(result: dg.ExecuteInJobResult, step: str) -> str:
    failures = [e for e in result.all_events if e.is_step_failure and e.step_key == step]
    assert failures, f"{step} did not fail"
    return str(failures[0].event_specific_data.error)


@dataclass
class MicroPipeline:
    """A Dagster instance and artifacts tree on which the whole micro graph has run once."""
    instance: dg.DagsterInstance
    home: Path  # the instance's folder: DAGSTER_HOME for a process that should use the same instance
    artifacts: Path

    def materialize(self, selection: str | list[str], **config: dict) -> dg.ExecuteInJobResult:
        return materialize(selection, self.instance, self.artifacts, **config)


@pytest.fixture(autouse=True)
def no_leftover_definitions_state():
    """Each test starts without a current definitions-state storage.

    A Dagster instance, while open, makes its storage the current one in a context variable
    that loading definitions reads. An instance another test opened and dropped can stay
    there, and loading definitions then fails with "Attempted to resolve undefined
    DagsterInstance weakref"; an instance a test opens itself sets its own again.
    """
    with set_defs_state_storage(None):
        yield


@pytest.fixture(scope="session")
def micro_pipeline(tmp_path_factory) -> MicroPipeline:
    """Shared by the deployment tests, which each set up the deployment state they need first."""
    home = tmp_path_factory.mktemp("dagster_home")
    with dg.instance_for_test(temp_dir=str(home), set_dagster_home=False) as instance:
        pipeline = MicroPipeline(instance, home, tmp_path_factory.mktemp("micro") / "artifacts")
        result = pipeline.materialize("*")
        assert result.success, [str(e.event_specific_data.error) for e in result.all_events if e.is_step_failure]
        yield pipeline
