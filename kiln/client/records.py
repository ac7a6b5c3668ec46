"""What the client hands back: small typed records of the render API's answers (reference: Response
Schemas, Type Reference), each built from the server's JSON and ignoring fields it does not know."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

TERMINAL = frozenset({"complete", "failed", "cancelled"})


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One finished generation: its bytes and where they are kept.

    ``generation_ms`` is the server's generation time (``X-Generation-Time``, or a job's
    ``duration_ms``); ``timing`` is the sync tier's ``Server-Timing`` in milliseconds per stage
    (``generate``, ``encode``, ``store``), empty when the request ran as a queued job; ``elapsed_s``
    is the wall time this client saw, retries and queueing included; ``job_id`` is set when the
    request ran on the async tier (the sync tier was full and ``fallback_to_async`` was on).
    """

    data: bytes
    media_type: str
    url: str | None
    seed: int | None
    generation_ms: int | None
    timing: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    job_id: str | None = None

    def save(self, path: str | Path) -> Path:
        """Write the bytes to ``path`` (as they came: WebP for images, MP4 for video)."""
        path = Path(path)
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class JobError:
    code: str
    message: str


@dataclass(frozen=True, kw_only=True)
class Job:
    """A job of the async tier as ``GET /jobs/{id}`` shows it; which fields are set follows ``status``
    (``queued``: position, eta_seconds; ``running``: progress, step, total_steps, eta_seconds;
    ``complete``: output(s), seed, duration_ms; ``failed``: error)."""

    id: str
    status: str
    created_at: str | None = None
    position: int | None = None
    eta_seconds: float | None = None
    progress: float | None = None
    step: int | None = None
    total_steps: int | None = None
    started_at: str | None = None
    output: str | None = None
    outputs: tuple[str, ...] = ()
    seed: int | None = None
    duration_ms: int | None = None
    completed_at: str | None = None
    error: JobError | None = None
    failed_at: str | None = None
    cancelled_at: str | None = None
    webhook: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        error = data.get("error")
        outputs = data.get("outputs") or ([data["output"]] if data.get("output") else [])
        return cls(
            id=str(data["id"]), status=str(data["status"]), created_at=data.get("created_at"),
            position=data.get("position"), eta_seconds=data.get("eta_seconds"), progress=data.get("progress"),
            step=data.get("step"), total_steps=data.get("total_steps"), started_at=data.get("started_at"),
            output=data.get("output"), outputs=tuple(outputs), seed=data.get("seed"),
            duration_ms=data.get("duration_ms"), completed_at=data.get("completed_at"),
            error=JobError(str(error.get("code")), str(error.get("message"))) if isinstance(error, dict) else None,
            failed_at=data.get("failed_at"), cancelled_at=data.get("cancelled_at"), webhook=data.get("webhook"),
        )


# --- Server-Sent Events of GET /jobs/{id}/events ---------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """One event of a job's stream, tagged with the job and the event's id (its place in the job's
    history, which ``Last-Event-ID`` resumes after)."""

    name: ClassVar[str] = ""
    job_id: str
    event_id: int | None = None

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL


@dataclass(frozen=True, kw_only=True)
class Position(JobEvent):
    name: ClassVar[str] = "position"
    position: int
    eta_seconds: float | None = None


@dataclass(frozen=True, kw_only=True)
class Started(JobEvent):
    name: ClassVar[str] = "started"


@dataclass(frozen=True, kw_only=True)
class Progress(JobEvent):
    name: ClassVar[str] = "progress"
    progress: float
    step: int
    total_steps: int


@dataclass(frozen=True, kw_only=True)
class Completed(JobEvent):
    name: ClassVar[str] = "complete"
    output: str
    outputs: tuple[str, ...] = ()
    seed: int | None = None
    duration_ms: int | None = None


@dataclass(frozen=True, kw_only=True)
class Failed(JobEvent):
    name: ClassVar[str] = "failed"
    error: JobError


@dataclass(frozen=True, kw_only=True)
class Cancelled(JobEvent):
    name: ClassVar[str] = "cancelled"


def job_event(job_id: str, event_id: int | None, name: str, data: dict[str, Any]) -> JobEvent | None:
    """The typed event for one SSE event; None for an event name this client does not know."""
    if name == "position":
        return Position(job_id=job_id, event_id=event_id, position=int(data.get("position") or 0),
                        eta_seconds=data.get("eta_seconds"))
    if name == "started":
        return Started(job_id=job_id, event_id=event_id)
    if name == "progress":
        return Progress(job_id=job_id, event_id=event_id, progress=float(data.get("progress") or 0.0),
                        step=int(data.get("step") or 0), total_steps=int(data.get("total_steps") or 0))
    if name == "complete":
        output = str(data.get("output") or "")
        return Completed(job_id=job_id, event_id=event_id, output=output,
                         outputs=tuple(data.get("outputs") or ([output] if output else [])),
                         seed=data.get("seed"), duration_ms=data.get("duration_ms"))
    if name == "failed":
        error = data.get("error") if isinstance(data.get("error"), dict) else {}
        return Failed(job_id=job_id, event_id=event_id,
                      error=JobError(str(error.get("code", "generation_failed")), str(error.get("message", ""))))
    if name == "cancelled":
        return Cancelled(job_id=job_id, event_id=event_id)
    return None


# --- discovery --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Model:
    """One entry of ``GET /models``; ``info`` holds the per-model details (steps, guidance, sizes …)."""

    family: str
    model: str
    modality: str
    tasks: tuple[str, ...]
    formats: tuple[str, ...]
    status: str
    backends: tuple[str, ...] = ()
    default_backend: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.family}/{self.model}"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Model:
        return cls(
            family=data["family"], model=data["model"], modality=data["modality"], tasks=tuple(data.get("tasks", ())),
            formats=tuple(data.get("formats", ())), status=data.get("status", "active"),
            backends=tuple(data.get("backends", ())), default_backend=data.get("default_backend"),
            info=dict(data.get("info") or {}),
        )


@dataclass(frozen=True)
class Aliases:
    """``GET /models/aliases``: stable names and the model each points at now (within its family)."""

    aliases: dict[str, str]
    updated_at: str | None = None

    def __getitem__(self, name: str) -> str:
        return self.aliases[name]

    def __contains__(self, name: object) -> bool:
        return name in self.aliases
