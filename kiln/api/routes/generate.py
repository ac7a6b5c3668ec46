"""Sync tier (``POST /image|video/{family}/{model}/{task}``) and async tier (``/queue``, ``/jobs``)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from kiln.api.auth import authenticate, services, spend_credit
from kiln.api.errors import ApiError
from kiln.api.handoff import run_sync
from kiln.api.jobs import absolute, job_json, own_job
from kiln.api.requests import build_request
from kiln.api.schemas import GenerateBody, QueueBody
from kiln.api.webhooks import checked_webhook, notify_terminal
from kiln.catalog import ModelSpec
from kiln.engine.request import GenerationRequest
from kiln.errors import CapacityExhausted, InvalidParameters
from kiln.keys import KeyRecord
from kiln.queue import JobStatus, Priority
from kiln.worker.payload import to_payload

router = APIRouter()

FORMAT_QUERY = Query(default=None, max_length=32, description="output format, e.g. 1024, portrait, 720p")


@router.post("/image/{family}/{model}/{task}", tags=["sync"], responses={200: {"content": {"image/webp": {}}}})
async def sync_image(
    family: str, model: str, task: str, body: GenerateBody, request: Request,
    format: str | None = FORMAT_QUERY, key: KeyRecord | None = Depends(authenticate),
) -> Response:
    """Generate an image and answer with its bytes (WebP); 503 when no worker slot frees up in time."""
    return await _sync(request, "image", family, model, task, format, body, key)


@router.post("/video/{family}/{model}/{task}", tags=["sync"], responses={200: {"content": {"video/mp4": {}}}})
async def sync_video(
    family: str, model: str, task: str, body: GenerateBody, request: Request,
    format: str | None = FORMAT_QUERY, key: KeyRecord | None = Depends(authenticate),
) -> Response:
    """Generate a video and answer with its bytes (MP4)."""
    return await _sync(request, "video", family, model, task, format, body, key)


@router.post("/queue", status_code=202, tags=["async"])
async def submit(body: QueueBody, request: Request, key: KeyRecord | None = Depends(authenticate)) -> JSONResponse:
    """Queue a generation; 202 with the job's id, position and ETA."""
    svc = services(request)
    spec = _spec(request, body.modality, body.family, body.model)
    webhook = None
    if body.webhook is not None:
        if svc.outbox is None:
            raise InvalidParameters("webhooks are switched off on this server; poll GET /jobs/{id}")
        webhook = checked_webhook(body.webhook)
    canonical = await build_request(svc, body, spec, body.task, body.format)
    return _enqueue(request, canonical, key, priority=body.priority, idempotency_key=body.idempotency_key,
                    request_hash=_hash(body), charge=True, webhook=webhook)


@router.get("/jobs/{job_id}", tags=["async"], responses={303: {"description": "complete: redirect to the output"}})
async def get_job(job_id: str, request: Request, key: KeyRecord | None = Depends(authenticate)) -> Response:
    """A job's state; a complete job answers 303 to its output, with the JSON body as well."""
    svc = services(request)
    job = own_job(svc, job_id, key)
    body = job_json(svc, job)
    if job.status is JobStatus.COMPLETE:
        return JSONResponse(body, status_code=303, headers={"Location": body["output"]})
    return JSONResponse(body)


@router.delete("/jobs/{job_id}", tags=["async"])
async def cancel_job(job_id: str, request: Request, key: KeyRecord | None = Depends(authenticate)) -> JSONResponse:
    """Cancel a queued job, or stop a running one between steps (its status turns cancelled shortly)."""
    svc = services(request)
    before = own_job(svc, job_id, key)
    job = svc.broker.cancel(job_id)
    if job.status.terminal and not before.status.terminal:
        notify_terminal(svc, job)  # a queued job never reaches the worker, which would notify
    return JSONResponse(job_json(svc, job))


# --- helpers ---------------------------------------------------------------------------------------


async def _sync(request: Request, modality: str, family: str, model: str, task: str, fmt: str | None,
                body: GenerateBody, key: KeyRecord | None) -> Response:
    svc = services(request)
    spec = _spec(request, modality, family, model)
    canonical = await build_request(svc, body, spec, task, fmt)
    spend_credit(request, key)
    started = time.perf_counter()
    try:
        stored = await run_sync(
            svc.worker, canonical, wait_s=svc.settings.sync_wait_s, retry_after=svc.settings.retry_after_s
        )
    except CapacityExhausted:
        if "respond-async" in request.headers.get("prefer", "").lower():
            try:
                return _enqueue(request, canonical, key, priority="normal", charge=False)  # charged above
            except BaseException:
                _refund(svc, key)
                raise
        _refund(svc, key)
        raise
    except BaseException:
        _refund(svc, key)  # nothing was made
        raise
    svc.metrics.observe_sync(spec.key, time.perf_counter() - started)
    asset = stored.assets[0]
    return Response(
        stored.first_bytes,
        media_type=stored.media_type,
        headers={
            "Content-Location": absolute(svc, f"/{asset.kind}/{asset.name}"),
            "X-Generation-Time": str(stored.result.elapsed_ms),
            "X-Seed": str(stored.result.seed),
        },
    )


def _enqueue(request: Request, canonical: GenerationRequest, key: KeyRecord | None, *, priority: str,
             idempotency_key: str | None = None, request_hash: str | None = None, charge: bool,
             webhook: str | None = None) -> JSONResponse:
    """Queue the job; with ``charge``, a new job costs one credit (the same idempotent request again
    returns the existing job at no cost, even with no credit left)."""
    svc = services(request)
    payload = to_payload(canonical, svc.store)
    if webhook is not None:
        payload["webhook"] = webhook
    job, created = svc.broker.submit(
        payload,
        priority=Priority(priority),
        key_id=key.id if key else None,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        max_depth=svc.settings.queue_max_depth,
    )
    if created and charge and key is not None and not svc.keys.spend(key.id):
        svc.broker.cancel(job.id)
        raise ApiError(402, "insufficient_credits", "this API key has no credits left")
    if created:
        svc.worker.wake()
    body = job_json(svc, job)
    return JSONResponse(body, status_code=202, headers={"Location": absolute(svc, f"/jobs/{job.id}")})


def _refund(svc, key: KeyRecord | None) -> None:
    if key is not None:
        svc.keys.refund(key.id)


def _spec(request: Request, modality: str, family: str, model: str) -> ModelSpec:
    spec = services(request).catalog.resolve(family, model)
    if spec.modality != modality:
        raise InvalidParameters(f"{spec.key} makes {spec.modality}s; use /{spec.modality}/{family}/{model}/…")
    return spec


def _hash(body: QueueBody) -> str:
    data: dict[str, Any] = body.model_dump(exclude={"idempotency_key"}, exclude_none=True)
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
