"""The render API's error vocabulary, as exceptions a client can catch.

Every error response of the render API is ``{error, message, retry_after?, details?}`` with a status
code decided by the server; :func:`error_from_response` picks the class named by ``error`` (falling
back on the status code for a code this client does not know). The branches mirror the server's,
because a caller reacts to each differently:

- :class:`UserError` — the request itself is wrong; sending it again unchanged cannot succeed.
- :class:`UnavailableError` — the request is fine but the server cannot serve it now (or until an
  operator acts); :attr:`KilnAPIError.retryable` says whether waiting can help.
- :class:`GenerationError` — the work started and did not finish (a job failed or was cancelled).
- :class:`AuthenticationError`, :class:`InsufficientCredits` — the key, not the request.
- :class:`ServerError` — an internal error; :class:`ConnectionFailed` — no answer at all.
"""

from __future__ import annotations

from typing import Any


class KilnAPIError(Exception):
    """An error answered by a Kiln server (or, for :class:`ConnectionFailed`, no answer).

    ``code`` is the body's ``error``, ``status`` the HTTP status (None when no response carried it: a
    failed job's error), ``message`` is written for the person who sent the request, ``retry_after``
    is the server's advice in seconds, ``details`` carries structured hints (allowed values, ranges),
    ``job_id`` names the job whose failure this is, if any.
    """

    code = "internal_error"
    status: int | None = 500
    retryable = False  # whether the same request, sent again later, can succeed

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 retry_after: float | None = None, details: dict[str, Any] | None = None,
                 job_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after
        self.details = details or {}
        self.job_id = job_id

    def __str__(self) -> str:
        where = f"{self.status} " if self.status is not None else ""
        job = f" (job {self.job_id})" if self.job_id else ""
        return f"{where}{self.code}: {self.message}{job}"


# --- the key ---------------------------------------------------------------------------------------


class AuthenticationError(KilnAPIError):
    code, status = "invalid_token", 401


class InvalidToken(AuthenticationError):
    """No API key, a malformed one, or one the server does not know."""

    code = "invalid_token"


class TokenExpired(AuthenticationError):
    """The key was revoked or has expired."""

    code = "token_expired"


class InsufficientCredits(KilnAPIError):
    """The key's credits are spent."""

    code, status = "insufficient_credits", 402


# --- the request is wrong --------------------------------------------------------------------------


class UserError(KilnAPIError):
    code, status = "invalid_parameters", 400


class InvalidParameters(UserError):
    code = "invalid_parameters"


class InvalidPrompt(UserError):
    code = "invalid_prompt"


class UnsupportedFormat(UserError):
    code = "unsupported_format"


class UnsupportedTask(UserError):
    code = "unsupported_task"


class InvalidImage(UserError):
    """An input image or mask (or an upload) could not be read, or does not fit the request."""

    code = "invalid_image"


class NotFound(UserError):
    """No such job, asset or route (another key's job is as unknown as a missing one)."""

    code, status = "not_found", 404


class ModelNotFound(NotFound):
    code = "model_not_found"


class IdempotencyConflict(UserError):
    """The idempotency key was used before, by the same API key, with a different request."""

    code, status = "idempotency_conflict", 409


class PromptFiltered(UserError):
    code, status = "prompt_filtered", 403


class NsfwDetected(UserError):
    """The safety classifier flagged an output; ``details["outputs"]`` lists which."""

    code, status = "nsfw_detected", 403


# --- the server cannot serve it now ----------------------------------------------------------------


class UnavailableError(KilnAPIError):
    code, status, retryable = "unavailable", 503, True


class CapacityExhausted(UnavailableError):
    """The sync tier could not start the request in time; retry after ``retry_after`` or use the queue."""

    code = "capacity_exhausted"


class QueueFull(UnavailableError):
    code, status = "queue_full", 429


class RateLimitExceeded(UnavailableError):
    code, status = "rate_limit_exceeded", 429


class QueueUnavailable(UnavailableError):
    code = "queue_unavailable"


class StorageUnavailable(UnavailableError):
    code = "storage_unavailable"


class ModelNotInstalled(UnavailableError):
    """The model is in the server's catalog but its weights are not on the server; an operator must act."""

    code, retryable = "model_not_installed", False


class ModelUnavailable(UnavailableError):
    """The model is announced (status coming_soon) but cannot be used yet."""

    code, retryable = "model_unavailable", False


class ModelLoadFailed(UnavailableError):
    """The weights are there but could not be loaded; an operator must act."""

    code, retryable = "model_load_failed", False


# --- the work did not finish -----------------------------------------------------------------------


class GenerationError(KilnAPIError):
    code, status = "generation_failed", 500


class GenerationFailed(GenerationError):
    code = "generation_failed"


class OutOfMemory(GenerationError):
    code = "out_of_memory"


class JobCancelled(GenerationError):
    code = "cancelled"


class ServerError(KilnAPIError):
    """The server failed in a way it does not explain (``internal_error``, an unknown 5xx)."""

    code, status = "internal_error", 500


class ConnectionFailed(KilnAPIError):
    """The server could not be reached, or the connection broke before an answer came."""

    code, status = "connection_failed", None


ERRORS: dict[str, type[KilnAPIError]] = {
    cls.code: cls
    for cls in (
        InvalidToken, TokenExpired, InsufficientCredits,
        InvalidParameters, InvalidPrompt, UnsupportedFormat, UnsupportedTask, InvalidImage, NotFound, ModelNotFound,
        IdempotencyConflict, PromptFiltered, NsfwDetected,
        UnavailableError, CapacityExhausted, QueueFull, RateLimitExceeded, QueueUnavailable, StorageUnavailable,
        ModelNotInstalled, ModelUnavailable, ModelLoadFailed,
        GenerationFailed, OutOfMemory, JobCancelled, ServerError,
    )
}


def _by_status(status: int | None) -> type[KilnAPIError]:
    if status == 401:
        return AuthenticationError
    if status == 429:
        return RateLimitExceeded
    if status == 503:
        return UnavailableError
    if status is not None and 400 <= status < 500:
        return UserError
    return ServerError


def error_from_body(body: Any, *, status: int | None, retry_after: float | None = None,
                    job_id: str | None = None) -> KilnAPIError:
    """The exception for an error body (``{error, message, ...}``), chosen by its code, else its status."""
    if not isinstance(body, dict):
        body = {}
    code = body.get("error")
    code = code if isinstance(code, str) and code else None
    cls = ERRORS.get(code or "") or _by_status(status)
    message = body.get("message")
    if not isinstance(message, str) or not message:
        message = f"HTTP {status}" if status is not None else "request failed"
    if retry_after is None and isinstance(body.get("retry_after"), int | float):
        retry_after = float(body["retry_after"])
    details = body.get("details") if isinstance(body.get("details"), dict) else None
    return cls(message, code=code, status=status, retry_after=retry_after, details=details, job_id=job_id)


def job_error(job_id: str, error: dict[str, Any] | None, *, cancelled: bool = False) -> KilnAPIError:
    """The exception for a job that ended failed (its ``error`` {code, message}) or cancelled.

    Its ``status`` is None: no response carried one, the job's own record did."""
    if cancelled:
        exc: KilnAPIError = JobCancelled("the job was cancelled", job_id=job_id)
    else:
        error = error or {}
        code = error.get("code") if isinstance(error.get("code"), str) else "generation_failed"
        message = error.get("message") if isinstance(error.get("message"), str) else "the job failed"
        exc = ERRORS.get(code, GenerationFailed)(message, code=code, job_id=job_id)
    exc.status = None
    return exc
