"""Bearer API keys, checked from the headers before a request's body is read.

Every configured key is compared in constant time, match or not, so the time a check takes
says nothing about which key (or how much of one) was right.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.http_guards import refuse

# /health and the chat page stay public; /metrics too unless the operator asks otherwise.
API_PATHS = ("/v1",)
DOCS_PATHS = ("/docs", "/openapi.json")
METRICS_PATHS = ("/metrics",)


def bearer_token(scope: Scope) -> str | None:
    scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def is_cors_preflight(scope: Scope) -> bool:
    headers = Headers(scope=scope)
    return scope["method"] == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers


class APIKeyMiddleware:
    """401 for a protected path without a valid key; with no keys configured every request passes.

    CORS preflights carry no credentials by design, so they are let through (the CORS layer
    outside this one answers them).
    """

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], docs_enabled: bool = False,
                 metrics_need_key: bool = False):
        self.app = app
        self._keys = tuple(k.encode("utf-8") for k in keys)
        # Switched off, the schema pages are a plain 404 for everyone.
        self._protected = (API_PATHS + (DOCS_PATHS if docs_enabled else ())
                           + (METRICS_PATHS if metrics_need_key else ()))

    def protects(self, path: str) -> bool:
        return path.startswith(self._protected)

    def accepts(self, token: str) -> bool:
        given = token.encode("utf-8")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(key, given)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self._keys or not self.protects(scope["path"])
                or is_cors_preflight(scope)):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is None:
            message, code = "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.", None
        elif not self.accepts(token):
            message, code = "Incorrect API key provided.", "invalid_api_key"
        else:
            await self.app(scope, receive, send)
            return
        await refuse(scope, receive, send, 401, message, code=code, headers={"WWW-Authenticate": "Bearer"})
