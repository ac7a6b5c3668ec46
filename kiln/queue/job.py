"""A job and its state machine.

::

    queued ──▶ running ──▶ complete
      │   ◀──────┘  │ └──▶ failed
      │ (requeued   └────▶ cancelled
      │  after a crash)
      └──────────────────▶ cancelled

Terminal states never change again. "Unknown id" is ``None`` from the broker, never a state.
Every claim gives the running job a fresh ``lease`` token; a worker passes it back with its
progress and result, so a worker that lost the job (it stopped heartbeating and another claimed
it) cannot overwrite the new owner's work.
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


WORKER_LOST = "worker_lost"  # the error code of a job that stopped its worker max_attempts times
WORKER_LOST_MESSAGE = (
    "the job stopped its worker {attempts} times (crashed or stopped heartbeating); it is not run again"
)


def worker_lost_message(attempts: int) -> str:
    return WORKER_LOST_MESSAGE.format(attempts=attempts)


def effective_rank(priority: Priority, created: float, now: float, aging: float) -> int:
    """The rank a queued job competes at: one better per ``aging`` seconds waited, so low never starves."""
    return max(0, priority.rank - int((now - created) / aging))


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
    # the current claim's token while running (None otherwise): a worker's writes that carry an older
    # one are refused with kiln.errors.LeaseLost
    lease: str | None = None

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
