"""The FastAPI application: API routes, web UI, health and metrics, and the guards in front of them.

`create_app(settings)` builds an app that loads its model when it starts (in its lifespan),
so a process manager can import it in each worker; `app_from_environment()` does the same
from `NANOGPT_*` variables, for `uvicorn --factory` and gunicorn.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from importlib import resources

import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, Response

from serving.auth import APIKeyMiddleware
from serving.deployments import ManifestWatcher, ModelRegistry, initial_model
from serving.errors import ASCIIJSONResponse, install_error_handlers
from serving.metrics import RequestMetricsMiddleware, ServerMetrics
from serving.http_guards import BodySizeLimit, HostAllowList, JSONBodiesOnly
from serving.openai_api import router as openai_router
from serving.rate_limits import CallerLimits, CallerLimitsMiddleware
from serving.settings import ServerSettings, settings_from_environment

log = logging.getLogger("serving")


def create_app(settings: ServerSettings) -> FastAPI:
    metrics = ServerMetrics()
    caller_limits = CallerLimits(requests_per_minute=settings.key_requests_per_minute,
                                 concurrent_requests=settings.key_concurrent_requests,
                                 storage_uri=settings.rate_limit_storage, namespace=settings.rate_limit_namespace)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await caller_limits.check_storage()  # a wrong Redis address fails the start, not every request
        if settings.threads:
            torch.set_num_threads(settings.threads)
        served = await asyncio.to_thread(initial_model, settings, metrics)
        # What exists now (torch, the tokenizer's tables, the model) lives as long as the process:
        # kept out of the collector's full passes, which otherwise took 140-270 ms on a 2-core
        # machine whenever a request body of many small JSON objects set one off.
        gc.freeze()
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

    app = FastAPI(title="nanogpt-pipeline", version="1", lifespan=lifespan, redoc_url=None,
                  default_response_class=ASCIIJSONResponse,
                  docs_url="/docs" if settings.enable_docs else None,
                  openapi_url="/openapi.json" if settings.enable_docs else None)
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(openai_router)

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

    # Middlewares, innermost first (each add_middleware wraps the ones before it). A request
    # meets them in the reverse order:
    #   1. Host allow-list: a DNS-rebound page is refused before anything else answers it.
    #   2. CORS: answers preflights, and puts its headers on every answer below, refusals
    #      included, so a browser client can read why it was refused.
    #   3. Metrics: counts /v1 answers by status, refusals included.
    #   4. API key: 401 from the headers alone, before the body is read.
    #   5. JSON only: 415 for any other body type.
    #   6. Per-caller limits: 429 before the caller's body is read, so a slow upload holds one
    #      of the caller's own concurrent slots rather than the server's memory.
    #   7. Body size: 413, counting the body as it arrives; only then does FastAPI parse it.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(CallerLimitsMiddleware, limits=caller_limits, keyed=settings.requires_auth)
    app.add_middleware(JSONBodiesOnly)
    app.add_middleware(APIKeyMiddleware, keys=settings.api_keys, docs_enabled=settings.enable_docs,
                       metrics_need_key=settings.metrics_need_key)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           # "*" answers a preflight with the headers it asked for, by name, which
                           # is what browsers need for Authorization and the OpenAI JS client's
                           # x-stainless-* headers.
                           allow_headers=["*"], allow_credentials=False, max_age=600)
    app.add_middleware(HostAllowList, allowed=settings.host_patterns)
    return app


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
