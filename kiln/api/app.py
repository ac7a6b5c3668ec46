"""The render API as an ASGI app: sync, async and CDN on one origin."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from kiln import __version__
from kiln.api import dialects, errors
from kiln.api.guard import BodyGuard
from kiln.api.routes import cdn, discovery, events, generate, ops, playground, uploads, ws
from kiln.api.services import Services


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class LimitsAndMetrics:
    """Adds the key's rate-limit headers to every response and counts it, as plain ASGI (no extra
    task per request, and a request that ends in an unhandled error is still counted)."""

    def __init__(self, app, *, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def wrapped_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                state = scope.get("state") or {}
                rate = state.get("rate")
                if rate is not None:
                    message = dict(message)
                    message["headers"] = list(message.get("headers", [])) + [
                        (b"x-ratelimit-limit", str(rate.limit).encode()),
                        (b"x-ratelimit-remaining", str(rate.remaining).encode()),
                        (b"x-ratelimit-reset", str(rate.reset_s).encode()),
                    ]
            await send(message)

        try:
            await self.app(scope, receive, wrapped_send)
        finally:
            route = scope.get("route")
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"  # clients choose methods
            self.metrics.observe_request(getattr(route, "path", "unmatched"), method, status,
                                         time.perf_counter() - started)


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

    for module in (generate, events, ws, discovery, uploads, cdn, ops, playground):
        app.include_router(module.router)
    dialects.install(app)  # the compatible front doors: OpenAI Images, WaveSpeed-style, Vyro-style
    app.add_middleware(LimitsAndMetrics, metrics=services.metrics)
    app.add_middleware(BodyGuard, upload_limit=services.settings.max_upload_bytes)
    return app
