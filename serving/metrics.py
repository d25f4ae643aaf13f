"""Prometheus metrics: requests, tokens, time to first token, queue depth, running samples.

In one process each app has its own collector registry, so several apps in one process
(tests) do not collide. Under gunicorn (PROMETHEUS_MULTIPROC_DIR set, see gunicorn_config.py)
every worker writes its values to files in that folder, and whichever worker answers
/metrics reports the sum over all of them: counters and histograms of every worker that ever
ran, gauges of the workers alive now.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# How stale another worker's queue depth may be in a scrape; the answering worker's is exact.
LOAD_REFRESH_S = 1.0


def multiprocess_dir() -> str | None:
    """The folder the workers share their values through, when the server runs as several processes."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServerMetrics:

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        self._load: tuple[Callable[[], float], Callable[[], float]] | None = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nanogpt_requests", "API requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("nanogpt_prompt_tokens", "Prompt tokens accepted for generation", registry=r)
        self.completion_tokens = Counter("nanogpt_completion_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram("nanogpt_time_to_first_token_seconds",
                                             "From a request entering the queue to its first token",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.request_duration = Histogram("nanogpt_request_duration_seconds", "API request duration",
                                          ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        # Set from the engines rather than read at scrape time (set_function): a scrape under
        # gunicorn reads every worker's files, not the other workers' engines.
        self.queue_depth = Gauge("nanogpt_queue_depth", "Samples waiting for a decode slot (not started, or preempted)",
                                 multiprocess_mode="livesum", registry=r)
        self.active_sequences = Gauge("nanogpt_active_sequences", "Samples being decoded",
                                      multiprocess_mode="livesum", registry=r)
        self.model_swaps = Counter("nanogpt_model_swaps", "Deployments installed after start-up", registry=r)
        self.preemptions = Counter("nanogpt_preemptions", "Samples preempted to hand a slot to another caller",
                                   registry=r)

    # the engine's hooks
    def observe_time_to_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def add_completion_tokens(self, n: int) -> None:
        self.completion_tokens.inc(n)

    def count_preemption(self) -> None:
        self.preemptions.inc()

    def track_load(self, queue_depth: Callable[[], float], active_sequences: Callable[[], float]) -> None:
        """Report these as the load gauges, whichever engines they count at the time.

        They are read at every scrape; with several workers also every LOAD_REFRESH_S
        seconds, so that a scrape answered by one worker sees the others' load too.
        """
        self._load = (queue_depth, active_sequences)
        if self.multiprocess:
            threading.Thread(target=_refresh_load_periodically, args=(weakref.ref(self),),
                             name="metrics-load", daemon=True).start()

    def refresh_load(self) -> None:
        if self._load is not None:
            queue_depth, active_sequences = self._load
            self.queue_depth.set(queue_depth())
            self.active_sequences.set(active_sequences())

    def exposition(self) -> tuple[bytes, str]:
        self.refresh_load()
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker)
        return generate_latest(every_worker), CONTENT_TYPE_LATEST


def _refresh_load_periodically(metrics_ref: weakref.ref[ServerMetrics]) -> None:
    # Holds the metrics only weakly, so the thread ends when its app is gone.
    while (metrics := metrics_ref()) is not None:
        metrics.refresh_load()
        del metrics
        time.sleep(LOAD_REFRESH_S)


class RequestMetricsMiddleware:
    """Counts API requests by endpoint and status; a plain ASGI wrapper so streams stay streams."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, prefix: str = "/v1/"):
        self.app = app
        self.metrics = metrics
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        endpoint = _endpoint_label(scope["path"])
        status = {"code": 500}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        started = time.monotonic()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.monotonic() - started)


def _endpoint_label(path: str) -> str:
    # /v1/models/<id> would give one label per model name; keep the label set small.
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path in ("/v1/chat/completions", "/v1/completions", "/v1/models"):
        return path
    return "other"
