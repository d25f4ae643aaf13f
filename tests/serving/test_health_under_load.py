"""/health stays quick while the largest request the server accepts is being admitted.

Admitting a request (reading and parsing its body, validating it, tokenizing its prompt)
must not hold up the event loop that answers everyone else: the body is bounded in size,
the per-entry parts of it (messages, logit_bias) in count, and tokenizing runs in a worker
thread while tiktoken lets go of the GIL.
"""

from __future__ import annotations

import gc
import json
import threading
import time

import httpx
import pytest

from serving.schemas import MAX_LOGIT_BIAS, MAX_MESSAGES
from serving.settings import MIB

pytestmark = pytest.mark.slow  # against a real server process

CHAT = "/v1/chat/completions"
# The goal, 100 ms, is measured by `bench/serve_load.py --heavy` (docs/BENCHMARKS.md). Here the
# bound is what a busy CI machine should not reach unless the event loop stalls: on a 2-core
# machine busy with other test runs (load average 5 to 7) the slowest /health took 15-86 ms,
# where a full garbage collection of the server, set off by a body of many small JSON objects,
# held it for 255-375 ms before the start-up objects were frozen (serving.app).
HEALTH_WITHIN_S = 0.25
REQUESTS = 10


def largest_chat_body() -> bytes:
    """A chat at every bound at once: the most messages, the largest logit_bias, n at the test
    server's --max-batch, and as much text as fits in the 1 MiB body limit."""
    words = "the quick brown fox jumps over the lazy dog, déjà vu, naïve café 1234567890".split()
    text = " ".join(words[i % len(words)] for i in range(MIB // len(words)))

    def body(chars_per_message: int) -> bytes:
        messages = [{"role": ("user", "assistant")[i % 2], "content": text[i:i + chars_per_message]}
                    for i in range(MAX_MESSAGES - 1)] + [{"role": "user", "content": "Hello"}]
        return json.dumps({"model": "nanogpt", "n": 8, "max_tokens": 16, "messages": messages,
                           "logit_bias": {str(token): -1.0 for token in range(MAX_LOGIT_BIAS)}},
                          ensure_ascii=False).encode()

    chars = MIB // MAX_MESSAGES
    while len(encoded := body(chars)) > MIB:
        chars -= (len(encoded) - MIB) // MAX_MESSAGES + 1
    assert len(encoded) > MIB - 8192
    return encoded


def test_health_answers_quickly_while_the_largest_request_is_admitted(deployment):
    body = largest_chat_body()
    statuses: list[int] = []
    codes: list[str] = []
    sent = threading.Event()

    def send_largest_requests() -> None:
        try:
            with httpx.Client(base_url=deployment.server.url, headers=deployment.headers(), timeout=30) as client:
                for _ in range(REQUESTS):
                    response = client.post(CHAT, content=body, headers={"Content-Type": "application/json"})
                    statuses.append(response.status_code)
                    codes.append(response.json()["error"]["code"])
        finally:
            sent.set()

    latencies: list[float] = []
    # What is timed is the server: a garbage collection of this process (which by now holds
    # the other tests' models) would be counted against it.
    gc.collect()
    gc.disable()
    try:
        with httpx.Client(base_url=deployment.server.url, timeout=10) as health:
            health.get("/health")  # connected before timing starts
            sender = threading.Thread(target=send_largest_requests)
            sender.start()
            while not sent.is_set():
                started = time.perf_counter()
                assert health.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.002)
            sender.join()
    finally:
        gc.enable()

    # The largest chat is far over the test model's 256-token context: refused, but only once
    # read, parsed and validated on the event loop (its length alone then rules it out).
    assert statuses == [400] * REQUESTS and codes == ["context_length_exceeded"] * REQUESTS
    assert len(latencies) >= 10
    assert max(latencies) < HEALTH_WITHIN_S, sorted(latencies)[-5:]
