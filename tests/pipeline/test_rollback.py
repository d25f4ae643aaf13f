"""Rollback: the job and the CLI serve an earlier deployment again, and a running server swaps
back to it without failing a request."""

from __future__ import annotations

import subprocess
import sys

import dagster as dg
import pytest

from nanogpt_core.deployment_manifest import read_manifest
from pipeline.definitions import defs
from pipeline.pipes_messages import training_pipes_client
from pipeline.resources import ArtifactStore
from pipeline.rollback_job import ROLLBACK_JOB, rollback_job

from ..conftest import PROJECT_ROOT, python_env
from .conftest import step_failure_text
from .serving_helpers import SteadyTraffic, serve_manifest, wait_for_deployment

pytestmark = pytest.mark.slow


def test_the_rollback_job_asks_for_a_deployment_id_and_a_reason():
    fields = defs.resolve_job_def(ROLLBACK_JOB).run_config_schema.config_type.fields
    assert fields["deployment_id"].is_required and not fields["reason"].is_required


@pytest.fixture(scope="module")
def two_deployments(micro_pipeline, tmp_path_factory):
    """The fine-tuned model deployed, then the base model deployed over it (both through the
    gate, margin opened so the second always passes), with a server following along."""
    current = micro_pipeline.artifacts / "deployment" / "current.json"
    ids = {}
    for asset in ("finetuned_checkpoint", "pretrained_checkpoint"):
        result = micro_pipeline.materialize(["deployed_model"],
                                            deployed_model={"eligible": [asset], "max_regression": 1.0})
        assert result.success, step_failure_text(result, "deployed_model")
        ids[asset] = read_manifest(current).deployment_id
    assert ids["finetuned_checkpoint"] != ids["pretrained_checkpoint"]
    server = serve_manifest(current, tmp_path_factory.mktemp("rollback") / "server.log")
    yield micro_pipeline, server, ids
    server.stop()


def rollback_with_job(micro_pipeline, deployment_id: str, reason: str = "") -> dg.ExecuteInProcessResult:
    job = dg.Definitions(
        assets=defs.assets, jobs=[rollback_job],  # the job as registered, bound to this test's tree
        resources={"artifacts": ArtifactStore(root=str(micro_pipeline.artifacts)),
                   "pipes_subprocess_client": training_pipes_client()},
    ).resolve_job_def(ROLLBACK_JOB)
    return job.execute_in_process(run_config={"deployment_id": deployment_id, "reason": reason},
                                  instance=micro_pipeline.instance, raise_on_error=False)


def rollback_with_cli(micro_pipeline, *args: str) -> subprocess.CompletedProcess:
    env = {**python_env(), "DAGSTER_HOME": str(micro_pipeline.home), "NANOGPT_ARTIFACTS": str(micro_pipeline.artifacts)}
    return subprocess.run([sys.executable, "-m", "pipeline.rollback", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def test_the_job_rolls_back_and_the_server_swaps_without_a_failed_request(two_deployments):
    micro_pipeline, server, ids = two_deployments
    earlier, later = ids["finetuned_checkpoint"], ids["pretrained_checkpoint"]
    wait_for_deployment(server, later)

    with SteadyTraffic(server) as traffic:
        traffic.wait_for_more_answers(3)  # the later model answers
        result = rollback_with_job(micro_pipeline, earlier, reason="the base model cannot chat")
        assert result.success
        wait_for_deployment(server, earlier)
        traffic.wait_for_more_answers(3)  # and then the earlier one

    assert traffic.failures == []
    current = read_manifest(micro_pipeline.artifacts / "deployment" / "current.json")
    assert current.deployment_id == earlier and current.source_asset == "finetuned_checkpoint"
    assert current.decision.kind == "rollback" and current.decision.reason == "the base model cannot chat"
    assert current.decision.details["replaced_deployment_id"] == later
    materialization = micro_pipeline.instance.get_latest_materialization_event(
        dg.AssetKey("deployed_model")).asset_materialization
    assert materialization.metadata["decision"].value == "rollback"  # the instance knows what is served


def test_the_cli_rolls_back_lists_deployments_and_names_an_unknown_id(two_deployments):
    micro_pipeline, server, ids = two_deployments
    earlier, later = ids["finetuned_checkpoint"], ids["pretrained_checkpoint"]
    assert rollback_with_job(micro_pipeline, later).success  # serve the later one again first
    wait_for_deployment(server, later)

    with SteadyTraffic(server) as traffic:
        traffic.wait_for_more_answers(3)
        done = rollback_with_cli(micro_pipeline, earlier, "--reason", "from the shell")
        assert done.returncode == 0, done.stderr[-3000:]
        wait_for_deployment(server, earlier)
        traffic.wait_for_more_answers(3)
    assert traffic.failures == []
    assert f"now serving deployment {earlier}" in done.stdout
    assert read_manifest(micro_pipeline.artifacts / "deployment" / "current.json").decision.reason == "from the shell"

    listed = rollback_with_cli(micro_pipeline, "--list")
    assert listed.returncode == 0 and f"* {earlier}" in listed.stdout and later in listed.stdout

    unknown = rollback_with_cli(micro_pipeline, "no-such-deployment")
    assert unknown.returncode == 1
    assert "no deployment 'no-such-deployment'" in unknown.stderr and earlier in unknown.stderr
    wait_for_deployment(server, earlier)  # still serving what it served
