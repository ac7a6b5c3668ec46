"""The Vyro-style door (reference ``003_…``): ``POST /v2/image/generations``, image bytes back.

The body is ``multipart/form-data`` with ``prompt`` and ``style`` (required), ``aspect_ratio``
(default ``1:1``) and ``seed``. A style names a catalog model through the catalog's
``[dialects.vyro]`` table; an aspect ratio picks the first of that model's formats with that shape
(``1:1``, ``16:9``, ``9:16``, ``4:3``, ``3:4`` with the default catalog), and any other ratio up to
4:1 (``3:2``, ``2:3``, ``21:9``, ``5:4``, ...) a pixel size of that shape and about the model's first
format's area, where the model's catalog ``sizes`` take it. The answer is the PNG; it runs on the
sync tier, like the render API's sync routes.

Errors are ``{"status": "error", "code": <number>, "error": <name>, "message": <what to change>}``,
with the reference's codes for the conditions they name (:data:`CODES`, mapped in one place). The
reference's codes for conditions Kiln does not have (captchas 1003-1004, application, device and
account checks 1005-1007) are never sent. 1201 is Redis out of reach
(:class:`~kiln.errors.RedisUnavailable`): a server started with ``--redis`` keeps its queue, keys,
rate limits and sync hand-off there; without Redis it never happens. The reference has no code for
content policy: a prompt the operator's filter refuses and an output the safety classifier flags
(``nsfw_detected``) are 1100, an invalid request, with the message saying which.
"""

from __future__ import annotations

import re
import sqlite3
from math import gcd

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from kiln.api.auth import authenticate, bearer_token, services
from kiln.api.dialects.common import (
    checked,
    documented_body,
    guarded,
    not_found,
    parse,
    read_form,
)
from kiln.api.errors import ApiError
from kiln.api.jobs import absolute
from kiln.api.services import Services
from kiln.api.submit import run_now
from kiln.catalog import ModelSpec
from kiln.engine.request import MAX_PROMPT_CHARS, MAX_SEED, GenerationRequest
from kiln.errors import (
    CapacityExhausted,
    GenerationError,
    InvalidParameters,
    KilnError,
    ModelUnavailable,
    QueueFull,
    RedisUnavailable,
    UnavailableError,
    UserError,
)

NAME = "vyro"

router = APIRouter(tags=["vyro"])

# code -> (HTTP status, error name), as the reference lists them
CODES: dict[int, tuple[int, str]] = {
    1000: (400, "BadRequest"),  # the bearer token is missing
    1001: (401, "Unauthorized"),  # the bearer token is invalid
    1002: (406, "NotAcceptable"),  # the bearer token has expired
    1100: (400, "BadRequest"),  # the request is invalid
    1101: (402, "PaymentRequired"),  # not enough credits
    1200: (503, "ServiceUnavailable"),  # the service (model) is not available
    1201: (503, "ServiceUnavailable"),  # Redis (queue, keys, limits) cannot be reached
    1202: (429, "TooManyRequests"),
    1204: (504, "GatewayTimeout"),  # the request waited too long to start
    1205: (500, "InternalServiceError"),  # the generation failed
    1203: (503, "ServiceUnavailable"),  # the database (keys, jobs) could not be used
    1206: (503, "NotImplemented"),  # the style's model is announced, not served yet
    1300: (500, "InternalServerError"),
}


class MissingToken(ApiError):
    def __init__(self) -> None:
        super().__init__(401, "invalid_token", "the bearer token is missing: send Authorization: Bearer <key>")


# --- the one error mapping -------------------------------------------------------------------------


def code_of(exc: KilnError) -> int:
    if isinstance(exc, MissingToken):
        return 1000
    if isinstance(exc, ApiError):
        return {"invalid_token": 1001, "token_expired": 1002, "insufficient_credits": 1101,
                "rate_limit_exceeded": 1202}.get(exc.code, 1100 if exc.status < 500 else 1300)
    if isinstance(exc, QueueFull):
        return 1202
    if isinstance(exc, CapacityExhausted):
        return 1204
    if isinstance(exc, ModelUnavailable):
        return 1206
    if isinstance(exc, RedisUnavailable):
        return 1201
    if isinstance(exc, UnavailableError):
        return 1200
    if isinstance(exc, UserError):
        return 1100
    if isinstance(exc, GenerationError):
        return 1205
    if isinstance(exc.__cause__, sqlite3.Error):
        return 1203
    return 1300


def error_response(exc: KilnError) -> JSONResponse:
    code = code_of(exc)
    status, name = CODES[code]
    if isinstance(exc, ApiError) and exc.status in (404, 413):  # no such route, body too large
        status = exc.status
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = {"status": "error", "code": code, "error": name, "message": exc.message}
    return JSONResponse(body, status_code=status, headers=headers)


# --- the form ------------------------------------------------------------------------------------


class GenerationsForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    style: str = Field(min_length=1, max_length=128)
    aspect_ratio: str = Field(default="1:1", max_length=16)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


@router.post("/v2/image/generations", response_class=Response,
             responses={200: {"description": "the image's bytes", "content": {"image/png": {}}}},
             openapi_extra=documented_body(GenerationsForm, "multipart/form-data"))
@guarded(error_response)
async def generations(request: Request) -> Response:
    """Generate one image in a style; the answer is its PNG bytes."""
    svc = services(request)
    if svc.settings.auth and bearer_token(request) is None:
        raise MissingToken()
    key = await authenticate(request)
    fields, _ = await read_form(request, max_files=0)
    body = parse(GenerationsForm, {k: v for k, v in fields.items() if not (k == "seed" and v == "")})
    spec, _ = svc.catalog.resolve_dialect(NAME, body.style, what="style")
    canonical = await checked(svc, GenerationRequest.create(
        family=spec.family, model=spec.model, task="t2i", **_size(svc, spec, body.aspect_ratio),
        prompt=body.prompt, seed=body.seed, encoding="png",
    ))
    stored = await run_now(request, canonical, key, label=f"{canonical.family}/{canonical.model}")
    asset = stored.assets[0]
    return Response(stored.first_bytes, media_type=stored.media_type, headers={
        "Content-Location": absolute(svc, f"/{asset.kind}/{asset.name}"), "X-Seed": str(stored.result.seed),
    })


@router.api_route("/v2/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
@guarded(error_response)
async def unknown(request: Request) -> Response:
    raise not_found(request)


RATIO = re.compile(r"^\s*(\d{1,2})\s*:\s*(\d{1,2})\s*$")
MAX_ELONGATION = 4  # 4:1 at most, either way


def _size(svc: Services, spec: ModelSpec, aspect_ratio: str) -> dict[str, object]:
    """The first of the model's formats with that shape (the catalog lists a model's preferred
    first); for another ratio (``3:2``, ``21:9``, ...), a pixel size of that shape and about the
    first format's area, where the model's catalog ``sizes`` take it."""
    shapes: dict[str, str] = {}
    for name in spec.formats:
        width, height = svc.catalog.size_of(spec, name)
        d = gcd(width, height)
        shapes.setdefault(f"{width // d}:{height // d}", name)
    match = RATIO.match(aspect_ratio)
    if match is None or not int(match[1]) or not int(match[2]):
        raise InvalidParameters(f"aspect_ratio is WIDTH:HEIGHT, for example 1:1, 16:9 or 3:2; got {aspect_ratio!r}",
                                details={"param": "aspect_ratio", "allowed": list(shapes)})
    w, h = int(match[1]), int(match[2])
    d = gcd(w, h)
    w, h = w // d, h // d
    if f"{w}:{h}" in shapes:
        return {"format": shapes[f"{w}:{h}"]}
    if spec.sizes is None or max(w, h) > MAX_ELONGATION * min(w, h):
        also = f", or any ratio up to {MAX_ELONGATION}:1" if spec.sizes is not None else ""
        raise InvalidParameters(f"aspect_ratio must be one of {', '.join(shapes)}{also}; got {aspect_ratio!r}",
                                details={"param": "aspect_ratio", "allowed": list(shapes)})
    base_w, base_h = svc.catalog.size_of(spec, spec.formats[0])
    step = 16  # the engine generates at the architecture's multiple and centre-crops to this
    scale = ((base_w * base_h) / (w * h)) ** 0.5
    width = min(spec.sizes.max, max(spec.sizes.min, round(w * scale / step) * step))
    height = min(spec.sizes.max, max(spec.sizes.min, round(h * scale / step) * step))
    return {"width": width, "height": height}
