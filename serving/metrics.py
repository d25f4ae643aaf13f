"""Prometheus metrics: requests, tokens, time to first token, queue depth, running samples.

Each app has its own collector registry, so several apps in one process (tests) do not
collide. Under gunicorn every worker answers /metrics for itself; see docs/DEPLOYMENT.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:

    def __init__(self) -> None:
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
        self.queue_depth = Gauge("nanogpt_queue_depth", "Requests waiting for a decode slot", registry=r)
        self.active_sequences = Gauge("nanogpt_active_sequences", "Samples being decoded", registry=r)
        self.model_swaps = Counter("nanogpt_model_swaps", "Deployments installed after start-up", registry=r)

    # the engine's hooks
    def observe_time_to_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def add_completion_tokens(self, n: int) -> None:
        self.completion_tokens.inc(n)

    def track_load(self, queue_depth: Callable[[], float], active_sequences: Callable[[], float]) -> None:
        """Read the gauges from the engines at scrape time, whichever engines are running then."""
        self.queue_depth.set_function(queue_depth)
        self.active_sequences.set_function(active_sequences)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


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
