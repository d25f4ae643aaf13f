"""Limits on what one request may ask for, answered with 400 naming the parameter at fault."""

from __future__ import annotations

import httpx
import pytest

from serving.engine import token_bytes_table
from serving.fair_share import caller_queue_share
from serving.openai_api import LONGEST_TOKEN_BYTES
from serving.schemas import MAX_LOGIT_BIAS, MAX_MESSAGES, MAX_STOP_SEQUENCE_CHARS
from serving.text_stream import TextStream

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]
PER_REQUEST = caller_queue_share(64)  # one caller's share of the test server's queue of 64


@pytest.fixture(scope="module")
def http(deployment):
    with httpx.Client(base_url=deployment.server.url, headers=deployment.headers(), timeout=60) as client:
        yield client


def assert_rejected(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    return error["message"]


@pytest.mark.slow  # against a real server process
def test_completions_per_request_are_capped_at_one_callers_share_of_the_queue(http):
    assert PER_REQUEST == 16
    at_cap = http.post(COMPLETIONS, json={"prompt": ["a", "b"], "n": 8, "max_tokens": 1})
    assert at_cap.status_code == 200 and len(at_cap.json()["choices"]) == PER_REQUEST
    message = assert_rejected(http.post(COMPLETIONS, json={"prompt": ["a"] * 5, "n": 7, "max_tokens": 1}), "n")
    assert "35 completions" in message and str(PER_REQUEST) in message
    assert_rejected(http.post(COMPLETIONS, json={"prompt": [[1, 2]] * (PER_REQUEST + 1), "max_tokens": 1}),
                    "prompt")


@pytest.mark.slow
def test_stop_sequences_have_a_length_limit(http):
    longest = "z" * MAX_STOP_SEQUENCE_CHARS
    ok = http.post(CHAT, json={"messages": HELLO, "max_tokens": 4, "stop": [longest, "\n\n"]})
    assert ok.status_code == 200, ok.text
    for stop in (longest + "z", ["fine", longest + "z"]):
        message = assert_rejected(http.post(CHAT, json={"messages": HELLO, "max_tokens": 4, "stop": stop}), "stop")
        assert str(MAX_STOP_SEQUENCE_CHARS) in message


def test_text_held_back_for_a_long_stop_string_never_exceeds_it():
    stop = "a" * (MAX_STOP_SEQUENCE_CHARS - 1) + "b"
    stream = TextStream([stop])
    released = "".join(stream.push(b"a" * 7) for _ in range(200))
    assert len(released) == 7 * 200 - (MAX_STOP_SEQUENCE_CHARS - 1)  # only a stop string's worth waits
    assert stream.push(b"b") == "" and stream.stopped


@pytest.mark.slow
def test_logit_bias_names_at_most_300_tokens(http):
    assert MAX_LOGIT_BIAS == 300  # OpenAI's limit
    # " the" (262) pushed far up, and 299 other tokens slightly down: greedy decoding says " the".
    at_limit = {str(token): -1.0 for token in range(1000, 1000 + MAX_LOGIT_BIAS - 1)} | {"262": 100.0}
    body = {"prompt": "Once", "max_tokens": 3, "n": 2, "temperature": 0, "logit_bias": at_limit}
    ok = http.post(COMPLETIONS, json=body)
    assert ok.status_code == 200, ok.text
    assert [choice["text"] for choice in ok.json()["choices"]] == [" the the the"] * 2
    over = at_limit | {"7": 1.0}
    for path, body in ((CHAT, {"messages": HELLO}), (COMPLETIONS, {"prompt": "Once"})):
        message = assert_rejected(http.post(path, json={**body, "max_tokens": 1, "logit_bias": over}), "logit_bias")
        assert "at most 300" in message and "301" in message


@pytest.mark.slow
def test_a_chat_has_a_message_limit(http):
    # Empty turns render to nothing, so a chat of exactly the limit still fits the context.
    at_limit = [{"role": "assistant", "content": ""}] * (MAX_MESSAGES - 1) + HELLO
    assert http.post(CHAT, json={"messages": at_limit, "max_tokens": 1}).status_code == 200
    message = assert_rejected(http.post(CHAT, json={"messages": HELLO + at_limit, "max_tokens": 1}), "messages")
    assert str(MAX_MESSAGES) in message


def test_no_token_is_longer_than_the_bound_the_early_context_check_counts_on():
    assert max(len(b) for b in token_bytes_table()) == LONGEST_TOKEN_BYTES


@pytest.mark.slow
def test_a_text_too_long_for_the_context_is_refused_from_its_length_alone(http):
    context = http.get("/v1/models/nanogpt").json()["context_length"]
    text = "a" * (LONGEST_TOKEN_BYTES * context + 1)  # more tokens than fit, whatever the tokenizer does
    for path, body in ((CHAT, {"messages": [{"role": "user", "content": text}]}), (COMPLETIONS, {"prompt": text})):
        response = http.post(path, json={**body, "max_tokens": 1})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and "at least" in error["message"]
