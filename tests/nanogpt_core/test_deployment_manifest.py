"""The deployment manifest: what the pipeline writes is exactly what the server reads, and
nothing a reader would reject is ever written."""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import pytest

from nanogpt_core.deployment_manifest import (Decision, ManifestError, new_manifest, parse_manifest, read_manifest,
                                              write_manifest)
from serving.deployments import read_manifest as server_read_manifest

SCORES = {"benchmark": "demo-cloze", "acc": 0.3, "acc_norm": 0.325, "n": 40,
          "candidates": {"pretrained_checkpoint": {"acc_norm": 0.35, "eligible": False}}}


def pipeline_manifest(tmp_path, **changes):
    fields = dict(checkpoint_path=tmp_path / "run" / "model_00599.pt", deployment_id="d1",
                  source_asset="finetuned_checkpoint", lineage={"token_shards": "abc"}, scores=SCORES,
                  decision=Decision("gate", "finetuned_checkpoint scored best", {"max_regression": 0.01}))
    return new_manifest(**{**fields, **changes})


def test_what_the_pipeline_writes_the_server_reads_back_field_for_field(tmp_path):
    path = tmp_path / "deployment" / "current.json"
    written = write_manifest(path, pipeline_manifest(tmp_path))
    assert server_read_manifest is read_manifest  # the server has no reader of its own
    read = read_manifest(path)
    assert read == written
    assert read.checkpoint_name == "model_00599.pt" and read.model_id == "nanogpt"
    assert read.checkpoint_path == str((tmp_path / "run" / "model_00599.pt").resolve())
    assert read.decision == Decision("gate", "finetuned_checkpoint scored best", {"max_regression": 0.01})
    assert read.score_on("demo-cloze") == 0.325 and read.score_on("hellaswag") is None
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert os.listdir(path.parent) == ["current.json"]  # no temporary file left behind


def test_a_manifest_without_the_newer_fields_still_reads(tmp_path):
    data = pipeline_manifest(tmp_path).to_json()
    del data["decision"], data["source_asset"]
    manifest = parse_manifest(data)
    assert manifest.decision is None and manifest.source_asset == ""


@pytest.mark.parametrize("change, field", [
    ({"format": "other"}, "'format'"),
    ({"format_version": 2}, "'format_version'"),
    ({"deployment_id": ""}, "'deployment_id'"),
    ({"model_id": None}, "'model_id'"),
    ({"checkpoint_path": "relative/model.pt"}, "'checkpoint_path' must be absolute"),
    ({"checkpoint_name": "model_00001.pt"}, "'checkpoint_name'"),
    ({"lineage": [1]}, "'lineage'"),
    ({"scores": {"acc_norm": 1.5}}, "'scores.acc_norm'"),
    ({"scores": {"acc": float("nan")}}, "'scores.acc'"),
    ({"scores": {"n": -1}}, "'scores.n'"),
    ({"scores": {"benchmark": 3}}, "'scores.benchmark'"),
    ({"decision": {"kind": "whim", "reason": "x"}}, "'decision.kind'"),
    ({"decision": {"kind": "forced", "reason": " "}}, "'decision.reason'"),
    ({"deployed_at": "yesterday"}, "'deployed_at'"),
    ({"deployed_at": "2025-01-01T00:00:00"}, "time zone"),
])
def test_validation_names_the_field_at_fault(tmp_path, change, field):
    good = pipeline_manifest(tmp_path).to_json()
    with pytest.raises(ManifestError, match=field) as raised:
        parse_manifest({**good, **change}, "current.json")
    assert str(raised.value).startswith("current.json: ")


def test_an_invalid_manifest_is_never_written(tmp_path):
    path = tmp_path / "current.json"
    write_manifest(path, pipeline_manifest(tmp_path))
    before = path.read_bytes()
    bad = dataclasses.replace(pipeline_manifest(tmp_path), scores={"acc": 2.0})
    with pytest.raises(ManifestError, match="'scores.acc'"):
        write_manifest(path, bad)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["current.json"]


def test_unreadable_files_are_reported_with_their_path(tmp_path):
    path = tmp_path / "current.json"
    with pytest.raises(ManifestError, match="cannot read manifest .*current.json"):
        read_manifest(path)
    path.write_text("{half")
    with pytest.raises(ManifestError, match="current.json is not valid JSON"):
        read_manifest(path)


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    path = tmp_path / "current.json"
    manifests = [pipeline_manifest(tmp_path, deployment_id=f"d{i}") for i in range(4)]
    seen, stop = set(), threading.Event()

    def read_continuously():
        while not stop.is_set():
            if path.exists():
                seen.add(read_manifest(path).deployment_id)  # raises on half a file

    reader = threading.Thread(target=read_continuously)
    reader.start()
    writers = [threading.Thread(target=lambda m=m: [write_manifest(path, m) for _ in range(50)]) for m in manifests]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert seen <= {m.deployment_id for m in manifests} and seen
    assert os.listdir(tmp_path) == ["current.json"]
    assert json.loads(path.read_text())["format"] == "nanogpt-pipeline/deployment"


def test_a_redeployment_keeps_the_deployment_and_records_why(tmp_path):
    first = pipeline_manifest(tmp_path, deployed_at="2025-01-01T00:00:00+00:00")
    again = first.redeployed(Decision("rollback", "the new model rambles", {"replaced_deployment_id": "d2"}))
    assert (again.deployment_id, again.checkpoint_path, again.scores) == (first.deployment_id, first.checkpoint_path,
                                                                         first.scores)
    assert again.deployed_at > first.deployed_at and again.decision.kind == "rollback"
