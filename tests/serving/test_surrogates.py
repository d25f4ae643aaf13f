"""A lone UTF-16 surrogate in a client's text: valid JSON, no UTF-8 encoding, and never a 500.

Bodies are written by hand with `json.dumps`, which escapes the surrogate as `\\ud800` as a
client's JSON library would; the server must answer 4xx in OpenAI's shape, naming the field.
"""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.slow  # against a real server process

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
LONE = "\ud800"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def http(deployment):
    with httpx.Client(base_url=deployment.server.url, headers=deployment.headers(), timeout=30) as client:
        yield client


def post(http: httpx.Client, path: str, body: dict) -> httpx.Response:
    return http.post(path, content=json.dumps(body).encode("ascii"), headers={"Content-Type": "application/json"})


def assert_refused(response: httpx.Response, param: str | None = None) -> dict:
    assert 400 <= response.status_code < 500, response.text
    assert response.content.isascii()
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    return error


CHAT_CASES = [
    ({"model": LONE}, "model"),
    ({"model": "nano" + LONE + "gpt"}, "model"),
    ({"messages": [{"role": "user", "content": "Hi " + LONE}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, None),
    ({"messages": [{"role": "user", "content": "Hi", "name": LONE}]}, "messages.0.name"),
    ({"stop": LONE}, "stop"),
    ({"stop": ["fine", "x" + LONE]}, "stop"),
    ({"logit_bias": {LONE: 1}}, "logit_bias"),
    ({"logit_bias": {"12" + LONE: 1}}, "logit_bias"),
    ({"user": LONE}, "user"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields, param", CHAT_CASES)
def test_chat(http, fields, param, stream):
    body = {"model": "nanogpt", "messages": HELLO, "max_tokens": 2, "stream": stream, **fields}
    error = assert_refused(post(http, CHAT, body), param)
    assert param is not None or error["param"].startswith("messages")


COMPLETION_CASES = [
    ({"model": LONE}, "model"),
    ({"prompt": LONE}, "prompt"),
    ({"prompt": ["fine", "also " + LONE]}, "prompt"),
    ({"stop": LONE}, "stop"),
    ({"logit_bias": {LONE: -5}}, "logit_bias"),
    ({"suffix": LONE}, "suffix"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields, param", COMPLETION_CASES)
def test_completions(http, fields, param, stream):
    body = {"model": "nanogpt", "prompt": "Once", "max_tokens": 2, "stream": stream, **fields}
    assert_refused(post(http, COMPLETIONS, body), param)


def test_a_surrogate_pair_is_a_character_and_is_served(http):
    body = {"model": "nanogpt", "messages": [{"role": "user", "content": "Hi \ud83d\ude00"}], "max_tokens": 1,
            "stop": ["\ud83d\ude00"]}
    assert post(http, CHAT, body).status_code == 200


def test_an_unknown_model_name_comes_back_as_sent(http):
    error = assert_refused(post(http, CHAT, {"model": "modèle-√", "messages": HELLO, "max_tokens": 1}), "model")
    assert "modèle-√" in error["message"]


@pytest.mark.parametrize("path", ["/v1/models/%ED%A0%80", "/v1/models/a%ED%B0%80b", "/v1/models/%FF",
                                  "/v1/%ED%A0%80"])
def test_undecodable_bytes_in_the_path(http, path):
    # The server decodes the path with U+FFFD for bytes that are not UTF-8, so no surrogate
    # reaches the handlers; the answer is a plain 404.
    response = http.get(path)
    assert response.status_code == 404, response.text
    assert response.content.isascii() and set(response.json()["error"]) == {"message", "type", "param", "code"}
