"""Per-caller limits on the API: requests per minute, and requests in flight at once.

A caller is an API key, or the client's address when the server has no keys (loopback,
where that means the machine as a whole). Requests per minute are counted in a moving
window by the `limits` library, in its in-process memory storage or in Redis, which all
workers of a gunicorn server (and several servers) can share. `limits` has no notion of
a request in flight, so concurrency is an in-process count: under gunicorn it holds per
worker. A shared count would need leases that expire when a worker dies mid-request,
which no maintained limiter offers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.auth import bearer_token
from serving.http_guards import refuse

log = logging.getLogger("serving")


class RateLimitStorageUnavailable(RuntimeError):
    """The configured storage does not answer; the server refuses to start with it."""


@dataclass(frozen=True)
class Refusal:
    message: str
    retry_after_s: int


class CallerLimits:
    """The limits for one server; `0` turns a limit off."""

    def __init__(self, *, requests_per_minute: int, concurrent_requests: int, storage_uri: str = "memory://",
                 namespace: str = "nanogpt"):
        self.requests_per_minute = requests_per_minute
        self.concurrent_requests = concurrent_requests
        self.storage_uri = storage_uri
        self._per_minute = RateLimitItemPerMinute(requests_per_minute, namespace=namespace)
        options = {"implementation": "redispy"} if storage_uri.startswith("redis") else {}
        self._storage = storage_from_string(f"async+{storage_uri}", **options)
        self._window = MovingWindowRateLimiter(self._storage)
        self._in_flight: Counter[str] = Counter()

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.concurrent_requests)

    async def check_storage(self) -> None:
        if self.requests_per_minute and not await self._storage.check():
            raise RateLimitStorageUnavailable(f"rate limit storage {self.storage_uri} does not answer")

    def try_enter(self, caller: str) -> Refusal | None:
        """Takes one of the caller's concurrent slots; `leave` gives it back."""
        if self.concurrent_requests and self._in_flight[caller] >= self.concurrent_requests:
            return Refusal(f"Rate limit reached for concurrent requests: limit {self.concurrent_requests}. "
                           "Please retry when one of your requests has finished.", retry_after_s=1)
        self._in_flight[caller] += 1
        return None

    def leave(self, caller: str) -> None:
        self._in_flight[caller] -= 1
        if self._in_flight[caller] <= 0:
            del self._in_flight[caller]

    async def hit(self, caller: str) -> Refusal | None:
        """Counts one request in the caller's minute, or says how long until one is free."""
        if not self.requests_per_minute:
            return None
        try:
            if await self._window.hit(self._per_minute, caller):
                return None
            stats = await self._window.get_window_stats(self._per_minute, caller)
        except Exception as e:  # noqa: BLE001 - any storage failure
            # An unreachable Redis should not take the API down with it: the limit lapses
            # (and says so in the log) until the storage answers again.
            log.warning("rate limit storage %s failed, request let through: %s", self.storage_uri, e)
            return None
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        return Refusal(f"Rate limit reached for requests per minute (RPM): limit {self.requests_per_minute}. "
                       f"Please try again in {retry_after}s.", retry_after_s=retry_after)


def caller_identity(scope: Scope, keyed: bool) -> str:
    """The API key's digest (the key itself is never stored), or the client address without keys.

    Without keys any bearer string is accepted, so it cannot name the caller: a client
    could dodge its limit by making one up for each request.
    """
    token = bearer_token(scope) if keyed else None
    if token is not None:
        return "key-" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:32]
    client = scope.get("client")
    return "addr-" + (client[0] if client else "unknown")


class CallerLimitsMiddleware:
    """429 with Retry-After, in OpenAI's shape, for a caller past one of its limits on /v1."""

    def __init__(self, app: ASGIApp, limits: CallerLimits, keyed: bool, prefix: str = "/v1/"):
        self.app = app
        self.limits = limits
        self.keyed = keyed
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limits.enabled or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        caller = caller_identity(scope, self.keyed)
        refusal = self.limits.try_enter(caller)
        if refusal is not None:
            await self._refuse(scope, receive, send, refusal)
            return
        try:
            refusal = await self.limits.hit(caller)
            if refusal is not None:
                await self._refuse(scope, receive, send, refusal)
                return
            await self.app(scope, receive, send)
        finally:
            self.limits.leave(caller)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, refusal: Refusal) -> None:
        await refuse(scope, receive, send, 429, refusal.message, type="requests", code="rate_limit_exceeded",
                     headers={"Retry-After": str(refusal.retry_after_s)})
