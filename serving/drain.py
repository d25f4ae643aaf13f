"""Ending the responses still running when a stopping worker's time is up.

A process manager gives a stopping worker a fixed time (gunicorn's `graceful_timeout`) and
then kills it. A stream still running at that moment would be cut mid-event, and its client
could not tell a truncated answer from a finished one. `DrainMiddleware` ends every response
still running when the drain deadline passes, in a way the client can read: a stream gets a
final OpenAI error event and `data: [DONE]`; a request whose answer has not started gets a
503 it may retry.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.responses import JSONResponse
from uvicorn.server import Server
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Not serving.errors: gunicorn imports the worker class, and with it this module, in its
# master process, which should not import torch (serving.errors does, via the engine).
from serving.schemas import ErrorDetail, ErrorResponse

log = logging.getLogger("serving")

SHUTTING_DOWN_CODE = "server_shutting_down"
_CUT_SHORT_MESSAGE = "The server is restarting and ended this response early; please retry the request."
ACCEPTED_REQUESTS_READ_S = 0.5


def shutdown_deadlines(graceful_timeout_s: float) -> tuple[float, float]:
    """(drain, hard) deadlines in seconds after a worker is told to stop.

    At the drain deadline running responses are ended with a final event; the hard one is
    the server's own last resort (it cancels whatever is left). Both come early enough that
    the worker has exited, model unloaded, before the process manager would kill it.
    """
    if graceful_timeout_s <= 0:
        raise ValueError(f"graceful timeout must be positive, got {graceful_timeout_s}")
    # What is left after the drain deadline: the final events written, the lifespan's shutdown,
    # the interpreter's exit. From the deadline to the process gone took 1.3 s on a 2-vCPU EPYC
    # (Zen 3) running the test suite beside it, so short timeouts keep at least 1.5 s of it.
    margin = min(5.0, max(1.5, 0.2 * graceful_timeout_s))
    return max(0.0, graceful_timeout_s - margin), max(0.0, graceful_timeout_s - margin / 2)


class Drain:
    """The countdown of a stopping server: started once, by `begin()`, it expires `grace_s` later."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self._expiry: asyncio.Future | None = None
        self._started = False

    def begin(self) -> None:
        """Start the countdown; call it on the server's event loop when shutdown starts."""
        if self._started:
            return
        self._started = True
        expiry = self.expiry()
        asyncio.get_running_loop().call_later(self.grace_s, lambda: expiry.done() or expiry.set_result(None))
        log.info("draining: running responses end within %.1f s", self.grace_s)

    @property
    def expired(self) -> bool:
        return self._expiry is not None and self._expiry.done()

    def expiry(self) -> asyncio.Future:
        """A future that completes when the drain expires (never, unless `begin()` is called)."""
        # Made on first use, on the loop that serves: a worker's Drain is built before the fork.
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().create_future()
        return self._expiry


class DrainMiddleware:
    """Runs each HTTP request until it ends or the drain expires, whichever comes first."""

    def __init__(self, app: ASGIApp, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.expired:
            await _shutting_down(scope, receive, send)
            return
        response = _ResponseProgress(send)
        handler = asyncio.ensure_future(self.app(scope, receive, response.send))
        try:
            await asyncio.wait({handler, self.drain.expiry()}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            handler.cancel()
            raise
        if handler.done():
            return handler.result()
        handler.cancel()
        try:
            await handler
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("a response cut short by the drain failed while stopping")
        log.warning("ended %s %s at the drain deadline, before it was complete", scope["method"], scope["path"])
        await response.end_for_shutdown(scope, receive)


class _ResponseProgress:
    """Watches what the app has sent, so the drain knows how to end the response."""

    def __init__(self, send: Send):
        self._send = send
        self.started = False
        self.event_stream = False
        self.complete = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            content_type = dict(message.get("headers", ())).get(b"content-type", b"")
            self.event_stream = content_type.startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)

    async def end_for_shutdown(self, scope: Scope, receive: Receive) -> None:
        if self.complete:
            return
        if not self.started:
            await _shutting_down(scope, receive, self._send)
        elif self.event_stream:
            await self._send({"type": "http.response.body", "body": _final_events(), "more_body": False})
        # Any other half-sent body is left unfinished: the server then drops the connection,
        # which the client sees as an error rather than as a complete but truncated answer.


def _shutdown_error(message: str) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=message, type="server_error", code=SHUTTING_DOWN_CODE))


def _final_events() -> bytes:
    return f"data: {_shutdown_error(_CUT_SHORT_MESSAGE).model_dump_json()}\n\ndata: [DONE]\n\n".encode()


async def _shutting_down(scope: Scope, receive: Receive, send: Send) -> None:
    body = _shutdown_error("The server is restarting; please retry the request.").model_dump()
    await JSONResponse(body, status_code=503, headers={"Retry-After": "1"})(scope, receive, send)


class DrainingServer(Server):
    """A uvicorn server that starts the drain's countdown when its shutdown begins."""

    def __init__(self, config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets=None) -> None:
        self.drain.begin()
        # uvicorn closes every connection with no request in progress, meant for idle kept-alive
        # ones. A connection accepted a moment ago whose request is still unread in its socket
        # buffer looks the same, and closing it would reset the client: so stop accepting
        # first, and give such requests time to be read before uvicorn looks.
        for server in self.servers:
            server.close()
        await asyncio.sleep(ACCEPTED_REQUESTS_READ_S)
        await super().shutdown(sockets=sockets)
