"""The WaveSpeed-style door (references ``001_…`` v2 and ``002_…`` v3).

``POST /api/{v2|v3}/{owner}/{model…}`` submits a task (the model path maps to a catalog model
through the catalog's ``[dialects.wavespeed]`` table); ``GET /api/{v2|v3}/predictions/{id}/result``
returns it. Every answer is ``{code, message, data}``; ``data`` is the task (``id``, ``model``,
``outputs``, ``urls.get``, ``has_nsfw_contents``, ``status``, ``created_at``, ``error``, and
``timings.inference`` in v3 or ``executionTime`` in v2, in milliseconds).

Tasks are jobs on Kiln's one queue, charged and limited per key: by default 120 submissions a
minute and 20 unfinished tasks per key on this door (settings ``wavespeed_rate_per_min`` and
``wavespeed_max_concurrent``; with Redis, counted across every API node). ``?webhook=URL`` posts the
finished task, in the shape its result route shows, signed like every Kiln webhook.
``enable_sync_mode`` waits for the task (up to ``wavespeed_sync_wait_s``) and answers with it.

``size`` is ``WIDTH*HEIGHT`` within the version's per-side limits (v2 512-1536, v3 256-1536) and
the model's: one of its formats, or any size its catalog ``sizes`` range takes (the error lists both).

``loras[].path`` is an http(s) URL of a ``.safetensors`` file or a Hugging Face repo id
(``owner/name``, or ``owner/name/file.safetensors`` when it holds several), ``scale`` 0-4; models
whose catalog entry takes no LoRAs (schnell, Z-Image) refuse them, saying why (see
:mod:`kiln.api.loras`).

Where Kiln differs, it says so rather than pretend: ``strength`` 0 is refused (nothing would change). Steps and guidance, when left out, are the
defaults the catalog gives the model path (else the model's own).

Safety: with ``enable_safety_checker`` true, the operator's image safety classifier (setting
``safety_checker``) checks every output before it is stored; ``has_nsfw_contents[i]`` is its verdict
on output *i*, and a flagged output is withheld: never stored, its ``outputs[i]`` an empty string, so
the two arrays stay parallel (the reference defines ``has_nsfw_contents`` per output) and the task
still completes with the others. With ``enable_safety_checker`` false the classifier does not run
(the reference's "If set to true, the safety checker will be enabled") and ``has_nsfw_contents`` is
all false. Left out, it is the server's ``safety_checker_default`` (true unless the operator changed
it, as the reference's default). A server with no classifier reports false for every output. The
operator's prompt filter applies to every request either way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import re
import time
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from kiln.api.auth import count_request, identify, required_token, services
from kiln.api.dialects.common import (
    checked,
    documented_body,
    guarded,
    image_input,
    image_size_of,
    json_body,
    not_found,
    output_names,
    parse,
    size_fields,
)
from kiln.api.errors import ApiError, status_of
from kiln.api.jobs import absolute, own_job
from kiln.api.loras import resolve_loras
from kiln.api.services import Services
from kiln.api.submit import queue_job
from kiln.api.webhooks import checked_webhook
from kiln.catalog import ModelSpec
from kiln.engine.request import MAX_PROMPT_CHARS, MAX_SEED, GenerationRequest
from kiln.errors import InvalidImage, InvalidParameters, KilnError
from kiln.keys import KeyRecord
from kiln.queue import Job, JobStatus, Priority

NAME = "wavespeed"
VERSIONS = ("v2", "v3")
SIZE = re.compile(r"(\d{1,5})\*(\d{1,5})")
SYNC_POLL_S = 0.02
STATUS = {
    JobStatus.QUEUED: "created",
    JobStatus.RUNNING: "processing",
    JobStatus.COMPLETE: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "failed",
}

router = APIRouter(tags=["wavespeed"])


# --- the one error mapping -------------------------------------------------------------------------


def error_response(exc: KilnError) -> JSONResponse:
    """Kiln's errors as the envelope: ``code`` is the HTTP status, ``message`` says what to change."""
    status = status_of(exc)
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse({"code": status, "message": exc.message, "data": None}, status_code=status, headers=headers)


# --- bodies: the parameters of each version --------------------------------------------------------


class Lora(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=2048)
    scale: float = Field(ge=0.0, le=4.0, allow_inf_nan=False)


class _Submit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, max_length=30_000_000, description="URL, data URI or base64")
    mask_image: str | None = Field(default=None, max_length=30_000_000, description="white: regenerated")
    size: str = Field(default="1024*1024", max_length=16, description="WIDTH*HEIGHT")
    num_inference_steps: int | None = Field(default=None, ge=1, le=50)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=10.0, allow_inf_nan=False)
    num_images: int = Field(default=1, ge=1, le=4)
    output_format: Literal["jpeg", "png", "webp"] = "jpeg"
    enable_base64_output: bool = False
    enable_safety_checker: bool | None = Field(
        default=None, description="check outputs and withhold flagged ones (default: the server's setting, true)"
    )
    enable_sync_mode: bool = False


class SubmitV2(_Submit):
    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    strength: float = Field(default=0.6, ge=0.0, le=1.0, allow_inf_nan=False)
    loras: list[Lora] = Field(default=[], max_length=5)
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED)


class SubmitV3(_Submit):
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    strength: float = Field(default=0.8, ge=0.0, le=1.0, allow_inf_nan=False)
    loras: list[Lora] = Field(default=[], max_length=3)
    seed: int = Field(default=-1, ge=-1, le=2_147_483_647)


BODY: dict[str, type[_Submit]] = {"v2": SubmitV2, "v3": SubmitV3}
SIDES = {"v2": (512, 1536), "v3": (256, 1536)}  # per dimension


# --- per-key concurrency ---------------------------------------------------------------------------


def _take_slot(svc: Services, bucket: str | None) -> str | None:
    """A slot (its ticket) among a key's unfinished tasks on this door (``svc.task_slots``: in process,
    or in Redis shared by every API node), or 429 when all are taken; None without a key."""
    if bucket is None:
        return None

    def still_open(job_id: str) -> bool:
        job = svc.broker.get(job_id)
        return job is not None and not job.status.terminal

    limit = svc.settings.wavespeed_max_concurrent
    ticket = svc.task_slots.take(bucket, limit, still_open)
    if ticket is None:
        raise ApiError(429, "too_many_tasks", f"at most {limit} unfinished tasks per key; wait for one to finish",
                       retry_after=1)
    return ticket


# --- routes ----------------------------------------------------------------------------------------


def _result_route(version: str):
    @guarded(error_response)
    async def result(request: Request) -> Response:
        key = await _key(request, counted=False)
        svc = services(request)
        job = own_job(svc, request.path_params["task_id"], key)
        return JSONResponse(await run_in_threadpool(envelope, svc, job, version))

    result.__doc__ = f"The task's state ({version} envelope); outputs once completed."
    return result


def _submit_route(version: str):
    @guarded(error_response)
    async def submit(request: Request) -> Response:
        return await _submit(request, version)

    submit.__doc__ = f"Submit a task ({version} parameters); the answer is the task, completed with enable_sync_mode."
    return submit


def _unknown_route():
    @guarded(error_response)
    async def unknown(request: Request) -> Response:
        raise not_found(request)

    return unknown


def _param(name: str, where: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": {"type": "string"},
            "description": description}


for _v in VERSIONS:
    router.add_api_route(f"/api/{_v}/predictions/{{task_id}}/result", _result_route(_v), methods=["GET"],
                         name=f"wavespeed_{_v}_result", openapi_extra={"parameters": [_param("task_id", "path", "Task Id")]})
    router.add_api_route(f"/api/{_v}/{{model_path:path}}", _submit_route(_v), methods=["POST"],
                         name=f"wavespeed_{_v}_submit", openapi_extra={**documented_body(BODY[_v]), "parameters": [
                             _param("model_path", "path", "owner/model, e.g. kiln/flux-mini (the catalog maps it)"),
                             _param("webhook", "query", "POSTed the finished task"),
                         ]})
    router.add_api_route(f"/api/{_v}/{{rest:path}}", _unknown_route(), methods=["GET", "PUT", "PATCH", "DELETE"],
                         include_in_schema=False)


async def _key(request: Request, *, counted: bool) -> KeyRecord | None:
    """The caller's key; a submission counts against this door's per-key rate."""
    svc = services(request)
    if not svc.settings.auth:
        return None
    key = identify(svc, required_token(request))
    if counted:
        count_request(svc, f"{NAME}:{key.id}", svc.settings.wavespeed_rate_per_min, request)
    return key


async def _submit(request: Request, version: str) -> Response:
    svc = services(request)
    key = await _key(request, counted=True)
    path = request.path_params["model_path"]
    spec, target = svc.catalog.resolve_dialect(NAME, path)
    webhook = request.query_params.get("webhook")
    if webhook is not None:
        if svc.outbox is None:
            raise InvalidParameters("webhooks are switched off on this server; query the result", details={"param": "webhook"})
        webhook = checked_webhook(webhook)
    body = parse(BODY[version], await json_body(request))
    image = await _image(svc, body.image, "image")
    mask = await _image(svc, body.mask_image, "mask_image")
    if mask is not None and image is None:
        raise InvalidParameters("mask_image needs an image to edit", details={"param": "mask_image"})
    if image is not None and body.strength == 0:
        raise InvalidParameters("strength 0 would leave the image unchanged; send more than 0", details={"param": "strength"})
    _check_mask_size(image, mask)
    _check_steps_and_guidance(spec, path, body)
    try:
        canonical = await checked(svc, GenerationRequest.create(
            family=spec.family, model=spec.model, task="edit" if mask else "i2i" if image else "t2i",
            **_size(svc, spec, body.size, version), prompt=body.prompt,
            steps=body.num_inference_steps if body.num_inference_steps is not None else target.steps,
            guidance=body.guidance_scale if body.guidance_scale is not None else target.guidance,
            seed=None if body.seed == -1 else body.seed, strength=body.strength if image else None,
            image=image, mask=mask, num_outputs=body.num_images, encoding=body.output_format,
            safety_check="withhold" if _safety_on(svc, body) else "off",
        ))
    except InvalidImage as exc:
        raise _named_here(exc) from exc
    if body.loras:
        # every other check passed first, so nothing is downloaded for a task that would fail anyway
        _check_takes_loras(svc, spec, path)
        refs = await resolve_loras(svc, [(lora.path, lora.scale) for lora in body.loras], field="loras", repo_ids=True)
        canonical = canonical.model_copy(update={"loras": refs})
    bucket = None if key is None else f"{NAME}:{key.id}"
    ticket = _take_slot(svc, bucket)
    dialect = {"name": NAME, "version": version, "model": path, "base64": body.enable_base64_output}
    # a sync-mode caller waits on the connection: it goes ahead of jobs nobody is waiting on
    priority = Priority.HIGH if body.enable_sync_mode else Priority.NORMAL
    try:
        job = queue_job(svc, canonical, key, priority=priority, webhook=webhook, extra={"dialect": dialect})
    except BaseException:
        if bucket is not None and ticket is not None:
            svc.task_slots.give_back(bucket, ticket)  # nothing was queued
        raise
    if bucket is not None and ticket is not None:
        svc.task_slots.fill(bucket, ticket, job.id)
    if body.enable_sync_mode:
        job = await _wait(request, svc, job)
    return JSONResponse(await run_in_threadpool(envelope, svc, job, version))


async def _wait(request: Request, svc: Services, job: Job) -> Job:
    """The job once finished, or as it is when the sync wait runs out (the caller queries the result)."""
    deadline = time.monotonic() + svc.settings.wavespeed_sync_wait_s
    while not job.status.terminal and time.monotonic() < deadline and not await request.is_disconnected():
        await asyncio.sleep(SYNC_POLL_S)
        job = svc.broker.get(job.id) or job
    return job


async def _image(svc: Services, value: str | None, field: str) -> bytes | None:
    """An input image: URL, data URI or upload URL as everywhere in Kiln, or bare base64 as this API allows."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.startswith(("http://", "https://", "data:", "/")):
        return await image_input(svc, text, field)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage(f"{field}: not a URL, a data URI or base64 image data", details={"param": field}) from None
    if len(data) > svc.settings.max_upload_bytes:
        raise InvalidImage(f"{field}: larger than {svc.settings.max_upload_bytes // 2**20} MB", details={"param": field})
    return data


# --- the catalog's rules in this API's names ---------------------------------------------------------
# The planner checks them all again (in the render API's names: steps, guidance, mask); the door
# checks the ones it names differently first, so that its client reads the parameter it sent.


def _check_steps_and_guidance(spec: ModelSpec, path: str, body: _Submit) -> None:
    steps, rng = body.num_inference_steps, spec.steps
    if steps is not None and rng.fixed and steps != rng.min:
        raise InvalidParameters(f"num_inference_steps is fixed at {rng.min} for {path}; leave it out or send {rng.min}",
                                details={"param": "num_inference_steps", "min": rng.min, "max": rng.max})
    if steps is not None and not rng.min <= steps <= rng.max:
        raise InvalidParameters(f"num_inference_steps must be between {rng.min} and {rng.max} for {path}, got {steps}",
                                details={"param": "num_inference_steps", "min": rng.min, "max": rng.max})
    scale, g = body.guidance_scale, spec.guidance
    if scale is None or g.mode == "ignored":  # a model without guidance runs as it always does
        return
    if g.mode == "fixed" and not math.isclose(scale, g.value, abs_tol=1e-6):
        raise InvalidParameters(f"guidance_scale is fixed at {g.value} for {path}; leave it out or send {g.value}",
                                details={"param": "guidance_scale"})
    if g.mode == "range" and not g.min <= scale <= g.max:  # type: ignore[operator]
        raise InvalidParameters(f"guidance_scale must be between {g.min} and {g.max} for {path}, got {scale}",
                                details={"param": "guidance_scale", "min": g.min, "max": g.max})


def _check_mask_size(image: bytes | None, mask: bytes | None) -> None:
    if image is None or mask is None:
        return
    image_size, mask_size = image_size_of(image), image_size_of(mask)
    if image_size is not None and mask_size is not None and image_size != mask_size:
        raise InvalidImage(f"mask_image is {mask_size[0]}*{mask_size[1]} but image is {image_size[0]}*{image_size[1]}; "
                           "they must be the same size", details={"param": "mask_image"})


def _named_here(exc: InvalidImage) -> InvalidImage:
    """An input the planner could not read, named as this API names it (``mask`` is ``mask_image``)."""
    if exc.details.get("field") != "mask":
        return exc
    message = exc.message.replace("the mask", "mask_image", 1)
    return InvalidImage(message, details={**exc.details, "field": "mask_image", "param": "mask_image"})


def _check_takes_loras(svc: Services, spec: ModelSpec, path: str) -> None:
    """Refuse LoRAs for a path whose model takes none, saying why and which paths here take them."""
    if spec.lora:
        return
    takers = [p for p, t in svc.catalog.dialects.wavespeed.items()
              if (m := svc.catalog.resolve_key(t.model)).lora and m.status != "coming_soon"]
    why = spec.lora_refusal or "its catalog entry says it takes none"
    raise InvalidParameters(
        f"{path} runs {spec.key} on this server, which takes no LoRAs: {why}. "
        f"Send loras to {', '.join(takers) or 'no model on this server'} instead",
        details={"param": "loras", "paths": takers},
    )


def _safety_on(svc: Services, body: _Submit) -> bool:
    on = body.enable_safety_checker
    return svc.settings.safety_checker_default if on is None else on


def _size(svc: Services, spec, size: str, version: str) -> dict[str, object]:
    match = SIZE.fullmatch(size.strip())
    if match is None:
        raise InvalidParameters(f"size is WIDTH*HEIGHT, for example 1024*1024; got {size!r}", details={"param": "size"})
    width, height = int(match[1]), int(match[2])
    low, high = SIDES[version]
    if not (low <= width <= high and low <= height <= high):
        raise InvalidParameters(f"size: each side is {low} to {high} in {version}; got {width}*{height}",
                                details={"param": "size"})
    return size_fields(svc, spec, width, height, "{w}*{h}")


# --- the task, as both versions show it ------------------------------------------------------------


def envelope(svc: Services, job: Job, version: str) -> dict[str, Any]:
    """``{code, message, data}`` for a job; blocking when outputs are base64 (they are read back)."""
    return {"code": 200, "message": "success", "data": task(svc, job, version)}


def task(svc: Services, job: Job, version: str) -> dict[str, Any]:
    dialect = job.payload.get("dialect") or {}
    request = job.payload.get("request", {})
    outputs: list[str] = []
    nsfw: list[bool] = []
    if job.status is JobStatus.COMPLETE:
        names = output_names(job)
        if dialect.get("base64"):
            stored = [base64.b64encode(svc.store.read(kind, name)).decode() for kind, name in names]  # type: ignore[arg-type]
        else:
            stored = [absolute(svc, f"/{kind}/{name}") for kind, name in names]
        # one verdict per generated output; the stored ones are the unflagged, in order
        nsfw = (job.result or {}).get("nsfw") or [False] * len(stored)
        kept = iter(stored)
        outputs = ["" if flagged else next(kept, "") for flagged in nsfw]
    error = ""
    if job.status is JobStatus.FAILED:
        error = job.error_message or job.error_code or "the task failed"
    elif job.status is JobStatus.CANCELLED:
        error = "the task was cancelled"
    elapsed = int((job.result or {}).get("duration_ms") or 0)
    data: dict[str, Any] = {
        "id": job.id,
        "model": dialect.get("model") or f"{request.get('family')}/{request.get('model')}",
        "outputs": outputs,
        "urls": {"get": absolute(svc, f"/api/{version}/predictions/{job.id}/result")},
        "has_nsfw_contents": nsfw,
        "status": STATUS[job.status],
        "created_at": _iso_ms(job.created),
        "error": error,
    }
    if version == "v3":
        data["timings"] = {"inference": elapsed}
    else:
        data["executionTime"] = elapsed
    return data


def _iso_ms(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
