"""The OpenAI Images door: ``POST /v1/images/generations``, ``POST /v1/images/edits``, ``GET /v1/models``.

So that the official ``openai`` package works with ``base_url`` pointed at Kiln. ``model`` is a
catalog name (``flux/mini``, ``flux/dev`` or an alias such as ``flux/fast``; the catalog's default
model when left out); ``size`` is ``WIDTHxHEIGHT`` (one of the model's formats, or any size in its
catalog ``sizes`` range: OpenAI's 1024x1024, 1536x1024, 1024x1536, 512x512 and 256x256 on FLUX) or ``auto``.
Kiln extension: ``seed`` (through the client's ``extra_body``), output *i* is what seed + *i* gives.

Requests run on the sync tier, like the render API's sync routes. Controls Kiln does not have
(``style``, ``output_compression``, a ``quality`` or ``background`` other than the default, ...)
are refused with ``param`` naming them, never ignored. An edit's ``mask`` follows OpenAI: its fully
transparent pixels mark what is regenerated. Every error is ``{"error": {message, type, param, code}}``;
a prompt the operator's filter refuses and an output the safety classifier flags are both OpenAI's
400 ``content_policy_violation``.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from kiln.api.auth import authenticate, services
from kiln.api.dialects.common import (
    all_bytes,
    checked,
    documented_body,
    size_fields,
    guarded,
    json_body,
    not_found,
    parse,
    read_form,
)
from kiln.api.errors import ApiError, status_of
from kiln.api.jobs import absolute
from kiln.api.services import Services
from kiln.api.submit import run_now
from kiln.catalog import ModelSpec
from kiln.engine.request import (
    MAX_OUTPUTS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    GenerationRequest,
)
from kiln.errors import (
    InvalidImage,
    InvalidParameters,
    InvalidPrompt,
    KilnError,
    NsfwDetected,
    PromptFiltered,
    UnknownModel,
    UnsupportedFormat,
)

router = APIRouter(tags=["openai"])

MAX_MASK_SIDE = 4096


# --- the one error mapping -------------------------------------------------------------------------


def error_response(exc: KilnError) -> JSONResponse:
    """Kiln's error vocabulary in OpenAI's shape and statuses (the ``openai`` client raises by status)."""
    status, kind, code = status_of(exc), "invalid_request_error", exc.code
    param = exc.details.get("param") or exc.details.get("field")
    headers: dict[str, str] = {}
    if isinstance(exc, ApiError) and status == 401:
        code = "invalid_api_key"
    elif isinstance(exc, ApiError) and status == 402:  # OpenAI says so with a 429
        status, kind, code = 429, "insufficient_quota", "insufficient_quota"
    elif status == 429:
        kind = "requests"
    elif isinstance(exc, PromptFiltered | NsfwDetected):  # OpenAI answers both as a 400 content policy violation
        status, code = 400, "content_policy_violation"
    elif isinstance(exc, UnknownModel):
        param = "model"
    elif isinstance(exc, InvalidPrompt):
        param = "prompt"
    elif status >= 500:
        kind = "server_error"
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = {"error": {"message": exc.message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- bodies ----------------------------------------------------------------------------------------

class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(default=None, max_length=130)
    n: int | None = Field(default=None, ge=1, le=MAX_OUTPUTS, description=f"1-{MAX_OUTPUTS} on this server")
    size: str | None = Field(default=None, max_length=16, description="WIDTHxHEIGHT (a format of the model or within its size range), or auto")
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    user: str | None = Field(default=None, max_length=256, description="the caller's end user; not used in generation")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Kiln extension")
    # OpenAI's names whose default is all this server does; any other value is refused
    quality: Literal["auto", "standard"] | None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["auto"] | None = None
    stream: Literal[False] | None = None


class GenerationsBody(_Common):
    pass


class EditsForm(_Common):
    pass


# --- routes ----------------------------------------------------------------------------------------


@router.post("/v1/images/generations", openapi_extra=documented_body(GenerationsBody))
@guarded(error_response)
async def generations(request: Request) -> Response:
    """Text to image; ``data[i].url`` (a permanent URL) or ``data[i].b64_json``."""
    key = await authenticate(request)
    body = parse(GenerationsBody, await json_body(request))
    return await _generate(request, key, body, "t2i", None, None)


@router.post("/v1/images/edits",
             openapi_extra=documented_body(EditsForm, "multipart/form-data", files=("image", "mask")))
@guarded(error_response)
async def edits(request: Request) -> Response:
    """Image to image (no mask) or inpainting (``mask``: transparent where the image is regenerated)."""
    key = await authenticate(request)
    fields, files = await read_form(request)
    images = files.pop("image", []) + files.pop("image[]", [])
    masks = files.pop("mask", [])
    if files:
        name = next(iter(files))
        raise InvalidParameters(f"{name}: unknown file field; send image and mask", details={"param": name})
    if len(images) != 1:
        raise InvalidParameters("send exactly one image" if images else "image is required", details={"param": "image"})
    if len(masks) > 1:
        raise InvalidParameters("send at most one mask", details={"param": "mask"})
    body = parse(EditsForm, fields)
    mask = await run_in_threadpool(_mask_from_alpha, masks[0]) if masks else None
    return await _generate(request, key, body, "edit" if mask else "i2i", images[0], mask)


@router.get("/v1/models")
@guarded(error_response)
async def list_models(request: Request) -> Response:
    await authenticate(request)
    svc = services(request)
    return JSONResponse({"object": "list", "data": [_model(s) for s in svc.catalog if _listed(s)]})


@router.get("/v1/models/{model_id:path}")
@guarded(error_response)
async def get_model(request: Request) -> Response:
    await authenticate(request)
    spec = services(request).catalog.resolve_key(request.path_params["model_id"])
    if not _listed(spec):
        raise UnknownModel(f"{spec.key} makes {spec.modality}s, not images")
    return JSONResponse(_model(spec))


@router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
@guarded(error_response)
async def unknown(request: Request) -> Response:
    raise not_found(request)


# --- translation -----------------------------------------------------------------------------------


async def _generate(request: Request, key, body: _Common, task: str, image: bytes | None, mask: bytes | None) -> Response:
    svc = services(request)
    spec = _spec(svc, body.model)
    encoding = body.output_format or "png"
    canonical = await checked(svc, GenerationRequest.create(
        family=spec.family, model=spec.model, task=task, **_size(svc, spec, body.size),
        prompt=body.prompt, seed=body.seed, image=image, mask=mask, num_outputs=body.n or 1, encoding=encoding,
    ))
    stored = await run_now(request, canonical, key, label=f"{canonical.family}/{canonical.model}")
    if body.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(b).decode()} for b in await all_bytes(svc, stored)]
    else:
        data = [{"url": absolute(svc, f"/{a.kind}/{a.name}")} for a in stored.assets]
    result = stored.result
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": encoding,
                         "size": f"{result.width}x{result.height}"}, headers={"X-Seed": str(result.seed)})


def _spec(svc: Services, model: str | None) -> ModelSpec:
    spec = svc.catalog.resolve_key(model or svc.catalog.default_model)
    if spec.modality != "image":
        raise InvalidParameters(f"{spec.key} makes {spec.modality}s; this API makes images", details={"param": "model"})
    return spec


def _size(svc: Services, spec: ModelSpec, size: str | None) -> dict[str, object]:
    if size is None or size == "auto":
        return {"format": spec.formats[0]}
    width, sep, height = size.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise UnsupportedFormat(f"size is WIDTHxHEIGHT (for example 1024x1024) or auto, got {size!r}",
                                details={"param": "size"})
    return size_fields(svc, spec, int(width), int(height), "{w}x{h}")


def _mask_from_alpha(data: bytes) -> bytes:
    """OpenAI's mask (transparent where the image changes) as Kiln's (white where it changes)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if max(img.size) > MAX_MASK_SIDE:
                raise InvalidImage(f"mask: at most {MAX_MASK_SIDE}x{MAX_MASK_SIDE}", details={"param": "mask"})
            if "A" not in img.getbands() and "transparency" not in img.info:
                raise InvalidImage("mask: needs an alpha channel; its fully transparent pixels mark what to edit",
                                   details={"param": "mask"})
            alpha = img.convert("RGBA").getchannel("A")
    except InvalidImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImage("mask: not a readable PNG", details={"param": "mask"}) from exc
    out = io.BytesIO()
    alpha.point(lambda a: 255 if a == 0 else 0).save(out, "PNG")
    return out.getvalue()


def _listed(spec: ModelSpec) -> bool:
    return spec.modality == "image" and spec.status != "coming_soon"


def _model(spec: ModelSpec) -> dict:
    return {"id": spec.key, "object": "model", "created": 0, "owned_by": "kiln"}
