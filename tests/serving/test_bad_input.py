"""Malformed and invalid requests: the right status and an OpenAI error body, never a 500."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow  # against a real server process

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def http(deployment):
    with httpx.Client(base_url=deployment.server.url, headers=deployment.headers(), timeout=30) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int, *, code: str | None = None,
                        param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2", b"\xff\xfe", b"null", b"[]", b'"text"'])
def test_malformed_json(http, body):
    response = http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)


@pytest.mark.parametrize("field, value", [
    ("messages", "Hello"),
    ("messages", [{"role": "user", "content": 5}]),
    ("messages", [{"role": "wizard", "content": "hi"}]),
    ("messages", []),
    ("max_tokens", "ten"),
    ("max_tokens", 2.5),
    ("temperature", "hot"),
    ("stream", "yes"),
    ("n", "2"),
    ("stop", 7),
    ("stop", ["a", "b", "c", "d", "e"]),
    ("seed", "x"),
    ("logit_bias", {"not-a-token": 5}),
    ("logit_bias", {"99999999": 5}),
    ("stream_options", "include_usage"),
    ("top_logprobs", 3),  # without logprobs
])
def test_wrong_types_and_values(http, field, value):
    body = {"model": "nanogpt", "messages": HELLO, "max_tokens": 4, field: value}
    error = assert_openai_error(http.post(CHAT, json=body), 400)
    assert error["param"] in (field, None) or error["param"].startswith(field)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1, -1000])
def test_non_positive_max_tokens(http, field, value):
    body = {"model": "nanogpt", "messages": HELLO, field: value}
    assert_openai_error(http.post(CHAT, json=body), 400, param=field)


def test_non_positive_max_tokens_on_completions(http):
    body = {"model": "nanogpt", "prompt": "Hi", "max_tokens": 0}
    assert_openai_error(http.post(COMPLETIONS, json=body), 400, param="max_tokens")


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("temperature", 2.5), ("top_p", 0),
                                          ("top_p", 1.5), ("presence_penalty", 3), ("frequency_penalty", -2.5),
                                          ("n", 0), ("n", 100)])
def test_out_of_range(http, field, value):
    body = {"model": "nanogpt", "messages": HELLO, "max_tokens": 4, field: value}
    assert_openai_error(http.post(CHAT, json=body), 400, param=field)


def test_over_long_prompt(http):
    long_text = "word " * 400  # far beyond the 256-token context
    body = {"model": "nanogpt", "messages": [{"role": "user", "content": long_text}]}
    assert_openai_error(http.post(CHAT, json=body), 400, code="context_length_exceeded")
    body = {"model": "nanogpt", "prompt": long_text, "max_tokens": 1}
    assert_openai_error(http.post(COMPLETIONS, json=body), 400, code="context_length_exceeded")


def test_prompt_that_fits_but_not_with_max_tokens(http):
    body = {"model": "nanogpt", "messages": HELLO, "max_tokens": 250}
    error = assert_openai_error(http.post(CHAT, json=body), 400, code="context_length_exceeded")
    assert "256" in error["message"]


def test_unknown_model(http):
    body = {"model": "gpt-4o", "messages": HELLO, "max_tokens": 4}
    assert_openai_error(http.post(CHAT, json=body), 404, code="model_not_found", param="model")
    assert_openai_error(http.get("/v1/models/gpt-4o"), 404, code="model_not_found")


def test_completion_prompt_token_ids_out_of_range(http):
    body = {"model": "nanogpt", "prompt": [1, 2, 60000], "max_tokens": 2}
    assert_openai_error(http.post(COMPLETIONS, json=body), 400, param="prompt")


def test_chat_without_a_user_message(http):
    body = {"model": "nanogpt", "messages": [{"role": "system", "content": "Be nice."}], "max_tokens": 2}
    assert_openai_error(http.post(CHAT, json=body), 400, param="messages")


def test_unknown_fields_are_ignored(http):
    body = {"model": "nanogpt", "messages": HELLO, "max_tokens": 2, "user": "u1", "parallel_tool_calls": False,
            "something_new": {"nested": [1, 2]}}
    assert http.post(CHAT, json=body).status_code == 200


def test_unknown_route_and_method(http):
    assert_openai_error(http.get("/v1/does-not-exist"), 404)
    assert_openai_error(http.get(CHAT), 405)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer sk-test-first-and-more"}])
def test_missing_or_wrong_key(deployment, headers):
    response = httpx.post(deployment.server.url + CHAT, json={"messages": HELLO}, headers=headers, timeout=10)
    assert_openai_error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


def test_public_endpoints_need_no_key(deployment):
    for path in ("/health", "/", "/metrics"):
        assert httpx.get(deployment.server.url + path, timeout=10).status_code == 200


def test_cors_preflight_allows_authorization_and_stainless_headers(deployment):
    response = httpx.options(deployment.server.url + CHAT, timeout=10, headers={
        "Origin": "http://localhost:3210",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, x-stainless-retry-count",
    })
    assert response.status_code == 200
    allowed = response.headers["access-control-allow-headers"].lower()
    for header in ("authorization", "content-type", "x-stainless-os", "x-stainless-retry-count"):
        assert header in allowed
    assert response.headers["access-control-allow-origin"] in ("*", "http://localhost:3210")
