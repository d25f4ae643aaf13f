"""Per-key limits: requests in flight and requests per minute, answered with 429 and Retry-After.

Run against the guarded server (counts in process memory) and against a server counting in
the local Redis, in a namespace of its own that is removed afterwards.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import httpx
import pytest

from serving.rate_limits import CallerLimits, RateLimitStorageUnavailable
from tests.serving.conftest import GUARDED_KEYS, GUARDED_LIMITS, ServerProcess, guarded_server_args, make_checkpoint

pytestmark = pytest.mark.slow  # against real server processes

REDIS_URL = "redis://127.0.0.1:6379/0"
CHAT = "/v1/chat/completions"
CHAT_BODY = b'{"model": "nanogpt", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}'


def redis_client():
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis server at {REDIS_URL}")
    return client


@pytest.fixture(scope="module")
def redis_namespace():
    client = redis_client()
    namespace = f"nanogpt-test-{uuid.uuid4().hex}"
    yield namespace
    for key in client.scan_iter(match=f"*{namespace}*"):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory, redis_namespace):
    root = tmp_path_factory.mktemp("redis-limits")
    checkpoint = make_checkpoint(root / "model_00008.pt", seed=8, step=8)
    server = ServerProcess(
        args=[*guarded_server_args(checkpoint), "--rate-limit-storage", REDIS_URL,
              "--rate-limit-namespace", redis_namespace],
        env={"NANOGPT_API_KEYS": ",".join(GUARDED_KEYS)}, log_path=root / "server.log").start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def limited_server(request) -> ServerProcess:
    return request.getfixturevalue("guarded_server" if request.param == "memory" else "redis_server")


def call(server: ServerProcess, key: str) -> httpx.Response:
    return httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)


def assert_rate_limited(response: httpx.Response, max_retry_after: int) -> dict:
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["retry-after"]) <= max_retry_after
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    return error


class HeldUpload:
    """A chat request whose body is held back, so the request stays in flight until released."""

    def __init__(self, server: ServerProcess, key: str):
        self.sent_headers = threading.Event()
        self.release = threading.Event()
        self.response: httpx.Response | None = None

        def body():
            self.sent_headers.set()
            self.release.wait(30)
            yield CHAT_BODY

        def post():
            self.response = httpx.post(server.url + CHAT, content=body(), timeout=60, headers={
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"})

        self.thread = threading.Thread(target=post, daemon=True)
        self.thread.start()
        assert self.sent_headers.wait(10)

    def finish(self) -> httpx.Response:
        self.release.set()
        self.thread.join(30)
        return self.response


def test_past_its_concurrent_requests_a_key_gets_429_and_other_keys_do_not(limited_server):
    limit = GUARDED_LIMITS["concurrent_requests"]
    held = [HeldUpload(limited_server, "sk-rate-a") for _ in range(limit)]
    try:
        # The held requests are taken in as soon as the server has read their headers.
        deadline = time.monotonic() + 10
        while (refused := call(limited_server, "sk-rate-a")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        error = assert_rate_limited(refused, max_retry_after=1)
        assert f"limit {limit}" in error["message"]
        assert call(limited_server, "sk-rate-b").status_code == 200
    finally:
        responses = [upload.finish() for upload in held]
    assert [r.status_code for r in responses] == [200] * limit
    assert call(limited_server, "sk-rate-a").status_code == 200  # the slots were given back


def test_past_its_requests_per_minute_a_key_gets_429_and_other_keys_do_not(limited_server):
    limit = GUARDED_LIMITS["requests_per_minute"]
    statuses = [call(limited_server, "sk-rate-c").status_code for _ in range(limit)]
    assert statuses == [200] * limit
    error = assert_rate_limited(call(limited_server, "sk-rate-c"), max_retry_after=60)
    assert f"limit {limit}" in error["message"]
    assert call(limited_server, "sk-rate-b").status_code == 200


def test_redis_holds_the_counts(redis_server, redis_namespace):
    call(redis_server, "sk-rate-b")
    keys = list(redis_client().scan_iter(match=f"*{redis_namespace}*"))
    assert keys, "no rate-limit counters in Redis"
    assert not any(b"sk-rate" in key for key in keys), "API keys must not be written to Redis"


def test_an_unreachable_redis_stops_the_start_but_a_lost_one_lets_requests_through():
    limits = CallerLimits(requests_per_minute=1, concurrent_requests=0, storage_uri="redis://127.0.0.1:1/0")
    with pytest.raises(RateLimitStorageUnavailable, match="redis://127.0.0.1:1/0"):
        asyncio.run(limits.check_storage())  # what the app's start-up runs

    async def hits():
        return [await limits.hit("caller") for _ in range(3)]

    assert asyncio.run(hits()) == [None, None, None]
