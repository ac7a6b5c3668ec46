"""A job and its state machine.

::

    queued ──▶ running ──▶ complete
      │   ◀──────┘  │ └──▶ failed
      │ (requeued   └────▶ cancelled
      │  after a crash)
      └──────────────────▶ cancelled

Terminal states never change again. "Unknown id" is ``None`` from the broker, never a state.
The payload is opaque to the queue: the API layer decides what it holds (a canonical request
with its inputs stored as assets), the worker decodes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 is served first."""
        return _RANK[self]


_RANK = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}
TERMINAL = frozenset({JobStatus.COMPLETE, JobStatus.FAILED, JobStatus.CANCELLED})
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset({JobStatus.COMPLETE, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}),
    JobStatus.COMPLETE: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A bug, not a user error: some code tried to move a job along an edge the machine lacks."""


def check_transition(job_id: str, current: JobStatus, new: JobStatus) -> None:
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"job {job_id}: {current} -> {new} is not allowed")


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True)
class Job:
    """A snapshot of one job as the broker stored it."""

    id: str
    status: JobStatus
    priority: Priority
    payload: dict[str, Any] = field(repr=False)
    created: float
    key_id: str | None = None
    idempotency_key: str | None = None
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total_steps: int = 0
    output: str | None = None
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    worker_id: str | None = None
    cancel_requested: bool = False

    @property
    def progress(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    @property
    def created_at(self) -> datetime:
        return _dt(self.created)  # type: ignore[return-value]

    @property
    def started_at(self) -> datetime | None:
        return _dt(self.started)

    @property
    def finished_at(self) -> datetime | None:
        return _dt(self.finished)
