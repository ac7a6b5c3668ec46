"""The render API's error responses: Kiln's error vocabulary mapped to HTTP in one place.

Every error body is ``{error, message, retry_after?, details?}``; no response carries a stack
trace. Status codes are decided here and nowhere else.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln import errors as e
from kiln.api.guard import BodyTooLarge

log = logging.getLogger(__name__)

STATUS: list[tuple[type[e.KilnError], int]] = [
    # most specific first
    (e.AssetNotFound, 404),
    (e.UnknownModel, 404),
    (e.IdempotencyConflict, 409),
    (e.PromptFiltered, 403),
    (e.NsfwDetected, 403),
    (e.UnsupportedFormat, 400),
    (e.InvalidPrompt, 400),
    (e.UserError, 400),
    (e.CapacityExhausted, 503),
    (e.QueueFull, 429),
    (e.ModelNotInstalled, 503),
    (e.ModelUnavailable, 503),
    (e.ModelLoadFailed, 503),
    (e.UnavailableError, 503),
    (e.OutOfMemory, 500),
    (e.GenerationError, 500),
    (e.KilnError, 500),
]


class ApiError(e.KilnError):
    """An error only HTTP has (auth, rate, credits, not found routes), with its status attached."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None, headers=None) -> None:
        super().__init__(message)
        self.status, self.code, self.retry_after, self.headers = status, code, retry_after, headers or {}

    def to_dict(self):
        body = super().to_dict()
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


def status_of(exc: e.KilnError) -> int:
    if isinstance(exc, ApiError):
        return exc.status
    return next(status for cls, status in STATUS if isinstance(exc, cls))


def error_response(exc: e.KilnError) -> JSONResponse:
    headers = dict(getattr(exc, "headers", {}) or {})
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(exc.to_dict(), status_code=status_of(exc), headers=headers)


def _caused_by(exc: BaseException, cls: type[BaseException]) -> bool:
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, cls):
            return True
        stack.extend(x for x in (current.__cause__, current.__context__) if x is not None)
        stack.extend(getattr(current, "exceptions", ()))  # exception groups
    return False


def install(app: FastAPI) -> None:
    @app.exception_handler(e.KilnError)
    async def _kiln(request: Request, exc: e.KilnError) -> JSONResponse:
        if status_of(exc) >= 500:
            log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.code, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
            problems.append({"field": ".".join(loc) or "body", "message": err.get("msg", "invalid")})
        first = problems[0] if problems else {"field": "body", "message": "invalid request"}
        prompt_error = first["field"] == "prompt"
        body = {
            "error": "invalid_prompt" if prompt_error else "invalid_parameters",
            "message": f"{first['field']}: {first['message']}",
            "details": {"errors": problems},
        }
        return JSONResponse(body, status_code=400)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"error": "invalid_parameters", "message": "request body too large"}, status_code=413)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if _caused_by(exc, BodyTooLarge):  # FastAPI wraps body-read errors in a 400
            return await _too_large(request, BodyTooLarge())
        if exc.status_code == 400:  # a body that is not JSON at all (bad UTF-8, nesting, huge numbers)
            return JSONResponse({"error": "invalid_parameters", "message": "the request body is not valid JSON"},
                                status_code=400)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed here"}.get(
            exc.status_code, str(exc.detail)
        )
        return JSONResponse({"error": code, "message": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal_error", "message": "internal server error"}, status_code=500)
