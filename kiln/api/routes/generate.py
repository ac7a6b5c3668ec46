"""Sync tier (``POST /image|video/{family}/{model}/{task}``) and async tier (``/queue``, ``/jobs``)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from kiln.api.auth import authenticate, services
from kiln.api.jobs import absolute, job_json, own_job
from kiln.api.requests import build_request
from kiln.api.submit import queue_job, run_now
from pydantic import ValidationError

from kiln.api.schemas import GenerateBody, QueueBody
from kiln.api.webhooks import checked_webhook, notify_terminal
from kiln.catalog import ModelSpec
from kiln.errors import CapacityExhausted, InvalidParameters
from kiln.keys import KeyRecord
from kiln.queue import JobStatus, Priority

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
    job = queue_job(svc, canonical, key, priority=Priority(body.priority), idempotency_key=body.idempotency_key,
                    request_hash=_hash(body), webhook=webhook)
    return _accepted(svc, job)


@router.get("/jobs/{job_id}", tags=["async"], responses={303: {"description": "complete: redirect to the output"}})
async def get_job(job_id: str, request: Request, key: KeyRecord | None = Depends(authenticate)) -> Response:
    """A job's state; a complete job answers 303 to its output, with the JSON body as well (200 and no
    ``output`` when the safety checker withheld every output, as WaveSpeed's ``enable_safety_checker`` does)."""
    svc = services(request)
    job = own_job(svc, job_id, key)
    body = job_json(svc, job)
    if job.status is JobStatus.COMPLETE and "output" in body:
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
    try:
        stored = await run_now(request, canonical, key, label=spec.key)
    except CapacityExhausted:
        if "respond-async" in request.headers.get("prefer", "").lower():
            return _accepted(svc, queue_job(svc, canonical, key))  # refunded above, charged again here
        raise
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


def _accepted(svc, job) -> JSONResponse:
    return JSONResponse(job_json(svc, job), status_code=202, headers={"Location": absolute(svc, f"/jobs/{job.id}")})


def _spec(request: Request, modality: str, family: str, model: str) -> ModelSpec:
    spec = services(request).catalog.resolve(family, model)
    if spec.modality != modality:
        raise InvalidParameters(f"{spec.key} makes {spec.modality}s; use /{spec.modality}/{family}/{model}/…")
    return spec


def _hash(body: QueueBody) -> str:
    data: dict[str, Any] = body.model_dump(exclude={"idempotency_key"}, exclude_none=True)
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
