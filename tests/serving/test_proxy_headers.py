"""X-Forwarded-For names the client only when it comes from a proxy the operator named.

On a keyless server the per-minute limit is counted per client address. Were the header
believed from any local caller (uvicorn's own default trusts 127.0.0.1), a client could send a
new made-up address with each request and never be limited.
"""

from __future__ import annotations

import httpx
import pytest

from tests.serving.conftest import ServerProcess, make_checkpoint

pytestmark = pytest.mark.slow  # against real server processes

REQUESTS_PER_MINUTE = 2
ASK = {"prompt": "Hi", "max_tokens": 1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("proxy") / "model_00031.pt", seed=31, step=31)


def keyless_server(checkpoint, log_path, *extra: str) -> ServerProcess:
    return ServerProcess(args=["--checkpoint", str(checkpoint), "--threads", "1",
                               "--key-requests-per-minute", str(REQUESTS_PER_MINUTE), *extra],
                         env={}, log_path=log_path).start()


@pytest.fixture(scope="module")
def server_behind_nothing(checkpoint, tmp_path_factory):
    server = keyless_server(checkpoint, tmp_path_factory.mktemp("no-proxy") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_behind_local_proxy(checkpoint, tmp_path_factory):
    server = keyless_server(checkpoint, tmp_path_factory.mktemp("local-proxy") / "server.log",
                            "--forwarded-allow-ips", "127.0.0.1")
    yield server
    server.stop()


def statuses(server: ServerProcess, forwarded_for: list[str]) -> list[int]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        return [http.post("/v1/completions", json=ASK, headers={"X-Forwarded-For": address}).status_code
                for address in forwarded_for]


def test_a_made_up_address_per_request_does_not_escape_the_limit(server_behind_nothing):
    spoofed = [f"203.0.113.{i}" for i in range(1, 6)]
    assert statuses(server_behind_nothing, spoofed) == [200, 200, 429, 429, 429], server_behind_nothing.log()


def test_a_named_proxy_says_who_the_client_is(server_behind_local_proxy):
    # Every connection comes from 127.0.0.1, the named proxy, so each forwarded address is a
    # caller of its own: five callers within their limit, then one of them past it.
    callers = [f"198.51.100.{i}" for i in range(1, 6)]
    assert statuses(server_behind_local_proxy, [*callers, callers[0], callers[0]]) == [200] * 6 + [429]
