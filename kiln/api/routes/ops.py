"""Health and readiness (no auth)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kiln.api.auth import authenticate, services
from kiln.keys import KeyRecord

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """The worker is alive and the default model is loaded."""
    worker = services(request).worker
    alive, loaded = worker.alive, getattr(worker, "ready", worker.alive)
    ready = alive and loaded
    body = {"status": "ready" if ready else "not_ready", "worker": alive, "model_loaded": loaded}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, key: KeyRecord | None = Depends(authenticate)) -> Response:
    """Prometheus metrics (needs a key, like every route but health, docs and the CDN)."""
    return Response(services(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
