"""ASGI middlewares that refuse a request from its headers, before any of its body is parsed.

Each answers in OpenAI's error shape. They are plain ASGI callables rather than Starlette's
`BaseHTTPMiddleware`, so streamed responses pass through untouched. The order they are
stacked in is set, and explained, in `serving.app.create_app`.
"""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import error_response

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str, *,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
    """Answers with an OpenAI error; closes the connection if a request body may still be on its way.

    Closing tells the server not to read (and discard) the rest of a body nobody wants,
    which for a 100 MB upload is most of the cost of refusing it.
    """
    headers = dict(headers or {})
    request_headers = Headers(scope=scope)
    if request_headers.get("content-length", "0") != "0" or "transfer-encoding" in request_headers:
        headers["Connection"] = "close"
    await error_response(status, message, type=type, code=code, headers=headers)(scope, receive, send)


# --- Host header ---------------------------------------------------------------------------


def host_name(host_header: str) -> str:
    """The name in a Host header, without port, brackets, case or trailing dot: '[::1]:8000' -> '::1'."""
    value = host_header.strip().lower()
    if value.startswith("["):
        name = value[1:value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:
        name = value.partition(":")[0]
    else:  # a bare name, or an unbracketed IPv6 address (which cannot carry a port)
        name = value
    return _canonical(name.rstrip("."))


def _canonical(name: str) -> str:
    try:
        return ipaddress.ip_address(name.strip("[]")).compressed
    except ValueError:
        return name.lower()


class HostAllowList:
    """400 unless the Host header names one of the allowed hosts.

    Patterns are exact names or IP addresses, '*.example.org' for any subdomain of
    example.org, or '*' for any host. Starlette's `TrustedHostMiddleware` is not used as it
    answers in plain text and splits '[::1]:8000' at the wrong colon.
    """

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]):
        self.app = app
        self.any_host = "*" in allowed
        self.names = {_canonical(p) for p in allowed if not p.startswith("*")}
        self.suffixes = tuple(p[1:].lower() for p in allowed if p.startswith("*."))

    def allows(self, host_header: str) -> bool:
        name = host_name(host_header)
        return self.any_host or name in self.names or (bool(name) and name.endswith(self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.allows(Headers(scope=scope).get("host", "")):
            await refuse(scope, receive, send, 400,
                         "Invalid Host header: this server does not answer to that host name. "
                         "Add it with --allowed-hosts (NANOGPT_ALLOWED_HOSTS) if it is yours.",
                         code="invalid_host")
            return
        await self.app(scope, receive, send)


# --- request bodies ------------------------------------------------------------------------


class JSONBodiesOnly:
    """415 for a POST, PUT or PATCH whose Content-Type is not application/json.

    A web page can send a text/plain or form body to any address without a CORS preflight;
    insisting on JSON makes every cross-origin call go through the preflight, and so through
    the CORS origin list.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:
            content_type = Headers(scope=scope).get("content-type", "")
            media_type = content_type.partition(";")[0].strip().lower()
            if media_type != "application/json":
                shown = f"'{content_type}'" if content_type else "no Content-Type"
                await refuse(scope, receive, send, 415,
                             f"Request bodies must be JSON, sent with 'Content-Type: application/json' "
                             f"(this request had {shown}).", code="unsupported_media_type")
                return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413 for a body over `max_bytes`, counted as it arrives, before anything parses it.

    A declared Content-Length over the limit is refused without reading a byte. Otherwise the
    body is read here, chunk by chunk, and refused as soon as the running total passes the
    limit (a chunked upload declares no length), so at most `max_bytes` of it is ever held;
    a body within the limit is handed on whole.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before finishing its request; there is no one to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def receive_body_then_events():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the disconnect, as a stream needs
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, receive_body_then_events, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await refuse(scope, receive, send, 413,
                     f"Request body too large: this server accepts at most {self.max_bytes} bytes "
                     "(--max-request-bytes).", code="request_too_large")
