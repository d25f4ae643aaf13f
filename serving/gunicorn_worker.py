"""The gunicorn worker: uvicorn's, plus a drain deadline taken from gunicorn's graceful timeout.

Gunicorn stops a worker with SIGTERM (on shutdown, and for each old worker on SIGHUP) and
kills it `graceful_timeout` seconds later. The stock uvicorn worker does not pass that
timeout on, so uvicorn waits for open streams without limit and the kill cuts them mid-event.
This worker starts a drain when uvicorn begins its shutdown, ends the responses still running
a little before gunicorn's limit (see `serving.drain`), and gives uvicorn a hard limit just
after that.

It also runs the app's lifespan in uvicorn's "on" mode, so that any failure while the app
starts is fatal to the worker (in the default "auto" mode, one raised before the app's own
lifespan begins is taken to mean the app has no lifespan, and the worker serves on), believes
X-Forwarded-For only from the proxies named in gunicorn's `forwarded_allow_ips`, and names
the worker's process id in an `x-worker-pid` header on every answer, so that operators and
tests can tell which worker answered.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from gunicorn.arbiter import Arbiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn_worker import UvicornWorker

from serving.drain import ACCEPTED_REQUESTS_READ_S, Drain, DrainingServer, DrainMiddleware, shutdown_deadlines

WORKER_PID_HEADER = "x-worker-pid"


class DrainingUvicornWorker(UvicornWorker):
    CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "lifespan": "on"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        drain_s, hard_s = shutdown_deadlines(self.cfg.graceful_timeout)
        self.drain = Drain(drain_s)
        # uvicorn counts its limit from after the pause in DrainingServer.shutdown.
        self.config.timeout_graceful_shutdown = max(0.0, hard_s - ACCEPTED_REQUESTS_READ_S)
        # uvicorn's proxy middleware stays out unless proxies are named (gunicorn_config.py
        # names none by default), so that X-Forwarded-For cannot pick the client's address.
        self.config.proxy_headers = bool(self.cfg.forwarded_allow_ips)

    async def _serve(self) -> None:
        # The stock worker's _serve, with a server that starts the drain and the app wrapped.
        self.config.app = WorkerPidHeader(DrainMiddleware(self.wsgi, self.drain))
        server = DrainingServer(self.config, self.drain)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


class WorkerPidHeader:

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pid = str(os.getpid()).encode()

        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (WORKER_PID_HEADER.encode(), pid)]}
            await send(message)

        await self.app(scope, receive, send_with_pid)
