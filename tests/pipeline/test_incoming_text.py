"""New text in the incoming folder: the sensor and the weekly schedule that ask for a retraining
run, and raw_fineweb reading the folder (evaluated in-process; the whole chain under a real
`dagster dev` is in test_retraining_e2e.py)."""

import os

import dagster as dg
import pytest

from nanogpt_core.data.folder_source import scan_folder
from pipeline.assets.data import raw_fineweb
from pipeline.automation import new_incoming_text, retrain_job, weekly_retraining
from pipeline.incoming import FOLDER_HASH_TAG, INCOMING_ENV, TRIGGER_TAG
from pipeline.resources import ArtifactStore

from .conftest import ALL_ASSETS


@pytest.fixture
def artifacts(tmp_path, monkeypatch) -> ArtifactStore:
    monkeypatch.delenv(INCOMING_ENV, raising=False)  # the default: <artifacts>/incoming
    return ArtifactStore(root=str(tmp_path / "artifacts"))


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def tick(instance, artifacts, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"artifacts": artifacts})
    return new_incoming_text.evaluate_tick(context)


def drop(artifacts: ArtifactStore, name: str, text: str) -> None:
    folder = artifacts.path("incoming")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")


def test_both_triggers_start_the_retrain_job_which_runs_the_whole_chain():
    from pipeline.definitions import defs

    assert new_incoming_text.job_name == weekly_retraining.job_name == retrain_job.name == "retrain"
    keys = defs.resolve_job_def("retrain").asset_layer.executable_asset_keys
    assert sorted(k.to_user_string() for k in keys) == sorted(ALL_ASSETS)


def test_the_sensor_waits_for_text_then_asks_once_per_content(instance, artifacts):
    first = tick(instance, artifacts)
    assert not first.run_requests and "does not exist" in first.skip_message

    drop(artifacts, "first.txt", "Some new text to learn from.")
    launched = tick(instance, artifacts)
    [request] = launched.run_requests
    content_hash = scan_folder(artifacts.path("incoming")).content_hash
    assert launched.cursor == request.run_key == content_hash
    assert request.tags[FOLDER_HASH_TAG] == content_hash and request.tags[TRIGGER_TAG] == "sensor"
    assert request.run_config == {"ops": {"raw_fineweb": {"config": {
        "source": "folder", "path": str(artifacts.path("incoming"))}}}}

    os.utime(artifacts.path("incoming", "first.txt"), (2_000_000_000, 2_000_000_000))  # newer mtime, same bytes
    again = tick(instance, artifacts, cursor=launched.cursor)
    assert not again.run_requests and "no new text" in again.skip_message

    drop(artifacts, "second.jsonl", '{"text": "More text arrives."}\n')
    [second] = tick(instance, artifacts, cursor=launched.cursor).run_requests
    assert second.run_key != request.run_key


def test_a_folder_the_sensor_cannot_read_is_a_skip_naming_the_file(instance, artifacts):
    drop(artifacts, "notes.docx", "not plain text")
    result = tick(instance, artifacts)
    assert not result.run_requests and "notes.docx" in result.skip_message


def test_the_weekly_schedule_asks_for_the_same_run_as_the_sensor(instance, artifacts):
    context = dg.build_schedule_context(instance=instance, resources={"artifacts": artifacts})
    assert "does not exist" in weekly_retraining.evaluate_tick(context).skip_message

    drop(artifacts, "first.txt", "Some new text to learn from.")
    [scheduled] = weekly_retraining.evaluate_tick(context).run_requests
    [sensed] = tick(instance, artifacts).run_requests
    assert scheduled.run_config == sensed.run_config
    assert scheduled.tags[FOLDER_HASH_TAG] == sensed.tags[FOLDER_HASH_TAG]
    assert scheduled.tags[TRIGGER_TAG] == "schedule"


def test_raw_fineweb_reads_the_folder_and_records_its_content_hash(instance, artifacts):
    drop(artifacts, "a.txt", "The first document.")
    drop(artifacts, "b.jsonl", '{"text": "The second."}\n{"text": "The third."}\n')
    result = dg.materialize([raw_fineweb], instance=instance, resources={"artifacts": artifacts},
                            run_config={"ops": {"raw_fineweb": {"config": {"profile": "micro", "source": "folder"}}}})
    metadata = result.asset_materializations_for_node("raw_fineweb")[0].metadata
    assert metadata["folder_content_hash"].value == scan_folder(artifacts.path("incoming")).content_hash
    assert metadata["documents"].value == 3 and metadata["files"].value == 2

    # The sensor, switched on now, does not retrain on what was just read.
    switched_on = tick(instance, artifacts)
    assert not switched_on.run_requests and "last built from" in switched_on.skip_message
    assert switched_on.cursor == metadata["folder_content_hash"].value


def test_raw_fineweb_fails_naming_the_file_it_cannot_read(instance, artifacts):
    drop(artifacts, "a.txt", "The first document.")
    artifacts.path("incoming", "broken.parquet").write_bytes(b"PAR1 garbage PAR1")
    result = dg.materialize([raw_fineweb], instance=instance, resources={"artifacts": artifacts}, raise_on_error=False,
                            run_config={"ops": {"raw_fineweb": {"config": {"profile": "micro", "source": "folder"}}}})
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = str(failure.event_specific_data.error)
    assert "raw_fineweb cannot read its folder source" in message and "broken.parquet" in message
