"""`/v1/models/{id}` returns the report card written beside the deployed checkpoint, without server paths."""

from __future__ import annotations

import time

import httpx
import pytest

from nanogpt_core.deployment_manifest import new_manifest, write_manifest
from nanogpt_core.report_card import TEXT_PROMPTS
from tests.serving.test_leaks import strings

pytestmark = pytest.mark.slow  # against a real server process


def serve_the_first_checkpoint(deployment) -> None:
    """The shared server may have been swapped by earlier tests: deploy model_00001.pt (which has
    a card beside it) again, and wait until the server has loaded it."""
    write_manifest(deployment.manifest, new_manifest(
        checkpoint_path=deployment.checkpoint_dir / "model_00001.pt", deployment_id="deploy-card",
        lineage={"token_shards": "v1"}, scores={"benchmark": "demo-cloze", "acc": 0.25, "acc_norm": 0.26, "n": 100}))
    deadline = time.monotonic() + 30
    while deployment.server.health()["deployment_id"] != "deploy-card" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert deployment.server.health()["deployment_id"] == "deploy-card", deployment.server.log()


def test_the_model_object_carries_its_report_card(deployment):
    serve_the_first_checkpoint(deployment)
    with httpx.Client(base_url=deployment.server.url, headers=deployment.headers(), timeout=30) as http:
        for name in ("nanogpt", "model_00001.pt"):
            card = http.get(f"/v1/models/{name}").json()["report_card"]
            assert card["format"] == "nanogpt-pipeline/report-card"
            assert card["checkpoint"]["name"] == "model_00001.pt" and card["checkpoint"]["step"] == 1
            # a random base model: its greedy continuations of the text prompts are on record
            assert card["replies"]["kind"] == "text"
            assert [c["prompt"] for c in card["completions"]] == list(TEXT_PROMPTS)
            assert card["scores"]["previous_deployment"]["acc_norm"] == 0.25
        listed = http.get("/v1/models").json()["data"]
        assert all(model["report_card"] == card for model in listed)


def test_no_server_path_is_shown(deployment):
    """The card, the checkpoint's lineage and the manifest's record absolute paths; clients get file names."""
    serve_the_first_checkpoint(deployment)
    with httpx.Client(base_url=deployment.server.url, headers=deployment.headers(), timeout=30) as http:
        model = http.get("/v1/models/nanogpt").json()
        listed = http.get("/v1/models").json()
    assert model["report_card"]["checkpoint"]["path"] == model["lineage"]["checkpoint_path"] == "model_00001.pt"
    assert not [s for s in strings(model) if s.startswith("/")], model
    assert not [s for s in strings(listed) if s.startswith("/")], listed

