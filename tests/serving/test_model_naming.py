"""Responses name the model as the client asked for it; a replaced checkpoint says what replaced it."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from nanogpt_core.deployment_manifest import new_manifest, write_manifest
from tests.serving.conftest import API_KEYS, ServerProcess, make_checkpoint

pytestmark = pytest.mark.slow  # against real server processes

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def http(deployment):
    with httpx.Client(base_url=deployment.server.url, headers=deployment.headers(), timeout=60) as client:
        yield client


def served_names(http: httpx.Client) -> list[str]:
    return [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_every_listed_name_is_echoed_back(http):
    alias, checkpoint = served_names(http)
    for name in (alias, checkpoint):
        chat = http.post(CHAT, json={"model": name, "messages": HELLO, "max_tokens": 2}).json()
        completion = http.post(COMPLETIONS, json={"model": name, "prompt": "Hi", "max_tokens": 2}).json()
        assert chat["model"] == completion["model"] == name
        assert chat["system_fingerprint"] == f"nanogpt-pipeline/{checkpoint}"


def test_streamed_chunks_name_the_model_asked_for(http):
    _, checkpoint = served_names(http)
    response = http.post(CHAT, json={"model": checkpoint, "messages": HELLO, "max_tokens": 3, "stream": True,
                                     "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[len("data: "):]) for line in response.text.splitlines()
              if line.startswith("data: {")]
    assert chunks and {c["model"] for c in chunks} == {checkpoint}


def test_a_request_naming_no_model_is_answered_as_the_alias(http):
    alias, _ = served_names(http)
    assert http.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2}).json()["model"] == alias


def test_an_unknown_model_is_told_what_is_served(http):
    alias, checkpoint = served_names(http)
    response = http.post(CHAT, json={"model": "gpt-4o", "messages": HELLO, "max_tokens": 2})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert alias in error["message"] and checkpoint in error["message"]


@pytest.fixture(scope="module")
def swapping_server(tmp_path_factory):
    """A server of its own, since swapping its deployment changes what every later test would see."""
    root = tmp_path_factory.mktemp("naming")
    manifest = root / "deployment" / "current.json"
    first = make_checkpoint(root / "run" / "model_00010.pt", seed=10, step=10)
    write_manifest(manifest, new_manifest(checkpoint_path=first, deployment_id="deploy-10"))
    server = ServerProcess(args=["--manifest", str(manifest), "--threads", "1", "--poll-interval", "0.2"],
                           env={"NANOGPT_API_KEYS": API_KEYS[0]}, log_path=root / "server.log").start()
    yield server, manifest, root / "run"
    server.stop()


def test_after_a_swap_the_previous_checkpoint_is_not_found_and_the_message_names_its_successor(swapping_server):
    server, manifest, run_dir = swapping_server
    headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        ask = {"messages": HELLO, "max_tokens": 2}
        assert http.post(CHAT, json={"model": "model_00010.pt", **ask}).status_code == 200

        second = make_checkpoint(run_dir / "model_00020.pt", seed=20, step=20)
        write_manifest(manifest, new_manifest(checkpoint_path=second, deployment_id="deploy-20"))
        deadline = time.monotonic() + 60
        while server.health()["checkpoint"] != "model_00020.pt" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.health()["checkpoint"] == "model_00020.pt", server.log()

        pinned = http.post(CHAT, json={"model": "model_00010.pt", **ask})
        assert pinned.status_code == 404
        error = pinned.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "model_00010.pt" in error["message"] and "model_00020.pt" in error["message"]
        assert "nanogpt" in error["message"]
        assert http.get("/v1/models/model_00010.pt").json()["error"]["code"] == "model_not_found"

        for name in ("nanogpt", "model_00020.pt"):
            reply = http.post(CHAT, json={"model": name, **ask})
            assert reply.status_code == 200 and reply.json()["model"] == name
