"""Kiln's one error vocabulary.

Every layer raises these; each API dialect maps them to its own status codes and schema in one
place. A ``code`` is a stable machine-readable string, ``message`` is written for the person who
sent the request and says what to change, ``details`` carries structured hints (allowed values,
ranges) for clients.

Three branches, because a caller reacts to each differently:

- :class:`UserError` — the request itself is wrong; retrying it unchanged cannot succeed (HTTP 4xx).
- :class:`UnavailableError` — the request is fine but the server cannot serve it now or until an
  operator acts (a model not installed, capacity exhausted).
- :class:`GenerationError` — the work started and did not finish (failed, cancelled, engine died).
"""

from __future__ import annotations

from typing import Any


class KilnError(Exception):
    """Base of every error Kiln raises on purpose."""

    code = "internal_error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


# --- the request is wrong -------------------------------------------------------------------------


class UserError(KilnError):
    """The request cannot be served as sent; the message says what to change."""

    code = "invalid_parameters"


class InvalidParameters(UserError):
    code = "invalid_parameters"


class InvalidPrompt(UserError):
    code = "invalid_prompt"


class UnsupportedFormat(UserError):
    code = "unsupported_format"


class UnknownModel(UserError):
    code = "model_not_found"


class UnsupportedTask(UserError):
    code = "unsupported_task"


class IdempotencyConflict(UserError):
    """The idempotency key was used before, by the same API key, with a different request body."""

    code = "idempotency_conflict"

    def __init__(self, message: str, *, job_id: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.job_id = job_id


class PromptFiltered(UserError):
    """The prompt matched the operator's prompt filter."""

    code = "prompt_filtered"


class NsfwDetected(UserError):
    """The image safety classifier flagged an output; nothing flagged is stored or returned.

    A user error like :class:`PromptFiltered`: the same prompt and seed give the same pixels again.
    """

    code = "nsfw_detected"


class InvalidLora(InvalidParameters):
    """A LoRA adapter that cannot be used: not a safetensors file, not for this model, not reachable."""

    code = "invalid_parameters"


class InvalidImage(UserError):
    """An input image or mask could not be read, or does not fit the request."""

    code = "invalid_image"


# --- the server cannot serve it now ---------------------------------------------------------------


class UnavailableError(KilnError):
    code = "unavailable"


class CapacityExhausted(UnavailableError):
    """The sync tier could not start the request within its wait; ``retry_after`` is in seconds."""

    code = "capacity_exhausted"

    def __init__(self, message: str, *, retry_after: int, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "retry_after": self.retry_after}


class QueueFull(UnavailableError):
    """The async queue holds as many jobs as it is configured to."""

    code = "queue_full"


class ModelNotInstalled(UnavailableError):
    """The model is in the catalog but its weights are not on this machine."""

    code = "model_not_installed"


class ModelUnavailable(UnavailableError):
    """The model is listed (status coming_soon) but cannot be used yet."""

    code = "model_unavailable"


class ModelLoadFailed(UnavailableError):
    """The weights are present but could not be loaded (corrupt or incompatible checkpoint)."""

    code = "model_load_failed"


class QueueUnavailable(UnavailableError):
    """The job queue's server (Redis) cannot be reached; the message names where, never a password."""

    code = "queue_unavailable"


class RedisUnavailable(QueueUnavailable):
    """Redis itself is out of reach (refused, timed out) for the queue, keys, rate limits or task slots.

    Its code and HTTP status are :class:`QueueUnavailable`'s (503 ``queue_unavailable``); a door whose
    API names a Redis outage apart (Vyro's 1201) tells it from other queue failures by this class.
    """


class StorageUnavailable(UnavailableError):
    """The asset store cannot be reached or refuses access (S3 endpoint down, bad credentials, no bucket).

    The message names the endpoint and bucket and the reason, never a credential.
    """

    code = "storage_unavailable"


# --- the work did not finish ----------------------------------------------------------------------


class GenerationError(KilnError):
    code = "generation_failed"


class GenerationCancelled(GenerationError):
    code = "cancelled"


class OutOfMemory(GenerationError):
    code = "out_of_memory"


# --- configuration (start-up, never a request) ----------------------------------------------------


class CatalogError(KilnError):
    """The model catalog file is invalid; raised at start-up with the offending entry named."""

    code = "invalid_catalog"


# --- stored assets (kiln.storage) -----------------------------------------------------------------


class AssetNotFound(UserError):
    """No asset of that kind and name is stored: never put, deleted, or expired."""

    code = "not_found"


class InvalidAssetName(AssetNotFound):
    """A kind or name that no store ever writes; refused before any I/O.

    A subclass of :class:`AssetNotFound` with the same code, so a CDN route answers a malformed name
    as it answers a missing one (404) and reveals nothing about the store's layout.
    """

    code = "not_found"


# --- the queue (worker side, never a request) -----------------------------------------------------


class LeaseLost(KilnError):
    """A worker acted on a job with a lease that is no longer the job's: the job was handed to another
    worker after this one stopped heartbeating, or it already finished. Nothing was changed; the
    worker drops what it has and moves on (someone else owns the job now)."""

    code = "lease_lost"
