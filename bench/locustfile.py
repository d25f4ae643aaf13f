"""Locust users for `serve_load.py`: OpenAI clients, half of them streaming.

Run by `serve_load.py` (`locust --headless -f bench/locustfile.py ...`); usable on its own too:

    NANOGPT_LOAD_KEY=sk-... locust -f bench/locustfile.py OpenAIClient --headless -u 64 -r 64 -t 60s \\
        --host http://127.0.0.1:5001

Users are numbered as they start. Even-numbered users stream chat completions, odd-numbered
ones ask for plain completions; every eighth user (numbers 0, 8, 16, ...) streams and hangs
up after a few chunks, every time. Locust's own table counts requests and failures; the
figures locust does not know about (time to the first streamed token, completion tokens,
deliberate hang-ups, refusals by design) are written as JSON to NANOGPT_LOAD_RESULTS when
the run ends.

A request counts as failed when the answer is anything but a 200 with a complete body, or a
429/503 (the server refusing by design: rate limit, full queue, shutting down). A stream is
complete when it ends with `data: [DONE]` and carries no error event.

`serve_load.py --heavy` names two other classes instead: `HeavyCaller` users send one
heavy request, read from the JSON file NANOGPT_HEAVY_REQUEST (`{"path", "body"}`), over
and over with key NANOGPT_HEAVY_KEY, and one `Victim` sends a short greedy chat request
after another with key NANOGPT_VICTIM_KEY, starting NANOGPT_VICTIM_DELAY_S seconds late so
that the heavy load is already running. Every victim request must come back whole; its
latencies, and what became of the heavy requests (done, 429, 503, failed), go into the
results file. A heavy request file may name the status it expects (`"expect_status": 400` for
a body the server reads, validates and tokenizes in full before refusing it). One
`HealthWatcher` asks for /health every HEALTH_EVERY_S seconds throughout, and its latencies
go into the results file too.
"""

from __future__ import annotations

import itertools
import json
import os
import time

from locust import HttpUser, events, task

MAX_TOKENS = int(os.environ.get("NANOGPT_LOAD_MAX_TOKENS", "32"))
HANG_UP_AFTER_CHUNKS = 3
REFUSED_BY_DESIGN = (429, 503)
MESSAGES = [{"role": "user", "content": "Tell me about the weather in spring."}]
PROMPT = "The history of the printing press begins"

_user_numbers = itertools.count()
_results = {"ttft_s": [], "completion_tokens": 0, "refused_by_design": 0, "hung_up": 0,
            "streams_completed": 0, "completions_completed": 0,
            "victim_latency_s": [], "victim_tokens": [], "victim_failed": 0,
            "heavy_latency_s": [], "heavy_refused": {"429": 0, "503": 0}, "heavy_failed": 0,
            "health_latency_s": []}
HEALTH_EVERY_S = 0.05


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {os.environ['NANOGPT_LOAD_KEY']}", "Content-Type": "application/json"}


def _answered(response) -> bool:
    """Whether a 200 came back to read; a refusal by design counts as a success, anything else fails."""
    if response.status_code in REFUSED_BY_DESIGN:
        _results["refused_by_design"] += 1
        response.success()
        return False
    if response.status_code != 200:
        response.failure(f"status {response.status_code}: {response.text[:200]}")
        return False
    return True


class OpenAIClient(HttpUser):
    # No think time: each user sends its next request as soon as the last one ends.
    wait_time = staticmethod(lambda: 0)

    def on_start(self) -> None:
        number = next(_user_numbers)
        self.streams = number % 2 == 0
        self.hangs_up = number % 8 == 0

    @task
    def one_request(self) -> None:
        if self.streams:
            self._stream_chat()
        else:
            self._complete()

    def _complete(self) -> None:
        body = {"model": "nanogpt", "prompt": PROMPT, "max_tokens": MAX_TOKENS}
        with self.client.post("/v1/completions", json=body, headers=_headers(), name="completion",
                              catch_response=True) as response:
            if not _answered(response):
                return
            try:
                usage = response.json()["usage"]
            except (ValueError, KeyError) as e:
                response.failure(f"no usage in the body: {e!r}")
                return
            _results["completion_tokens"] += usage["completion_tokens"]
            _results["completions_completed"] += 1

    def _stream_chat(self) -> None:
        body = {"model": "nanogpt", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True,
                "stream_options": {"include_usage": True}}
        name = "chat stream, hung up" if self.hangs_up else "chat stream"
        started = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=body, headers=_headers(), name=name,
                              stream=True, catch_response=True) as response:
            if not _answered(response):
                return
            self._read_stream(response, started)

    def _read_stream(self, response, started: float) -> None:
        content_chunks = 0
        usage_tokens = None
        done = False
        try:
            for line in response.iter_lines(chunk_size=None, decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    response.failure(f"error event: {event['error']}")
                    return
                if event.get("usage"):
                    usage_tokens = event["usage"]["completion_tokens"]
                if any(choice.get("delta", {}).get("content") for choice in event.get("choices", [])):
                    content_chunks += 1
                    if content_chunks == 1:
                        _results["ttft_s"].append(time.perf_counter() - started)
                    if self.hangs_up and content_chunks == HANG_UP_AFTER_CHUNKS:
                        response.raw.close()  # the client goes away mid-stream
                        _results["hung_up"] += 1
                        _results["completion_tokens"] += content_chunks
                        response.success()
                        return
        except Exception as e:  # a broken connection or a malformed event
            response.failure(f"stream broke after {content_chunks} chunks: {e!r}")
            return
        if not done:
            response.failure(f"stream ended after {content_chunks} chunks without [DONE]")
            return
        _results["completion_tokens"] += usage_tokens if usage_tokens is not None else content_chunks
        _results["streams_completed"] += 1
        response.success()


# What a victim asks for: short, greedy and not streamed, so its latency is one number.
VICTIM_BODY = {"model": "nanogpt", "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
# A heavy user refused by design waits before it asks again, as a well-behaved client would,
# so that the rows measure the heavy request and not a flood of refusals.
LONGEST_BACK_OFF_S = 1.0


def _bearer(key_variable: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {os.environ[key_variable]}", "Content-Type": "application/json"}


def _stream_failure(response) -> str | None:
    """Why a streamed answer is not complete, or None when it ended with [DONE] and no error event."""
    try:
        for line in response.iter_lines(chunk_size=None, decode_unicode=True):
            if not line or not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return None
            # Parsing every event would cost the client more CPU than the check is worth.
            if '"error"' in data and "error" in json.loads(data):
                return f"error event: {data[:200]}"
    except Exception as e:  # a broken connection or a malformed event
        return f"stream broke: {e!r}"
    return "stream ended without [DONE]"


class Victim(HttpUser):
    """Another caller's short request, one after another, timed."""
    fixed_count = 1
    wait_time = staticmethod(lambda: 0)

    def on_start(self) -> None:
        time.sleep(float(os.environ.get("NANOGPT_VICTIM_DELAY_S", "0")))

    @task
    def short_request(self) -> None:
        started = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=VICTIM_BODY, headers=_bearer("NANOGPT_VICTIM_KEY"),
                              name="victim", catch_response=True) as response:
            elapsed = time.perf_counter() - started
            try:
                tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else None
            except (ValueError, KeyError):
                tokens = None
            if tokens is None:
                _results["victim_failed"] += 1
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            _results["victim_latency_s"].append(elapsed)
            _results["victim_tokens"].append(tokens)


class HeavyCaller(HttpUser):
    """The same heavy but valid request, over and over, from its own key."""
    wait_time = staticmethod(lambda: 0)

    def on_start(self) -> None:
        with open(os.environ["NANOGPT_HEAVY_REQUEST"]) as f:
            request = json.load(f)
        self.path, self.body = request["path"], request["body"]
        self.expected = request.get("expect_status", 200)
        self.streams = bool(self.body.get("stream"))

    @task
    def heavy_request(self) -> None:
        started = time.perf_counter()
        with self.client.post(self.path, json=self.body, headers=_bearer("NANOGPT_HEAVY_KEY"), name="heavy",
                              stream=self.streams, catch_response=True) as response:
            if response.status_code in REFUSED_BY_DESIGN:
                _results["heavy_refused"][str(response.status_code)] += 1
                response.success()
                retry_after = response.headers.get("retry-after", "")
                time.sleep(min(float(retry_after) if retry_after.isdigit() else 1.0, LONGEST_BACK_OFF_S))
                return
            if response.status_code != self.expected:
                failure = f"status {response.status_code}: {response.text[:200]}"
            elif self.expected != 200:
                failure = None
            elif self.streams:
                failure = _stream_failure(response)
            else:
                try:
                    failure = None if "choices" in response.json() else "no choices in the body"
                except ValueError as e:
                    failure = f"the body is not JSON: {e!r}"
            if failure:
                _results["heavy_failed"] += 1
                response.failure(failure)
                return
            _results["heavy_latency_s"].append(time.perf_counter() - started)
            response.success()


class HealthWatcher(HttpUser):
    """/health, a few times a second: how long the event loop takes to answer while the rest runs."""
    fixed_count = 1
    wait_time = staticmethod(lambda: HEALTH_EVERY_S)

    @task
    def health(self) -> None:
        started = time.perf_counter()
        with self.client.get("/health", name="health", catch_response=True) as response:
            if response.status_code == 200:
                _results["health_latency_s"].append(time.perf_counter() - started)
            else:
                response.failure(f"status {response.status_code}")


@events.quitting.add_listener
def _write_results(environment, **_kwargs) -> None:
    path = os.environ.get("NANOGPT_LOAD_RESULTS")
    if not path:
        return
    total = environment.stats.total
    failures = [{"name": e.name, "error": str(e.error), "occurrences": e.occurrences}
                for e in environment.stats.errors.values()]
    payload = {**_results, "requests": total.num_requests, "failed": total.num_failures,
               "failures": failures, "first_request_at": total.start_time,
               "last_request_at": total.last_request_timestamp}
    with open(path, "w") as f:
        json.dump(payload, f)

