"""Starting the server: from a bare checkpoint, key files, and the loopback-only rule."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

from serving.cli import build_parser, settings_from_args
from serving.settings import (
    LOBECHAT_LOCAL_ORIGINS,
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

        # One slot and one place in the queue, which is also one caller's share of it. No
        # <|endoftext|>, so that no admitted stream can end early and free its place.
        body = {"prompt": "Once", "max_tokens": 240, "stream": True, "logit_bias": {"50256": -100}}
        one, two = ({"Authorization": f"Bearer {key}"} for key in ("sk-file-one", "sk-file-two"))
        with httpx.Client(base_url=server.url, timeout=30) as client:
            streams = []

            def open_stream(headers: dict[str, str]) -> httpx.Response:
                streams.append(client.stream("POST", "/v1/completions", json=body, headers=headers))
                return streams[-1].__enter__()

            try:
                running = open_stream(one)
                # Its first event says it holds the slot. The line iterator is kept: a dropped one
                # closes the response, which cancels the stream.
                running_lines = running.iter_lines()
                assert running.status_code == 200 and next(running_lines)
                assert open_stream(one).status_code == 200  # waits in the queue
                over_share = open_stream(one)
                assert over_share.status_code == 429 and over_share.headers["retry-after"] == "1"
                assert over_share.read() and over_share.json()["error"]["code"] == "rate_limit_exceeded"
                full = open_stream(two)  # within its own share, but the queue is full
                assert full.status_code == 503 and full.headers["retry-after"] == "1"
                assert full.read() and full.json()["error"]["code"] == "server_overloaded"
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


def test_guard_defaults_follow_the_address(tmp_path):
    loopback = ServerSettings(checkpoint=tmp_path / "m.pt")
    assert loopback.cors_origins == LOBECHAT_LOCAL_ORIGINS
    assert loopback.host_patterns == ("localhost", "127.0.0.1", "::1")
    assert ServerSettings(checkpoint=tmp_path / "m.pt", host="127.0.0.2").host_patterns[-1] == "127.0.0.2"
    public = ServerSettings(checkpoint=tmp_path / "m.pt", host="0.0.0.0", api_keys=("k",))
    assert public.host_patterns == ("*",)  # keys are required there, which a rebound page lacks
    assert ServerSettings(checkpoint=tmp_path / "m.pt", allowed_hosts=("api.example.org",)).host_patterns == (
        "api.example.org",)
    assert loopback.max_request_bytes == 1024 * 1024 and not loopback.enable_docs
    assert loopback.key_requests_per_minute == 0 and loopback.key_concurrent_requests == 0


@pytest.mark.parametrize("field, value, message", [
    ("cors_origins", ("http://localhost:3210/",), "CORS origin 'http://localhost:3210/'"),
    ("cors_origins", ("localhost:3210",), "CORS origin 'localhost:3210'"),
    ("allowed_hosts", ("https://api.example.org",), "allowed host 'https://api.example.org'"),
    ("allowed_hosts", ("api.example.org:443",), "allowed host 'api.example.org:443'"),
    ("max_request_bytes", 0, "max_request_bytes"),
    ("key_requests_per_minute", -1, "key_requests_per_minute"),
    ("rate_limit_storage", "mongodb://db:27017", "rate limit storage 'mongodb://db:27017'"),
    ("rate_limit_storage", "127.0.0.1:6379", "rate limit storage '127.0.0.1:6379'"),
    ("forwarded_allow_ips", ("127.0.0.1", "proxy.internal"), "forwarded-allow address 'proxy.internal'"),
    ("forwarded_allow_ips", ("10.0.0.1/8",), "forwarded-allow address '10.0.0.1/8'"),
    ("forwarded_allow_ips", ("*",), "forwarded-allow address '*'"),
])
def test_guard_settings_name_what_is_wrong(tmp_path, field, value, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        ServerSettings(checkpoint=tmp_path / "m.pt", **{field: value})


def test_guard_options_from_flags_and_environment(checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("NANOGPT_API_KEYS", raising=False)
    key_file = tmp_path / "keys"
    key_file.write_text("sk-flags\n")  # /metrics behind the key needs one
    args = build_parser().parse_args([
        "--checkpoint", str(checkpoint), "--cors-origins", "https://chat.example.org, http://localhost:3210",
        "--allowed-hosts", "api.example.org,*.example.net,[::1]", "--max-request-bytes", "4096", "--enable-docs",
        "--key-requests-per-minute", "60", "--key-concurrent-requests", "4",
        "--rate-limit-storage", "redis://127.0.0.1:6379/0", "--rate-limit-namespace", "prod",
        "--forwarded-allow-ips", "10.0.0.0/8, ::1", "--expose-paths", "--metrics-need-key",
        "--api-key-file", str(key_file)])
    from_flags = settings_from_args(args)
    from_env = settings_from_environment({
        "NANOGPT_CHECKPOINT": str(checkpoint), "NANOGPT_CORS_ORIGINS": "https://chat.example.org,http://localhost:3210",
        "NANOGPT_ALLOWED_HOSTS": "api.example.org, *.example.net, [::1]", "NANOGPT_MAX_REQUEST_BYTES": "4096",
        "NANOGPT_ENABLE_DOCS": "yes", "NANOGPT_KEY_REQUESTS_PER_MINUTE": "60", "NANOGPT_KEY_CONCURRENT_REQUESTS": "4",
        "NANOGPT_RATE_LIMIT_STORAGE": "redis://127.0.0.1:6379/0", "NANOGPT_RATE_LIMIT_NAMESPACE": "prod",
        "NANOGPT_FORWARDED_ALLOW_IPS": "10.0.0.0/8,::1", "NANOGPT_EXPOSE_PATHS": "1", "NANOGPT_METRICS_NEED_KEY": "on",
        "NANOGPT_API_KEYS": "sk-flags"})
    assert from_flags == from_env
    assert from_env.cors_origins == ("https://chat.example.org", "http://localhost:3210")
    assert from_env.allowed_hosts == ("api.example.org", "*.example.net", "[::1]") and from_env.enable_docs
    assert from_env.key_requests_per_minute == 60 and from_env.rate_limit_storage.startswith("redis://")
    assert from_env.forwarded_allow_ips == ("10.0.0.0/8", "::1") and from_env.expose_paths and from_env.metrics_need_key
    defaults = settings_from_environment({"NANOGPT_CHECKPOINT": str(checkpoint)})
    assert defaults == settings_from_args(build_parser().parse_args(["--checkpoint", str(checkpoint)]))
    assert defaults.port == 5001 and defaults.forwarded_allow_ips == ()
    assert not defaults.expose_paths and not defaults.metrics_need_key
    with pytest.raises(SettingsError, match="no API key is configured"):
        settings_from_environment({"NANOGPT_CHECKPOINT": str(checkpoint), "NANOGPT_METRICS_NEED_KEY": "1"})
    assert settings_from_environment({"NANOGPT_CHECKPOINT": str(checkpoint), "NANOGPT_CORS_ORIGINS": ""}).cors_origins == ()
    with pytest.raises(SettingsError, match="NANOGPT_ENABLE_DOCS='maybe'"):
        settings_from_environment({"NANOGPT_CHECKPOINT": str(checkpoint), "NANOGPT_ENABLE_DOCS": "maybe"})


def test_gunicorn_config_applies_the_same_rule(checkpoint):
    env = {**clean_env(), "NANOGPT_CHECKPOINT": str(checkpoint), "NANOGPT_BIND": "0.0.0.0:5001"}
    refused = subprocess.run([sys.executable, "-c", "import gunicorn_config"], capture_output=True, text=True,
                             timeout=60, env=env, cwd=PROJECT_ROOT)
    assert refused.returncode != 0 and "without an API key" in refused.stderr
    env["NANOGPT_API_KEYS"] = "sk-prod"
    show = "import gunicorn_config as g; print(g.worker_class, g.bind, repr(g.forwarded_allow_ips))"
    accepted = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, timeout=60, env=env,
                              cwd=PROJECT_ROOT)
    assert accepted.returncode == 0, accepted.stderr
    assert "UvicornWorker" in accepted.stdout  # uvicorn's worker, or a subclass of it
    # Gunicorn's own default ("127.0.0.1,::1") would believe X-Forwarded-For from any local caller.
    assert accepted.stdout.split()[-1] == "''"
    del env["NANOGPT_BIND"]
    env["NANOGPT_FORWARDED_ALLOW_IPS"] = "10.0.0.0/8, ::1"
    behind_proxy = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True, timeout=60, env=env,
                                  cwd=PROJECT_ROOT)
    assert behind_proxy.returncode == 0, behind_proxy.stderr
    assert behind_proxy.stdout.split()[-2:] == ["['127.0.0.1:5001']", "'10.0.0.0/8,::1'"]
