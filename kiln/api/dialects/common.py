"""What every compatible door shares: reading its body once, turning it into the canonical request
(which :mod:`kiln.api.submit` runs or queues exactly as it does the render API's: same worker,
queue, keys, credits and store), and answering every failure in the door's own error shape.

A door's module holds only the translation: its body model, its names, its response shape and one
function that maps Kiln's error vocabulary to its own (see :func:`guarded`).
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.api.auth import services
from kiln.api.errors import ApiError
from kiln.api.fetch import resolve_image_input
from kiln.api.guard import BodyTooLarge
from kiln.api.services import Services
from kiln.catalog import ModelSpec
from kiln.engine.request import GenerationRequest
from kiln.errors import (
    InvalidImage,
    InvalidParameters,
    InvalidPrompt,
    KilnError,
    UnsupportedFormat,
    UserError,
)
from kiln.queue import Job
from kiln.worker import Stored

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]
EXIF_ORIENTATION = 0x0112


def guarded(to_response: Callable[[KilnError], Response]) -> Callable[[Handler], Handler]:
    """Route decorator: whatever the handler raises leaves as ``to_response``'s answer (the door's one
    error mapping); an unexpected exception is logged and answered as Kiln's internal error."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except KilnError as exc:
                if not isinstance(exc, ApiError | UserError):
                    log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.code, exc.message)
                return to_response(exc)
            except BodyTooLarge:
                return to_response(ApiError(413, "invalid_parameters", "request body too large"))
            except Exception as exc:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                internal = KilnError("internal server error")
                internal.__cause__ = exc  # for a door whose codes tell causes apart; never shown
                return to_response(internal)

        return run

    return wrap


def not_found(request: Request) -> KilnError:
    return ApiError(404, "not_found", f"no route {request.method} {request.url.path}")


# --- bodies ----------------------------------------------------------------------------------------


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], data: Any) -> M:
    """``data`` as ``model``, or :class:`InvalidParameters` (:class:`InvalidPrompt` for the prompt)
    naming the first bad field; ``details`` carry ``param`` and every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]} for e in exc.errors()]
        first = problems[0]
        details = {"param": first["field"], "errors": problems}
        cls = InvalidPrompt if first["field"] == "prompt" else InvalidParameters
        raise cls(f"{first['field']}: {first['message']}", details=details) from None


def documented_body(model: type[BaseModel], media_type: str = "application/json",
                    files: tuple[str, ...] = ()) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body itself: ``model``'s schema (nested models
    inlined, so the document needs no extra components) and any file fields of a form."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    schema = inline(schema)
    for name in files:
        schema["properties"][name] = {"type": "string", "format": "binary"}
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


async def json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidParameters("the request body is not valid JSON", details={"param": "body"}) from None


async def read_form(request: Request, *, max_files: int = 4) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """A ``multipart/form-data`` body as its text fields and its files' bytes (by field name)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise InvalidParameters("send the request as multipart/form-data", details={"param": "body"})
    svc = services(request)
    try:
        form: FormData = await request.form(max_files=max_files, max_fields=64)
    except StarletteHTTPException as exc:  # a malformed multipart body
        raise InvalidParameters(f"the multipart body cannot be read: {exc.detail}", details={"param": "body"}) from None
    try:
        fields: dict[str, str] = {}
        files: dict[str, list[bytes]] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read(svc.settings.max_upload_bytes + 1)
                if len(data) > svc.settings.max_upload_bytes:
                    raise InvalidImage(f"{name}: larger than {svc.settings.max_upload_bytes // 2**20} MB",
                                       details={"field": name})
                files.setdefault(name, []).append(data)
            elif name in fields:
                raise InvalidParameters(f"{name}: sent more than once", details={"param": name})
            else:
                fields[name] = value
        return fields, files
    finally:
        await form.close()


async def image_input(svc: Services, value: str, field: str) -> bytes:
    """An image a request names: a URL, a data URI or this server's upload (as the render API reads them)."""
    return await resolve_image_input(
        value, policy=svc.fetch_policy, own_upload=lambda name: svc.store.read("u", name),
        public_url=svc.settings.base_url(), field=field,
    )


def image_size_of(data: bytes) -> tuple[int, int] | None:
    """An input image's (width, height) upright, as the planner will decode it (EXIF orientation
    applied), from its header: no pixel decoded. None when it cannot be read (the planner then refuses
    it, naming the field)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            turned = img.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)  # a quarter turn either way
            return (height, width) if turned else (width, height)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


# --- sizes -----------------------------------------------------------------------------------------


def size_fields(svc: Services, spec: ModelSpec, width: int, height: int, shown: str) -> dict[str, object]:
    """The canonical request's size fields for ``width`` x ``height``: the catalog format of ``spec``
    that is exactly that size, else the pixel size itself where the model's ``sizes`` range takes it."""
    for name in spec.formats:
        if svc.catalog.size_of(spec, name) == (width, height):
            return {"format": name}
    if spec.sizes is not None and (width, height) in spec.sizes:
        return {"width": width, "height": height}
    offered = [shown.format(w=w, h=h) for w, h in sizes(svc, spec)]
    also = f", or each side {spec.sizes.min} to {spec.sizes.max}" if spec.sizes is not None else ""
    raise UnsupportedFormat(
        f"size {shown.format(w=width, h=height)} is not offered for this model; sizes: {', '.join(offered)}{also}",
        details={"param": "size", "sizes": offered}
        | ({"size_range": [spec.sizes.min, spec.sizes.max]} if spec.sizes is not None else {}),
    )


def sizes(svc: Services, spec: ModelSpec) -> list[tuple[int, int]]:
    return list(dict.fromkeys(svc.catalog.size_of(spec, name) for name in spec.formats))


# --- running ---------------------------------------------------------------------------------------


async def checked(svc: Services, canonical: GenerationRequest) -> GenerationRequest:
    """The operator's prompt filter, then the catalog's rules (the planner), as the render API checks."""
    svc.prompt_filter.check(canonical.prompt, canonical.negative_prompt)
    if canonical.image is None and canonical.mask is None:
        svc.validate(canonical)
    else:
        await run_in_threadpool(svc.validate, canonical)  # decodes the inputs
    return canonical


async def all_bytes(svc: Services, stored: Stored) -> list[bytes]:
    """Every output's bytes (the worker hands over the first; the others are read back from the store)."""
    rest = [await run_in_threadpool(svc.store.read, a.kind, a.name) for a in stored.assets[1:]]
    return [stored.first_bytes, *rest]


def output_names(job: Job) -> list[tuple[str, str]]:
    """(kind, name) of each output of a complete job."""
    result = job.result or {}
    paths = result.get("outputs") or ([job.output] if job.output else [])
    return [tuple(p.strip("/").split("/", 1)) for p in paths]  # type: ignore[misc]
