"""Sync tier (``POST /image|video/{family}/{model}/{task}``) and async tier (``/queue``, ``/jobs``)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from kiln.api.auth import authenticate, refund_credit, services, spend_credit
from kiln.api.errors import ApiError
from kiln.api.handoff import run_sync
from kiln.api.jobs import absolute, job_json, own_job
from kiln.api.requests import build_request
from pydantic import ValidationError

from kiln.api.schemas import GenerateBody, QueueBody
from kiln.api.webhooks import checked_webhook, notify_terminal
from kiln.catalog import ModelSpec
from kiln.engine.request import GenerationRequest
from kiln.errors import CapacityExhausted, InvalidParameters
from kiln.keys import KeyRecord
from kiln.queue import JobStatus, Priority
from kiln.worker.payload import to_payload

router = APIRouter()


def _sync_openapi(media_type: str) -> dict[str, Any]:
    """The documented shape of a sync route: its handler reads the body itself (see :func:`_sync_params`)."""
    schema = GenerateBody.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # LoraSpec, Sampler, Scheduler: components already, through QueueBody
    path = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}, "description": d}
            for n, d in (("family", "model family, e.g. flux"), ("model", "model or alias, e.g. dev, latest"),
                         ("task", "t2i, i2i, edit (images); t2v, i2v (video)"))]
    return {
        "parameters": [*path, {"name": "format", "in": "query", "required": False,
                        "schema": {"type": "string", "maxLength": 32},
                        "description": "output format, e.g. 1024, portrait, 720p"}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {"200": {"description": "the output's bytes", "content": {media_type: {}}}},
    }


@router.post("/image/{family}/{model}/{task}", tags=["sync"], response_class=Response,
             openapi_extra=_sync_openapi("image/webp"))
async def sync_image(request: Request) -> Response:
    """Generate an image and answer with its bytes (WebP); 503 when no worker slot frees up in time."""
    return await _sync(request, "image", *await _sync_params(request))


@router.post("/video/{family}/{model}/{task}", tags=["sync"], response_class=Response,
             openapi_extra=_sync_openapi("video/mp4"))
async def sync_video(request: Request) -> Response:
    """Generate a video and answer with its bytes (MP4)."""
    return await _sync(request, "video", *await _sync_params(request))


async def _sync_params(request: Request) -> tuple[str, str, str, str | None, GenerateBody, KeyRecord | None]:
    """Path, ``format``, body and key of a sync request, read directly rather than through FastAPI's
    dependency solver: this is the latency-critical route (bench/overhead.py), and the solver's
    per-request work is a measurable share of it. Errors are the ones FastAPI would give."""
    key = await authenticate(request)
    fmt = request.query_params.get("format")
    if fmt is not None and len(fmt) > 32:
        raise InvalidParameters("format: String should have at most 32 characters")
    try:
        body = GenerateBody.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]) from None
    p = request.path_params
    return p["family"], p["model"], p["task"], fmt, body, key


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
                refund_credit(svc, key)
                raise
        refund_credit(svc, key)
        raise
    except BaseException:
        refund_credit(svc, key)  # nothing was made
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
            # the W3C header browsers' developer tools show: where the request's time went
            "Server-Timing": (
                f"generate;dur={stored.generate_ms:.3f}, encode;dur={stored.encode_ms:.3f}, "
                f"store;dur={stored.store_ms:.3f}"
            ),
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
    if created and charge and key is not None and key.metered and not svc.keys.spend(key.id):
        svc.broker.cancel(job.id)
        raise ApiError(402, "insufficient_credits", "this API key has no credits left")
    if created:
        svc.worker.wake()
    body = job_json(svc, job)
    return JSONResponse(body, status_code=202, headers={"Location": absolute(svc, f"/jobs/{job.id}")})


def _spec(request: Request, modality: str, family: str, model: str) -> ModelSpec:
    spec = services(request).catalog.resolve(family, model)
    if spec.modality != modality:
        raise InvalidParameters(f"{spec.key} makes {spec.modality}s; use /{spec.modality}/{family}/{model}/…")
    return spec


def _hash(body: QueueBody) -> str:
    data: dict[str, Any] = body.model_dump(exclude={"idempotency_key"}, exclude_none=True)
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
