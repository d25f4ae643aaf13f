"""Retraining when text arrives, under a real `dagster dev` (webserver + daemon) on the micro profile.

A file dropped into the incoming folder makes the daemon's sensor start the `retrain` job,
which ends with a new deployment. With a deployment no micro model can beat (acc_norm 1.0 on
the same benchmark, written through the manifest module), the next drop ends with the gate
refusing and the server still on the old deployment. That drop's run and a run the weekly
schedule asks for go at once on different text, and each trains, scores and gates on what it
built itself.

To make the overlap certain rather than likely, the `training` pool is closed while both runs
build their data, then opened: each run's training starts only after both have made token
shards, so a lookup of "the newest shards" would hand one of them the other's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanogpt_core.checkpoint import read_checkpoint
from nanogpt_core.data.demo_corpus import iter_demo_documents
from nanogpt_core.data.folder_source import scan_folder
from nanogpt_core.deployment_manifest import Decision, new_manifest, read_manifest, write_manifest
from pipeline.automation import POLL_ENV, new_incoming_text, weekly_retraining
from pipeline.incoming import FOLDER_HASH_TAG, INCOMING_ENV, TRIGGER_TAG
from pipeline.resources import ArtifactStore
from pipeline.upstream import THIS_RUN
from tests.helpers.dagster_dev import DagsterServer, run_dagster_dev

from .serving_helpers import serve_manifest, still_serving, wait_for_deployment

pytestmark = pytest.mark.slow

SENSOR = new_incoming_text.name
BENCHMARK = "demo-cloze"  # what the micro profile scores on offline
TRIGGER_TIMEOUT = 120  # the sensor ticks every 5 s here; the daemon then queues and launches the run
CHAIN = ("raw_fineweb", "token_shards", "pretrained_checkpoint", "finetuned_checkpoint", "hellaswag_scores")


@pytest.fixture(scope="module")
def incoming(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("drop") / "incoming"  # absent until the first drop


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory, incoming):
    with run_dagster_dev(tmp_path_factory.mktemp("dagster_home"), tmp_path_factory.mktemp("artifacts"),
                         env={INCOMING_ENV: str(incoming), POLL_ENV: "5"}) as server:
        server.start_sensor(SENSOR)
        yield server


@pytest.fixture(scope="module")
def first_deployment(dagster_dev, incoming) -> dict:
    """The offline demo corpus dropped into the empty folder, and the run the sensor started for it."""
    docs = list(iter_demo_documents())
    drop(incoming, "seed.parquet",
         lambda path: pq.write_table(pa.table({"id": [d.id for d in docs], "text": [d.text for d in docs]}), path))
    run_id = wait_for_triggered_run(dagster_dev, scan_folder(incoming).content_hash)
    return {"run_id": run_id, "status": dagster_dev.wait(run_id)}


def drop(folder: Path, name: str, write) -> None:
    """Write under a dot name, then rename: the sensor never sees a half-written file."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{name}.partial"
    write(partial)
    os.replace(partial, folder / name)


def drop_text(folder: Path, name: str, text: str) -> str:
    drop(folder, name, lambda path: path.write_text(text, encoding="utf-8"))
    return scan_folder(folder).content_hash


def wait_for_triggered_run(server: DagsterServer, content_hash: str) -> str:
    deadline = time.monotonic() + TRIGGER_TIMEOUT
    while time.monotonic() < deadline:
        with server.instance() as instance:
            runs = instance.get_runs(dg.RunsFilter(tags={FOLDER_HASH_TAG: content_hash}))
        if runs:
            return runs[0].run_id
        time.sleep(2)
    raise AssertionError(f"no run for content {content_hash} within {TRIGGER_TIMEOUT} s\n{server.log_tail()}")


def materialization(instance: dg.DagsterInstance, run_id: str, asset: str) -> dg.AssetMaterialization | None:
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records:
        entry = record.event_log_entry
        if entry.dagster_event.asset_key == dg.AssetKey(asset):
            return entry.asset_materialization
    return None


def wait_for_materialization(server: DagsterServer, run_id: str, asset: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with server.instance() as instance:
            if materialization(instance, run_id, asset) is not None:
                return
        assert server.status(run_id) not in ("FAILURE", "CANCELED"), server.log_tail()
        time.sleep(1)
    raise AssertionError(f"run {run_id} did not materialize {asset} within {timeout} s")


def step_failure(instance: dg.DagsterInstance, run_id: str) -> tuple[str, str]:
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        return entry.step_key, str(entry.dagster_event.event_specific_data.error)
    raise AssertionError(f"run {run_id} has no failed step")


def data_version(event: dg.AssetMaterialization) -> str:
    return event.tags["dagster/data_version"]


def test_a_file_dropped_into_the_folder_makes_the_sensor_retrain_and_deploy(dagster_dev, incoming, first_deployment):
    run_id = first_deployment["run_id"]
    assert first_deployment["status"] == "SUCCESS", dagster_dev.log_tail()
    content_hash = scan_folder(incoming).content_hash
    with dagster_dev.instance() as instance:
        run = instance.get_run_by_id(run_id)
        assert run.job_name == "retrain" and run.tags[TRIGGER_TAG] == "sensor"
        assert materialization(instance, run_id, "raw_fineweb").metadata["folder_content_hash"].value == content_hash
        deployed = materialization(instance, run_id, "deployed_model")
        finetuned = materialization(instance, run_id, "finetuned_checkpoint")
    current = read_manifest(dagster_dev.artifacts / "deployment" / "current.json")
    assert current.deployment_id == deployed.metadata["deployment_id"].value
    assert current.checkpoint_path == finetuned.metadata["path"].value
    assert current.decision.kind == "gate"


def test_with_an_unbeatable_deployment_a_drop_and_a_scheduled_run_each_use_their_own_data_and_are_refused(
        dagster_dev, incoming, first_deployment, tmp_path, monkeypatch):
    assert first_deployment["status"] == "SUCCESS", "needs the first deployment"
    current_path = dagster_dev.artifacts / "deployment" / "current.json"
    unbeatable = write_manifest(current_path, new_manifest(
        checkpoint_path=read_manifest(current_path).checkpoint_path, deployment_id="unbeatable",
        scores={"benchmark": BENCHMARK, "acc": 1.0, "acc_norm": 1.0, "n": 40},
        decision=Decision("manual", "test: a score no micro model reaches")))
    served_bytes = current_path.read_bytes()
    server = serve_manifest(current_path, tmp_path / "server.log")
    try:
        wait_for_deployment(server, unbeatable.deployment_id)

        with dagster_dev.instance() as instance:
            instance.event_log_storage.set_concurrency_slots("training", 0)  # closed: data steps only
        try:
            # The next drop: the sensor starts a run, which builds its data and waits at training.
            # Drops are named to sort before the seed: a micro training reads only the corpus's
            # first ~20k tokens, so text at its end would leave the trained weights the same.
            sensed_hash = drop_text(incoming, "0-second.txt", "A second drop of new text. " * 40)
            sensed = wait_for_triggered_run(dagster_dev, sensed_hash)
            wait_for_materialization(dagster_dev, sensed, "token_shards")

            # More text, then the weekly schedule's tick (the sensor is off, so only the schedule asks).
            dagster_dev.stop_sensor(SENSOR)
            scheduled_hash = drop_text(incoming, "1-third.jsonl",
                                       json.dumps({"text": "A third drop, as JSON lines. " * 40}) + "\n")
            monkeypatch.setenv(INCOMING_ENV, str(incoming))
            with dagster_dev.instance() as instance:
                tick = weekly_retraining.evaluate_tick(dg.build_schedule_context(
                    instance=instance, resources={"artifacts": ArtifactStore(root=str(dagster_dev.artifacts))}))
            [request] = tick.run_requests
            assert request.tags[FOLDER_HASH_TAG] == scheduled_hash
            scheduled = dagster_dev.submit(weekly_retraining.job_name, request.run_config, request.tags)
            wait_for_materialization(dagster_dev, scheduled, "token_shards")
        finally:
            with dagster_dev.instance() as instance:
                instance.event_log_storage.set_concurrency_slots("training", 1)

        assert dagster_dev.wait(sensed) == "FAILURE" and dagster_dev.wait(scheduled) == "FAILURE"
        still_serving(server, unbeatable.deployment_id)
    finally:
        server.stop()
    assert current_path.read_bytes() == served_bytes  # current.json untouched

    runs = {"sensor": sensed, "schedule": scheduled}
    with dagster_dev.instance() as instance:
        for trigger, run_id in runs.items():
            run = instance.get_run_by_id(run_id)
            assert run.job_name == "retrain" and run.tags[TRIGGER_TAG] == trigger
            # Every step used the output its own run made just before it, and the checkpoint says so too.
            events = {asset: materialization(instance, run_id, asset) for asset in CHAIN}
            for upstream, downstream in zip(CHAIN, CHAIN[1:]):
                used = events[downstream].metadata[f"input_{upstream}"].value
                assert used["run_id"] == run_id and used["produced_in"] == THIS_RUN, (trigger, downstream, used)
                assert used["data_version"] == data_version(events[upstream])
            checkpoint = read_checkpoint(events["pretrained_checkpoint"].metadata["path"].value)
            assert checkpoint["lineage"]["data_version"] == data_version(events["token_shards"])
        folder_hashes = {trigger: materialization(instance, run_id, "raw_fineweb").metadata[
            "folder_content_hash"].value for trigger, run_id in runs.items()}
        shards = {trigger: data_version(materialization(instance, run_id, "token_shards"))
                  for trigger, run_id in runs.items()}
        failures = {trigger: step_failure(instance, run_id) for trigger, run_id in runs.items()}
        candidates = {trigger: materialization(instance, run_id, "hellaswag_scores").metadata[
            "finetuned_checkpoint_acc_norm"].value for trigger, run_id in runs.items()}
    assert folder_hashes == {"sensor": sensed_hash, "schedule": scheduled_hash}
    assert shards["sensor"] != shards["schedule"]

    # Both stopped at the gate, whose message names the benchmark and both scores.
    for trigger, (step, message) in failures.items():
        assert step == "deployed_model", message
        assert "deployment refused" in message and BENCHMARK in message, (trigger, message)
        assert f"{candidates[trigger]:.4f}" in message and "1.0000" in message, (trigger, message)
