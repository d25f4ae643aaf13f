"""Starting the server: from a bare checkpoint, key files, and the loopback-only rule."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from serving.settings import (
    ServerSettings,
    SettingsError,
    collect_api_keys,
    is_loopback,
    read_key_file,
    settings_from_environment,
)
from tests.serving.conftest import PROJECT_ROOT, ServerProcess, make_checkpoint

pytestmark = pytest.mark.slow  # against a real server process


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "model_00042.pt", seed=42, step=42)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOGPT_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    if "NANOGPT_CACHE_DIR" in os.environ:  # where the tokenizer's rank file is cached
        env["NANOGPT_CACHE_DIR"] = os.environ["NANOGPT_CACHE_DIR"]
    return env


def test_refuses_a_public_address_without_a_key(checkpoint):
    result = subprocess.run([sys.executable, "-m", "serving", "--checkpoint", str(checkpoint), "--host", "0.0.0.0",
                             "--port", "1"], capture_output=True, text=True, timeout=60, env=clean_env(),
                            cwd=PROJECT_ROOT)
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0 without an API key" in result.stderr


def test_bare_checkpoint_without_keys_serves_loopback_openly(checkpoint, tmp_path):
    server = ServerProcess(args=["--checkpoint", str(checkpoint), "--threads", "1"], env={},
                           log_path=tmp_path / "server.log").start()
    try:
        assert "no API key configured" in server.log()
        models = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["nanogpt", "model_00042.pt"]
        assert models[0]["lineage"]["step"] == 42 and models[0]["deployment_id"] is None
        reply = httpx.post(server.url + "/v1/completions", timeout=30,
                           json={"model": "model_00042.pt", "prompt": "Hello", "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["model"] == "model_00042.pt"
        assert server.health()["auth_required"] is False
    finally:
        server.stop()


def test_keys_from_a_key_file_and_a_full_queue(checkpoint, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nsk-file-one\n\n  sk-file-two  \n")
    server = ServerProcess(args=["--checkpoint", str(checkpoint), "--api-key-file", str(key_file),
                                 "--threads", "1", "--max-batch", "1", "--max-queue", "1"], env={},
                           log_path=tmp_path / "server.log")
    server.start()
    try:
        url = server.url + "/v1/models"
        assert httpx.get(url, timeout=10).status_code == 401
        for key in ("sk-file-one", "sk-file-two"):
            assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
        assert httpx.get(url, headers={"Authorization": "Bearer sk-file"}, timeout=10).status_code == 401

        # One slot and one place in the queue: of three long streams at once, one is turned away.
        body = {"prompt": "Once", "max_tokens": 240, "stream": True}
        headers = {"Authorization": "Bearer sk-file-one"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            streams = [client.stream("POST", "/v1/completions", json=body) for _ in range(3)]
            responses = [s.__enter__() for s in streams]
            try:
                statuses = sorted(r.status_code for r in responses)
                assert statuses == [200, 200, 503], statuses
                [refused] = [r for r in responses if r.status_code == 503]
                assert refused.headers["retry-after"] == "1"
                assert refused.read() and refused.json()["error"]["code"] == "server_overloaded"
            finally:
                for stream in streams:
                    stream.__exit__(None, None, None)
    finally:
        server.stop()


def test_settings_rules(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("127.3.2.1") and is_loopback("::1")
    assert is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
    with pytest.raises(SettingsError, match="without an API key"):
        ServerSettings(checkpoint=tmp_path / "m.pt", host="0.0.0.0")
    assert ServerSettings(checkpoint=tmp_path / "m.pt", host="0.0.0.0", api_keys=("k",)).requires_auth
    with pytest.raises(SettingsError, match="exactly one"):
        ServerSettings(checkpoint=tmp_path / "m.pt", manifest=tmp_path / "current.json")
    key_file = tmp_path / "keys"
    key_file.write_text("# only a comment\n")
    with pytest.raises(SettingsError, match="holds no key"):
        read_key_file(key_file)
    key_file.write_text("b\n")
    assert collect_api_keys(key_file, {"NANOGPT_API_KEYS": "a, b ,,c"}) == ("a", "b", "c")
    env = {"NANOGPT_MANIFEST": str(tmp_path / "current.json"), "NANOGPT_MAX_BATCH": "4", "NANOGPT_API_KEYS": "k"}
    settings = settings_from_environment(env)
    assert settings.manifest == tmp_path / "current.json" and settings.max_batch == 4
    with pytest.raises(SettingsError, match="NANOGPT_MAX_BATCH"):
        settings_from_environment({**env, "NANOGPT_MAX_BATCH": "many"})


def test_gunicorn_config_applies_the_same_rule(checkpoint):
    env = {**clean_env(), "NANOGPT_CHECKPOINT": str(checkpoint), "NANOGPT_BIND": "0.0.0.0:8000"}
    refused = subprocess.run([sys.executable, "-c", "import gunicorn_config"], capture_output=True, text=True,
                             timeout=60, env=env, cwd=PROJECT_ROOT)
    assert refused.returncode != 0 and "without an API key" in refused.stderr
    env["NANOGPT_API_KEYS"] = "sk-prod"
    accepted = subprocess.run([sys.executable, "-c", "import gunicorn_config as g; print(g.worker_class, g.bind)"],
                              capture_output=True, text=True, timeout=60, env=env, cwd=PROJECT_ROOT)
    assert accepted.returncode == 0, accepted.stderr
    assert "uvicorn_worker.UvicornWorker" in accepted.stdout
