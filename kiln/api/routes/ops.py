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
    """The worker is alive and can take requests."""
    alive = services(request).worker.alive
    return JSONResponse({"status": "ready" if alive else "not_ready", "worker": alive}, status_code=200 if alive else 503)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, key: KeyRecord | None = Depends(authenticate)) -> Response:
    """Prometheus metrics (needs a key, like every route but health, docs and the CDN)."""
    return Response(services(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
