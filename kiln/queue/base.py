"""The broker protocol: what the API and the worker need from a queue.

Two implementations: :class:`~kiln.queue.local.SqliteBroker` (embedded, the default) and
:class:`~kiln.queue.redis.RedisBroker` (scale-out). Both give at-least-once delivery: a job
interrupted by a crash runs again, which is harmless because outputs are content-addressed.

Leases: every claim gives the job a fresh ``Job.lease``. The worker-side calls take ``lease=``;
given, and no longer the job's current lease (another worker claimed the job after this one was
presumed dead, or it already finished), they raise :class:`kiln.errors.LeaseLost` and change
nothing. Without it they act unconditionally (tools, tests). A job claimed more than
``max_attempts`` times because its worker died ends ``failed`` with code ``worker_lost``.

A broker whose leases expire (Redis) also has ``lease_s`` and ``heartbeat(job_id, lease)``; the
worker calls it every ``lease_s / 3`` while a job runs (:mod:`kiln.worker.heartbeat`). A broker that
several workers share (Redis) routes jobs by what each worker ``holds`` (:mod:`kiln.worker.routing`)
and wakes idle ones: ``wait_for_work(worker_id, timeout_s)`` blocks until a job may be there, and
``ring(worker_id)`` ends that wait early.

Every broker can tell a :class:`~kiln.queue.changes.ChangeFeed` of each change it makes (SSE streams
wait on it): the embedded one through its ``changes`` attribute, the Redis one by publishing.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    def claim(self, worker_id: str, *, holds: Iterable[str] = ()) -> Job | None:
        """The next job to run (priority order with aging, FIFO within one), now running. ``holds``:
        what this worker has loaded (models, LoRAs), for brokers that route among several workers."""

    def report_progress(self, job_id: str, step: int, total_steps: int, *, lease: str | None = None) -> bool:
        """Record progress (and, with a lease, heartbeat); returns whether cancellation was requested."""

    def complete(self, job_id: str, output: str, result: dict[str, Any], *, lease: str | None = None) -> Job: ...

    def fail(self, job_id: str, code: str, message: str, *, lease: str | None = None) -> Job: ...

    def mark_cancelled(self, job_id: str, *, lease: str | None = None) -> Job: ...

    def requeue(self, job_id: str, *, lease: str | None = None) -> Job:
        """Hand a running job back (graceful shutdown); it keeps its place by creation time."""

    def recover(self) -> int:
        """At start-up: jobs left running by a process that died are queued again (or end failed with
        ``worker_lost`` past ``max_attempts``). Returns how many. A broker whose leases expire on their
        own (Redis) has nothing to do here."""
