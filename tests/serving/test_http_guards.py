"""What the server refuses from the headers alone: Host names, origins, body types and sizes, keys.

Defaults are checked on the shared server (API keys on, loopback, nothing else configured);
configured guards on the second, guarded server.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import GUARDED_LIMITS, GUARDED_ORIGIN

pytestmark = pytest.mark.slow  # against real server processes

CHAT = "/v1/chat/completions"
CHAT_BODY = {"model": "nanogpt", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
LOBECHAT = "http://localhost:3210"
MB = 1_000_000


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# --- request bodies: size, type, and the key before either ---------------------------------


def peak_resident_growth_mb(pid: int, action) -> float:
    """How far the process's peak resident memory rises above where it stood while `action` runs."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current size
    before = _status_kb(pid, "VmRSS")
    action()
    return (_status_kb(pid, "VmHWM") - before) / 1024


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def hundred_megabytes():
    chunk = b"x" * MB  # one buffer sent a hundred times: the test itself holds 1 MB
    for _ in range(100):
        yield chunk


def post_huge_body(url: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(url + CHAT, content=hundred_megabytes(), timeout=60,
                      headers={"Content-Type": "application/json", **headers})


@pytest.mark.parametrize("declared_length", [False, True], ids=["chunked", "content-length"])
def test_a_100_mb_body_without_a_key_is_refused_unread(deployment, declared_length):
    headers = {"Content-Length": str(100 * MB)} if declared_length else {}
    responses = []
    growth = peak_resident_growth_mb(deployment.server.process.pid,
                                     lambda: responses.append(post_huge_body(deployment.server.url, headers)))
    assert responses[0].status_code in (401, 413), responses[0].text
    assert growth < 20, f"the server grew by {growth:.1f} MB"


@pytest.mark.parametrize("declared_length", [False, True], ids=["chunked", "content-length"])
def test_a_100_mb_body_with_a_key_gets_413(deployment, declared_length):
    headers = {**deployment.headers(), **({"Content-Length": str(100 * MB)} if declared_length else {})}
    responses = []
    growth = peak_resident_growth_mb(deployment.server.process.pid,
                                     lambda: responses.append(post_huge_body(deployment.server.url, headers)))
    error = error_of(responses[0], 413)
    assert error["code"] == "request_too_large" and "1048576 bytes" in error["message"]
    assert growth < 20, f"the server grew by {growth:.1f} MB"


def test_a_body_within_the_default_limit_is_served(deployment):
    body = {**CHAT_BODY, "padding": "x" * 1_000_000}  # unknown fields are ignored, so only the size matters
    response = httpx.post(deployment.server.url + CHAT, json=body, headers=deployment.headers(), timeout=30)
    assert response.status_code == 200, response.text


def test_malformed_json_without_a_key_is_401_not_400(deployment):
    response = httpx.post(deployment.server.url + CHAT, content=b"{not json", timeout=10,
                          headers={"Content-Type": "application/json"})
    assert error_of(response, 401)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_post_bodies_other_than_json_get_415(deployment, content_type):
    headers = {**deployment.headers(), **({"Content-Type": content_type} if content_type else {})}
    response = httpx.post(deployment.server.url + CHAT, content=b'{"model": "nanogpt"}', headers=headers,
                          timeout=10)
    error = error_of(response, 415)
    assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]


def test_json_with_a_charset_is_json(deployment):
    response = httpx.post(deployment.server.url + CHAT, json=CHAT_BODY, timeout=30,
                          headers={**deployment.headers(), "Content-Type": "Application/JSON; charset=utf-8"})
    assert response.status_code == 200, response.text


def test_a_smaller_configured_limit_applies_to_declared_and_chunked_bodies(guarded_server):
    limit = GUARDED_LIMITS["max_request_bytes"]
    headers = {"Authorization": "Bearer sk-guard", "Content-Type": "application/json"}
    over = b'{"padding": "' + b"x" * limit + b'"}'
    declared = httpx.post(guarded_server.url + CHAT, content=over, headers=headers, timeout=10)
    chunked = httpx.post(guarded_server.url + CHAT, content=iter([over[:1000], over[1000:]]), headers=headers,
                         timeout=10)
    for response in (declared, chunked):
        assert f"at most {limit} bytes" in error_of(response, 413)["message"]


# --- browsers: CORS origins ----------------------------------------------------------------


@pytest.mark.parametrize("origin", [LOBECHAT, "http://127.0.0.1:3210"])
def test_lobechat_on_this_machine_is_an_allowed_origin_by_default(deployment, origin):
    response = httpx.get(deployment.base_url + "/models", headers={**deployment.headers(), "Origin": origin},
                         timeout=10)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == origin


@pytest.mark.parametrize("origin", ["https://attacker.example", "http://localhost:3000", "null"])
def test_other_origins_get_no_cors_headers_by_default(deployment, origin):
    simple = httpx.get(deployment.base_url + "/models", headers={**deployment.headers(), "Origin": origin},
                       timeout=10)
    assert "access-control-allow-origin" not in simple.headers
    preflight = httpx.options(deployment.server.url + CHAT, timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers


def test_a_401_carries_cors_headers_for_an_allowed_origin(deployment):
    response = httpx.post(deployment.server.url + CHAT, json=CHAT_BODY, headers={"Origin": LOBECHAT}, timeout=10)
    error_of(response, 401)
    assert response.headers["access-control-allow-origin"] == LOBECHAT


def test_a_configured_origin_replaces_the_default_list(guarded_server):
    headers = {"Authorization": "Bearer sk-guard"}
    configured = httpx.get(guarded_server.url + "/v1/models", headers={**headers, "Origin": GUARDED_ORIGIN},
                           timeout=10)
    assert configured.headers["access-control-allow-origin"] == GUARDED_ORIGIN
    lobechat = httpx.get(guarded_server.url + "/v1/models", headers={**headers, "Origin": LOBECHAT}, timeout=10)
    assert lobechat.status_code == 200 and "access-control-allow-origin" not in lobechat.headers


# --- Host names (DNS rebinding) -------------------------------------------------------------


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}", "localhost.attacker.example",
                                  "127.0.0.1.nip.io:{port}", "[::2]:{port}", ""])
def test_a_loopback_server_refuses_other_host_names(deployment, host):
    port = deployment.server.port
    response = httpx.get(deployment.server.url + "/health", headers={"Host": host.format(port=port)}, timeout=10)
    error = error_of(response, 400)
    assert error["code"] == "invalid_host"


@pytest.mark.parametrize("host", ["localhost:{port}", "LOCALHOST", "127.0.0.1:{port}", "[::1]:{port}", "[::1]",
                                  "localhost."])
def test_a_loopback_server_answers_to_loopback_names(deployment, host):
    port = deployment.server.port
    response = httpx.get(deployment.server.url + "/health", headers={"Host": host.format(port=port)}, timeout=10)
    assert response.status_code == 200, response.text


def test_configured_host_names_replace_the_loopback_names(guarded_server):
    def status(host: str) -> int:
        return httpx.get(guarded_server.url + "/health", headers={"Host": host}, timeout=10).status_code

    assert status("api.example.org") == 200 and status("API.example.org:443") == 200
    assert status("localhost") == 400 and status("other.example.org") == 400


# --- API schema pages ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc"])
def test_schema_pages_are_off_by_default(deployment, path):
    for headers in ({}, deployment.headers()):
        assert error_of(httpx.get(deployment.server.url + path, headers=headers, timeout=10), 404)


def test_schema_pages_when_enabled_need_the_key(guarded_server):
    for path in ("/docs", "/openapi.json"):
        assert error_of(httpx.get(guarded_server.url + path, timeout=10), 401)
    with httpx.Client(base_url=guarded_server.url, headers={"Authorization": "Bearer sk-guard"}, timeout=10) as c:
        assert "/v1/chat/completions" in c.get("/openapi.json").json()["paths"]
        assert "swagger" in c.get("/docs").text.lower()


def test_public_pages_stay_public_behind_the_guards(guarded_server):
    for path in ("/health", "/metrics", "/"):
        assert httpx.get(guarded_server.url + path, timeout=10).status_code == 200


def test_the_chat_page_sends_json(deployment):
    page = httpx.get(deployment.server.url + "/", timeout=10).text
    assert '"Content-Type": "application/json"' in page

