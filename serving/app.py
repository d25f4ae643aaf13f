"""The FastAPI application: API routes, web UI, health and metrics, auth, CORS, error shapes.

`create_app(settings)` builds an app that loads its model when it starts (in its lifespan),
so a process manager can import it in each worker; `app_from_environment()` does the same
from `NANOGPT_*` variables, for `uvicorn --factory` and gunicorn.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from importlib import resources

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, Response

from serving.auth import APIKeyCheck
from serving.deployments import ManifestWatcher, ModelRegistry, initial_model
from serving.errors import install_error_handlers
from serving.metrics import RequestMetricsMiddleware, ServerMetrics
from serving.openai_api import router as openai_router
from serving.settings import ServerSettings, settings_from_environment

log = logging.getLogger("serving")


def create_app(settings: ServerSettings) -> FastAPI:
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        served = await asyncio.to_thread(initial_model, settings, metrics)
        registry = ModelRegistry(served)
        app.state.registry = registry
        metrics.track_load(lambda: sum(e.queue_depth for e in registry.engines()),
                           lambda: sum(e.active_sequences for e in registry.engines()))
        watcher = None
        if settings.manifest is not None:
            watcher = ManifestWatcher(settings.manifest, registry, settings, metrics,
                                      on_swap=metrics.model_swaps.inc).start()
        log.info("serving %s as %r", served.checkpoint_name, served.model_id)
        try:
            yield
        finally:
            if watcher is not None:
                watcher.stop()
            registry.shutdown()

    app = FastAPI(title="nanogpt-pipeline", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(openai_router, dependencies=[Depends(APIKeyCheck(settings.api_keys))])

    @app.get("/health", include_in_schema=False)
    def health(request: Request) -> dict:
        registry: ModelRegistry = request.app.state.registry
        current = registry.current
        return {"status": "ok", "model": current.model_id, "checkpoint": current.checkpoint_name,
                "deployment_id": current.deployment_id, "auth_required": settings.requires_auth,
                "queue_depth": sum(e.queue_depth for e in registry.engines()),
                "active_sequences": sum(e.active_sequences for e in registry.engines())}

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    page = resources.files("serving").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    app.add_middleware(JSONBodyMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           # "*" answers a preflight with the headers it asked for, by name, which
                           # is what browsers need for Authorization and the OpenAI JS client's
                           # x-stainless-* headers.
                           allow_headers=["*"], allow_credentials=False, max_age=600)
    return app


class JSONBodyMiddleware:
    """Reads every /v1 request body as JSON, whatever its Content-Type says.

    `curl -d` sends form encoding unless told otherwise; OpenAI's API parses the body as
    JSON anyway, and so does this server.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def app_from_environment() -> FastAPI:
    return create_app(settings_from_environment())


class _AppFromEnvironment:
    """`serving.app:app` for process managers that take an ASGI app by name (gunicorn, uvicorn).

    The real app is built from `NANOGPT_*` variables on first use, inside the worker that
    serves it: importing this module stays free of side effects, and each forked worker
    builds (and loads its model) on its own.
    """

    def __init__(self) -> None:
        self._app: FastAPI | None = None

    async def __call__(self, scope, receive, send):
        if self._app is None:
            self._app = app_from_environment()
        await self._app(scope, receive, send)


app = _AppFromEnvironment()
