"""The render API as an ASGI app: sync, async and CDN on one origin."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from kiln import __version__
from kiln.api import errors
from kiln.api.auth import rate_headers
from kiln.api.guard import BodyGuard
from kiln.api.routes import cdn, discovery, events, generate, ops, uploads, ws
from kiln.api.services import Services


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def create_app(services: Services, *, on_start: Callable[[], None] | None = None,
               on_stop: Callable[[], None] | None = None) -> FastAPI:
    """Build the app around ``services``; ``on_start``/``on_stop`` run in its lifespan (the worker)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if on_start:
            on_start()
        try:
            yield
        finally:
            if on_stop:
                on_stop()

    app = FastAPI(
        title="Kiln render API",
        version=__version__,
        description="Images and video from diffusion models: sync bytes, an async queue, permanent URLs.",
        lifespan=lifespan,
    )
    app.state.services = services
    errors.install(app)

    @app.middleware("http")
    async def _limits_and_metrics(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        response.headers.update(rate_headers(request))
        route = request.scope.get("route")
        method = request.method if request.method in KNOWN_METHODS else "other"  # clients choose methods
        services.metrics.observe_request(
            getattr(route, "path", "unmatched"), method, response.status_code, time.perf_counter() - started
        )
        return response

    for module in (generate, events, ws, discovery, uploads, cdn, ops):
        app.include_router(module.router)
    app.add_middleware(BodyGuard, upload_limit=services.settings.max_upload_bytes)
    return app
