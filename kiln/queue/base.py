"""The broker protocol: what the API and the worker need from a queue.

Two implementations are planned: :class:`~kiln.queue.local.SqliteBroker` (embedded, the default)
and a Redis Streams one for scale-out. Both give at-least-once delivery: a job interrupted by a
crash runs again, which is harmless because outputs are content-addressed.
"""

from __future__ import annotations

from typing import Any, Protocol

from kiln.queue.job import Job, Priority


class Broker(Protocol):
    # --- API side --------------------------------------------------------------------------------
    def submit(
        self,
        payload: dict[str, Any],
        *,
        priority: Priority = Priority.NORMAL,
        key_id: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        max_depth: int | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job; ``(job, created)``. An idempotency key seen before (for this key id, within
        its lifetime) returns the earlier job with ``created=False`` when ``request_hash`` matches,
        and raises :class:`kiln.errors.IdempotencyConflict` when it does not. :class:`kiln.errors.QueueFull` past
        ``max_depth`` queued jobs."""

    def get(self, job_id: str) -> Job | None: ...

    def position(self, job_id: str) -> int | None:
        """1-based place among queued jobs in the order they will be claimed; None if not queued."""

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now; ask a running one to stop (the worker confirms). None if unknown."""

    def depth(self) -> dict[Priority, int]: ...

    # --- worker side -----------------------------------------------------------------------------
    def claim(self, worker_id: str) -> Job | None:
        """The next job to run (priority order with aging, FIFO within one), now running."""

    def report_progress(self, job_id: str, step: int, total_steps: int) -> bool:
        """Record progress; returns whether cancellation was requested."""

    def complete(self, job_id: str, output: str, result: dict[str, Any]) -> Job: ...

    def fail(self, job_id: str, code: str, message: str) -> Job: ...

    def mark_cancelled(self, job_id: str) -> Job: ...

    def requeue(self, job_id: str) -> Job:
        """Hand a running job back (graceful shutdown); it keeps its place by creation time."""

    def recover(self) -> int:
        """At start-up: jobs left running by a process that died are queued again. Returns how many."""
