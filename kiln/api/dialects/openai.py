"""The OpenAI Images door: ``POST /v1/images/generations``, ``POST /v1/images/edits``, ``GET /v1/models``.

So that the official ``openai`` package works with ``base_url`` pointed at Kiln. ``model`` is one of
OpenAI's names that the catalog's ``[dialects.openai]`` table maps to a catalog model
(``gpt-image-1``, ``dall-e-3``, ... with the default catalog), or a catalog name (``flux/mini``,
``flux/dev`` or an alias such as ``flux/fast``); left out, the catalog's default model. ``GET
/v1/models`` lists both kinds. ``size`` is ``WIDTHxHEIGHT`` (one of the model's formats, or any size
in its catalog ``sizes`` range: OpenAI's 1024x1024, 1536x1024, 1024x1536, 512x512 and 256x256 on
FLUX) or ``auto``. Kiln extension: ``seed`` (through the client's ``extra_body``), output *i* is
what seed + *i* gives. Numbers in a JSON body are JSON integers, as OpenAI's API takes them
(``"n": "2"`` and ``"n": true`` are refused); a multipart edit's fields are text, read as numbers.

Requests run on the sync tier, like the render API's sync routes. Controls Kiln does not have
(``style``, ``output_compression``, a ``quality`` or ``background`` other than the default, ...)
are refused with ``param`` naming them, never ignored. An edit's ``mask`` follows OpenAI: its fully
transparent pixels mark what is regenerated, and it is the image's size. Every error is
``{"error": {message, type, param, code}}``; a prompt the operator's filter refuses and an output
the safety classifier flags are both OpenAI's 400 ``content_policy_violation``.
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
    image_size_of,
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
from kiln.catalog.schema import DialectTarget
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

NAME = "openai"

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
    # JSON carries types: a number sent as a string or a boolean is refused, as OpenAI's API does
    model_config = ConfigDict(extra="forbid", strict=True)


class EditsForm(_Common):
    """A multipart form's fields are text: ``n`` and ``seed`` are read as numbers."""


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
    mask = await run_in_threadpool(_mask_from_alpha, masks[0], images[0]) if masks else None
    return await _generate(request, key, body, "edit" if mask else "i2i", images[0], mask)


@router.get("/v1/models")
@guarded(error_response)
async def list_models(request: Request) -> Response:
    """The catalog's image models, then OpenAI's names for them (``[dialects.openai]``)."""
    await authenticate(request)
    return JSONResponse({"object": "list", "data": [_model(name) for name in _names(services(request))]})


@router.get("/v1/models/{model_id:path}")
@guarded(error_response)
async def get_model(request: Request) -> Response:
    await authenticate(request)
    name = request.path_params["model_id"]
    spec, _ = _resolve(services(request), name)
    if not _listed(spec):
        raise UnknownModel(f"{spec.key} makes {spec.modality}s, not images")
    return JSONResponse(_model(name if "/" not in name else spec.key))


@router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
@guarded(error_response)
async def unknown(request: Request) -> Response:
    raise not_found(request)


# --- translation -----------------------------------------------------------------------------------


async def _generate(request: Request, key, body: _Common, task: str, image: bytes | None, mask: bytes | None) -> Response:
    svc = services(request)
    spec, target = _spec(svc, body.model)
    encoding = body.output_format or "png"
    canonical = await checked(svc, GenerationRequest.create(
        family=spec.family, model=spec.model, task=task, **_size(svc, spec, body.size),
        prompt=body.prompt, seed=body.seed, image=image, mask=mask, num_outputs=body.n or 1, encoding=encoding,
        steps=target.steps if target else None, guidance=target.guidance if target else None,
    ))
    stored = await run_now(request, canonical, key, label=f"{canonical.family}/{canonical.model}")
    if body.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(b).decode()} for b in await all_bytes(svc, stored)]
    else:
        data = [{"url": absolute(svc, f"/{a.kind}/{a.name}")} for a in stored.assets]
    result = stored.result
    return JSONResponse({"created": int(time.time()), "data": data, "output_format": encoding,
                         "size": f"{result.width}x{result.height}"}, headers={"X-Seed": str(result.seed)})


def _spec(svc: Services, model: str | None) -> tuple[ModelSpec, DialectTarget | None]:
    spec, target = _resolve(svc, model or svc.catalog.default_model)
    if spec.modality != "image":
        raise InvalidParameters(f"{spec.key} makes {spec.modality}s; this API makes images", details={"param": "model"})
    return spec, target


def _resolve(svc: Services, name: str) -> tuple[ModelSpec, DialectTarget | None]:
    """A catalog name (``FAMILY/MODEL``), or one of OpenAI's names through ``[dialects.openai]`` (with
    the defaults the table gives it)."""
    if "/" in name:
        return svc.catalog.resolve_key(name), None
    try:
        return svc.catalog.resolve_dialect(NAME, name)
    except UnknownModel:
        names = _names(svc)
        raise UnknownModel(f"unknown model {name[:130]!r}; this server offers: {', '.join(names)}",
                           details={"param": "model", "models": names}) from None


def _names(svc: Services) -> list[str]:
    """What ``GET /v1/models`` lists: the catalog's image models, then OpenAI's names for them."""
    catalog = svc.catalog
    own = [spec.key for spec in catalog if _listed(spec)]
    return own + [name for name, target in catalog.dialects.openai.items() if _listed(catalog.resolve_key(target.model))]


def _size(svc: Services, spec: ModelSpec, size: str | None) -> dict[str, object]:
    if size is None or size == "auto":
        return {"format": spec.formats[0]}
    width, sep, height = size.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise UnsupportedFormat(f"size is WIDTHxHEIGHT (for example 1024x1024) or auto, got {size!r}",
                                details={"param": "size"})
    return size_fields(svc, spec, int(width), int(height), "{w}x{h}")


def _mask_from_alpha(data: bytes, image: bytes | None = None) -> bytes:
    """OpenAI's mask (transparent where the image changes) as Kiln's (white where it changes); it must
    be ``image``'s size (an image that cannot be read is left to the planner, which names it)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if max(img.size) > MAX_MASK_SIDE:
                raise InvalidImage(f"mask: at most {MAX_MASK_SIDE}x{MAX_MASK_SIDE}", details={"param": "mask"})
            size = image_size_of(image) if image is not None else None
            if size is not None and img.size != size:
                raise InvalidImage(f"mask: {img.width}x{img.height}, but the image is {size[0]}x{size[1]}; "
                                   "send a mask of the image's size", details={"param": "mask"})
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


def _model(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "kiln"}
