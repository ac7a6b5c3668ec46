"""The render API's wire format, without I/O: shared by :class:`~kiln.client.Client` and
:class:`~kiln.client.AsyncClient`, which only send what this module builds and hand it what came back.

Reference: the render API (``000_…``): sync tier ``POST /{modality}/{family}/{model}/{task}?format=``
(bytes, ``Content-Location``, ``X-Seed``, ``X-Generation-Time``, ``Server-Timing``), async tier
``POST /queue`` (202 + job), ``GET /jobs/{id}`` (303 to the output when complete),
``GET /jobs/{id}/events`` (SSE), ``DELETE /jobs/{id}``, ``POST /uploads``, ``GET /models[/aliases]``.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypedDict

import httpx

from kiln import __version__
from kiln.client.errors import ConnectionFailed, KilnAPIError, error_from_body, job_error
from kiln.client.records import Generation, Job, JobEvent, Position, job_event

USER_AGENT = f"kiln-client/{__version__}"
VIDEO_TASKS = frozenset({"t2v", "i2v"})
# A job's event stream sends a comment every 15 s; four missed in a row means the connection is dead.
STREAM_READ_TIMEOUT_S = 60.0

ImageInput = str | bytes | os.PathLike[str]


class Params(TypedDict, total=False):
    """Generation parameters of the render API (Request Schemas); None or absent: the model's default.

    ``image`` and ``mask`` are a URL or data URI (a ``str``), or bytes or a ``pathlib.Path``, which
    are uploaded first.
    ``loras`` are ``{"url": ..., "weight": ...}`` dicts, ``(url, weight)`` pairs or bare URLs.
    """

    negative_prompt: str
    steps: int
    guidance: float
    cfg: float
    seed: int
    sampler: str
    scheduler: str
    image: ImageInput
    mask: ImageInput
    strength: float
    duration: float
    loras: list[Any]
    upscale: float
    latent_upscale: float
    detail_enhance: bool
    detail_strength: float


PARAMS = frozenset(Params.__annotations__)


# --- requests --------------------------------------------------------------------------------------


def split_model(model: str) -> tuple[str, str]:
    """``"flux/dev"`` -> ``("flux", "dev")``; the model part may be an alias (``flux/latest``)."""
    family, sep, name = model.partition("/")
    if not sep or not family or not name or "/" in name:
        raise ValueError(f"model must be FAMILY/MODEL (e.g. flux/dev), not {model!r}")
    return family, name


def modality_of(task: str) -> str:
    return "video" if task in VIDEO_TASKS else "image"


def sync_path(model: str, task: str) -> str:
    family, name = split_model(model)
    return f"/{modality_of(task)}/{family}/{name}/{task}"


def checked_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters that were given (None dropped); an unknown name is a TypeError, as for a function."""
    unknown = sorted(set(params) - PARAMS)
    if unknown:
        raise TypeError(f"unknown generation parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(PARAMS))}")
    return {k: v for k, v in params.items() if v is not None}


def needs_upload(value: Any) -> bool:
    """Whether an ``image``/``mask`` value is local data (bytes or a path) rather than a URL or data URI."""
    return isinstance(value, bytes | bytearray | os.PathLike)


def generation_body(prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of a sync request (and the generation part of a queued one); inputs already URLs."""
    body: dict[str, Any] = {"prompt": prompt, **params}
    if "loras" in body:
        body["loras"] = [_lora(item) for item in body["loras"]]
    return body


def _lora(item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        return {"url": item}
    if isinstance(item, tuple | list) and len(item) == 2:
        return {"url": item[0], "weight": item[1]}
    if isinstance(item, dict):
        return dict(item)
    raise TypeError(f"a LoRA is a URL, a (url, weight) pair or a {{'url', 'weight'}} dict, not {item!r}")


def queue_body(prompt: str, model: str, task: str, fmt: str | None, params: dict[str, Any], *,
               priority: str | None = None, webhook: str | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
    family, name = split_model(model)
    body = {"modality": modality_of(task), "family": family, "model": name, "task": task,
            **generation_body(prompt, params)}
    extra = {"format": fmt, "priority": priority, "webhook": webhook, "idempotency_key": idempotency_key}
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


def upload_file(file: str | bytes | os.PathLike[str], filename: str | None) -> tuple[str, bytes]:
    """(file name, bytes) of what :meth:`upload` sends; read once, so a retry sends the same bytes."""
    if isinstance(file, bytes | bytearray):
        return filename or "upload", bytes(file)
    path = Path(file)
    return filename or path.name, path.read_bytes()


def absolute(base_url: str, url: str) -> str:
    """A URL the server handed out (absolute), or a path on it (relative) made absolute."""
    return url if "://" in url else base_url + ("" if url.startswith("/") else "/") + url


def timeout(seconds: float, *, read: float | None = None) -> httpx.Timeout:
    """``seconds`` for everything (``read`` for reading, when given) but at most 10 s to connect."""
    return httpx.Timeout(seconds, read=seconds if read is None else read, connect=min(10.0, seconds))


def request_headers(api_key: str | None, extra: dict[str, str] | None, *, auth: bool) -> dict[str, str]:
    """The headers of a request; the key goes only to the API (``auth``), never to an output URL."""
    headers = {"User-Agent": USER_AGENT, **(extra or {})}
    if auth and api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def answered(response: httpx.Response) -> bool:
    """Whether a response is an answer rather than an error: 2xx, or a complete job's 303."""
    return response.is_success or response.status_code == 303


# --- responses -------------------------------------------------------------------------------------


def error_of(response: httpx.Response, *, job_id: str | None = None) -> KilnAPIError:
    """The exception an error response stands for (its body already read)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    return error_from_body(body, status=response.status_code, retry_after=retry_after(response), job_id=job_id)


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def connection_failed(exc: httpx.TransportError, url: str) -> ConnectionFailed:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return ConnectionFailed(f"the request to {url} {kind}: {exc or type(exc).__name__}")


def generation_of(response: httpx.Response, elapsed_s: float) -> Generation:
    """A sync tier's 200: the bytes and their headers."""
    headers = response.headers
    return Generation(
        data=response.content,
        media_type=headers.get("content-type", "application/octet-stream").split(";")[0],
        url=headers.get("content-location"),
        seed=_int(headers.get("x-seed")),
        generation_ms=_int(headers.get("x-generation-time")),
        timing=server_timing(headers.get("server-timing", "")),
        elapsed_s=elapsed_s,
    )


def generation_of_job(job: Job, data: bytes, media_type: str, elapsed_s: float) -> Generation:
    return Generation(data=data, media_type=media_type, url=job.output, seed=job.seed,
                      generation_ms=job.duration_ms, elapsed_s=elapsed_s, job_id=job.id)


def server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: generate;dur=12.3, encode;dur=1.0`` -> {"generate": 12.3, "encode": 1.0}."""
    timing: dict[str, float] = {}
    for metric in header.split(","):
        name, *attrs = (part.strip() for part in metric.split(";"))
        for attr in attrs:
            key, _, value = attr.partition("=")
            if name and key.strip() == "dur":
                try:
                    timing[name] = float(value.strip().strip('"'))
                except ValueError:
                    pass
    return timing


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def job_of(response: httpx.Response) -> Job:
    """The job of a 200, 202 or 303 answer about one."""
    return Job.from_json(response.json())


def finished(job: Job) -> Job:
    """``job`` if it completed; the exception its failure or cancellation stands for otherwise."""
    if job.status == "failed":
        raise job_error(job.id, {"code": job.error.code, "message": job.error.message} if job.error else None)
    if job.status == "cancelled":
        raise job_error(job.id, None, cancelled=True)
    return job


def job_id_of(job: str | Job) -> str:
    return job.id if isinstance(job, Job) else job


# --- retries ---------------------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """When and how long to wait before sending a refused request again.

    Only errors that waiting can cure are retried (429 ``rate_limit_exceeded``/``queue_full``, 503
    ``capacity_exhausted`` and the other transient 503s; never ``model_not_installed``), at most
    ``max_retries`` times. The wait grows exponentially from ``backoff`` up to ``max_backoff``, is
    never shorter than the server's ``Retry-After``, and gets up to ``jitter`` more on top so that
    clients refused together do not come back together.
    """

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    jitter: float = 0.25
    rng: Callable[[], float] = random.random

    def should_retry(self, error: KilnAPIError, attempt: int) -> bool:
        return error.retryable and attempt < self.max_retries

    def delay(self, attempt: int, error: KilnAPIError | None = None) -> float:
        grown = min(self.max_backoff, self.backoff * 2**attempt)
        floor = error.retry_after if error is not None and error.retry_after is not None else 0.0
        return max(grown, floor) * (1.0 + self.jitter * self.rng())


# --- Server-Sent Events ----------------------------------------------------------------------------


@dataclass
class RawEvent:
    id: str | None
    event: str
    data: str


class SSEDecoder:
    """Lines of a ``text/event-stream`` in, events out (the WHATWG event-stream rules: ``data`` lines
    joined by newlines, comments and unknown fields ignored, a blank line ends an event)."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> RawEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = RawEvent(self._id, self._event or "message", "\n".join(self._data))
            self._id, self._event, self._data = None, "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def event_data(raw: RawEvent) -> dict[str, Any]:
    try:
        data = json.loads(raw.data) if raw.data else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def event_id(raw: RawEvent) -> int | None:
    return _int(raw.id)


def news(event: JobEvent, last_event_id: int | None, position: int | None) -> bool:
    """Whether ``event`` tells something not heard before on this stream: a later step of the job's
    history, or a new queue position (a reconnection repeats the position under the same id)."""
    if isinstance(event, Position):
        return event.position != position or last_event_id is None
    return event.event_id is None or last_event_id is None or event.event_id > last_event_id


def stream_headers(last_event_id: int | None) -> dict[str, str]:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    return headers


def decoded(job_id: str, decoder: SSEDecoder, line: str) -> JobEvent | None:
    """Feed one line; the typed event it completes, if any (unknown event names are skipped)."""
    raw = decoder.feed(line)
    if raw is None:
        return None
    return job_event(job_id, event_id(raw), raw.event, event_data(raw))
