"""Health and readiness (no auth)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kiln.api.auth import services

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
