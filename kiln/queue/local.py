"""The embedded broker: jobs in one SQLite file (WAL), safe across threads and processes.

Every state change is one ``BEGIN IMMEDIATE`` transaction that re-reads the row and checks the
state machine, so two API threads, a worker and a ``kiln`` command can share the file. A SIGKILL
loses nothing committed: queued jobs stay queued and running ones are re-queued by
:meth:`SqliteBroker.recover` at the next start.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kiln.errors import IdempotencyConflict, LeaseLost, QueueFull
from kiln.queue.changes import ANY, ChangeFeed
from kiln.queue.job import WORKER_LOST, Job, JobStatus, Priority, check_transition, worker_lost_message
from kiln.sqlite import SqliteStore

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    priority TEXT NOT NULL,
    rank INTEGER NOT NULL,
    payload TEXT NOT NULL,
    key_id TEXT,
    idempotency_key TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    output TEXT,
    result TEXT,
    error_code TEXT,
    error_message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lease TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, rank, created);
CREATE TABLE IF NOT EXISTS idempotency (
    key_id TEXT NOT NULL,
    key TEXT NOT NULL,
    job_id TEXT NOT NULL,
    request_hash TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (key_id, key)
);
"""

# The claim order: rank lowered by one for every `aging` seconds waited (so low never starves),
# then first in, first out. Bound parameters: :now, :aging.
EFFECTIVE_RANK = "MAX(0, rank - CAST((:now - created) / :aging AS INTEGER))"


class SqliteBroker(SqliteStore):
    """:class:`~kiln.queue.base.Broker` on a SQLite file.

    ``aging_seconds``: how long a job waits before it competes one priority higher.
    ``idempotency_ttl``: how long an idempotency key maps to its job (24 h).
    ``max_attempts``: claims a job gets; one left running by a dead worker that often ends failed
    (``worker_lost``) at :meth:`recover` instead of running again.
    ``clock``: seconds since the epoch; tests pass a fake one instead of sleeping.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        aging_seconds: float = 60.0,
        idempotency_ttl: float = 24 * 3600.0,
        max_attempts: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path, SCHEMA)
        self.aging = aging_seconds
        self.idempotency_ttl = idempotency_ttl
        self.max_attempts = max_attempts
        self.clock = clock
        # called with each job this broker ended as worker_lost (webhooks, metrics); must not block
        self.on_lost: Callable[[Job], None] | None = None
        # told of every change this broker makes (SSE streams wait on it instead of polling)
        self.changes: ChangeFeed | None = None
        with self.transaction() as db:  # a database from before leases
            if "lease" not in {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}:
                db.execute("ALTER TABLE jobs ADD COLUMN lease TEXT")

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
        priority = Priority(priority)
        body = json.dumps(payload, separators=(",", ":"))
        now = self.clock()
        with self.transaction() as db:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT job_id, request_hash, created FROM idempotency WHERE key_id = ? AND key = ?",
                    (key_id or "", idempotency_key),
                ).fetchone()
                if row is not None and now - row["created"] < self.idempotency_ttl:
                    if row["request_hash"] != request_hash:
                        raise IdempotencyConflict(
                            "this idempotency_key was already used with a different request", job_id=row["job_id"]
                        )
                    return self._get(db, row["job_id"]), False  # type: ignore[return-value]
            if max_depth is not None:
                (queued,) = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()
                if queued >= max_depth:
                    raise QueueFull(f"the queue is full ({queued} jobs waiting); retry later")
            job_id = "j_" + secrets.token_hex(12)
            db.execute(
                "INSERT INTO jobs (id, status, priority, rank, payload, key_id, idempotency_key, created)"
                " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, priority.value, priority.rank, body, key_id, idempotency_key, now),
            )
            if idempotency_key is not None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency (key_id, key, job_id, request_hash, created) VALUES (?, ?, ?, ?, ?)",
                    (key_id or "", idempotency_key, job_id, request_hash, now),
                )
            job = self._get(db, job_id)
        self._changed(ANY)  # a job of higher priority moves the others back
        return job, True  # type: ignore[return-value]

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._get(self._db, job_id)

    def position(self, job_id: str) -> int | None:
        with self._lock:
            ahead = self._queued_ahead(job_id, "COUNT(*)", "<")
        return None if ahead is None else ahead[0][0] + 1

    def queued_through(self, job_id: str) -> list[dict[str, Any]]:
        """Payloads of the queued jobs claimed before ``job_id``, and its own, in claim order (for ETAs)."""
        with self._lock:
            rows = self._queued_ahead(job_id, "payload", "<=")
        return [json.loads(r["payload"]) for r in rows or []]

    def _queued_ahead(self, job_id: str, select: str, compare: str) -> list[sqlite3.Row] | None:
        """``select`` over the queued jobs whose claim order is ``compare`` that of ``job_id``; None
        if ``job_id`` is not queued. The caller holds the lock."""
        params = {"id": job_id, "now": self.clock(), "aging": self.aging}
        row = self._db.execute(
            f"SELECT {EFFECTIVE_RANK} AS eff, created, id FROM jobs WHERE id = :id AND status = 'queued'", params
        ).fetchone()
        if row is None:
            return None
        return self._db.execute(
            f"SELECT {select} FROM jobs WHERE status = 'queued'"
            f" AND ({EFFECTIVE_RANK}, created, id) {compare} (:eff, :created, :job)",
            {**params, "eff": row["eff"], "created": row["created"], "job": row["id"]},
        ).fetchall()

    def cancel(self, job_id: str) -> Job | None:
        with self.transaction() as db:
            job = self._get(db, job_id)
            if job is None or job.status.terminal:
                return job
            if job.status is JobStatus.QUEUED:
                self._set(db, job, JobStatus.CANCELLED, finished=self.clock())
            else:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            job = self._get(db, job_id)
        self._changed(job_id, ANY)  # the jobs behind a cancelled one move up
        return job

    def depth(self) -> dict[Priority, int]:
        with self._lock:
            rows = self._db.execute("SELECT priority, COUNT(*) AS n FROM jobs WHERE status = 'queued' GROUP BY priority")
            counts = {Priority(r["priority"]): r["n"] for r in rows}
        return {p: counts.get(p, 0) for p in Priority}

    def active_payloads(self) -> list[dict[str, Any]]:
        """Payloads of queued and running jobs (housekeeping keeps what they reference)."""
        with self._lock:
            rows = self._db.execute("SELECT payload FROM jobs WHERE status IN ('queued', 'running')").fetchall()
        return [json.loads(r["payload"]) for r in rows]

    def finished_since(self, since: float) -> list[Job]:
        """Jobs that reached a terminal state at or after ``since`` (for start-up sweeps)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE status IN ('complete', 'failed', 'cancelled') AND finished >= ?", (since,)
            ).fetchall()
            return [self._get(self._db, r["id"]) for r in rows]  # type: ignore[misc]

    # --- worker side -----------------------------------------------------------------------------

    def claim(self, worker_id: str, *, holds: Iterable[str] = ()) -> Job | None:
        """The next job in claim order; ``holds`` is for routing among several workers, which the
        embedded broker (one worker) does not do."""
        now = self.clock()
        with self.transaction() as db:
            row = db.execute(
                f"SELECT id FROM jobs WHERE status = 'queued' ORDER BY {EFFECTIVE_RANK}, created, id LIMIT 1",
                {"now": now, "aging": self.aging},
            ).fetchone()
            if row is None:
                return None
            job = self._get(db, row["id"])
            assert job is not None
            self._set(db, job, JobStatus.RUNNING, started=now, worker_id=worker_id, attempts=job.attempts + 1,
                      lease=secrets.token_hex(8))
            job = self._get(db, job.id)
        self._changed(job.id, ANY)  # every queued job moved up one place
        return job

    def claim_like(self, worker_id: str, batch: str, limit: int) -> list[Job]:
        """Up to ``limit`` queued jobs whose payload's batch signature is ``batch`` (they can share one
        pipeline call with a job this worker just claimed), in claim order, now running here."""
        if limit <= 0:
            return []
        now = self.clock()
        with self.transaction() as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE status = 'queued' AND json_extract(payload, '$.batch') = :batch"
                f" ORDER BY {EFFECTIVE_RANK}, created, id LIMIT :limit",
                {"now": now, "aging": self.aging, "batch": batch, "limit": limit},
            ).fetchall()
            jobs = []
            for row in rows:
                job = self._get(db, row["id"])
                self._set(db, job, JobStatus.RUNNING, started=now, worker_id=worker_id,  # type: ignore[arg-type]
                          attempts=job.attempts + 1, lease=secrets.token_hex(8))  # type: ignore[union-attr]
                jobs.append(self._get(db, row["id"]))
        if jobs:
            self._changed(*(j.id for j in jobs), ANY)
        return jobs  # type: ignore[return-value]

    def report_progress(self, job_id: str, step: int, total_steps: int, *, lease: str | None = None) -> bool:
        with self.transaction() as db:
            if lease is not None:
                self._require(db, job_id, lease)
            db.execute(
                "UPDATE jobs SET step = ?, total_steps = ? WHERE id = ? AND status = 'running'", (step, total_steps, job_id)
            )
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        self._changed(job_id)
        return bool(row and row["cancel_requested"])

    def complete(self, job_id: str, output: str, result: dict[str, Any], *, lease: str | None = None) -> Job:
        return self._finish(job_id, JobStatus.COMPLETE, lease, output=output, result=json.dumps(result))

    def fail(self, job_id: str, code: str, message: str, *, lease: str | None = None) -> Job:
        return self._finish(job_id, JobStatus.FAILED, lease, error_code=code, error_message=message)

    def mark_cancelled(self, job_id: str, *, lease: str | None = None) -> Job:
        return self._finish(job_id, JobStatus.CANCELLED, lease)

    def requeue(self, job_id: str, *, lease: str | None = None) -> Job:
        with self.transaction() as db:
            job = self._require(db, job_id, lease)
            self._set(db, job, JobStatus.QUEUED, started=None, worker_id=None, step=0, total_steps=0, lease=None)
            job = self._get(db, job_id)
        self._changed(job_id, ANY)
        return job  # type: ignore[return-value]

    def recover(self) -> int:
        with self.transaction() as db:
            lost = db.execute(
                "SELECT id FROM jobs WHERE status = 'running' AND attempts >= ?", (self.max_attempts,)
            ).fetchall()
            for row in lost:
                job = self._require(db, row["id"])
                self._set(db, job, JobStatus.FAILED, finished=self.clock(), lease=None, error_code=WORKER_LOST,
                          error_message=worker_lost_message(job.attempts))
            cur = db.execute(
                "UPDATE jobs SET status = 'queued', started = NULL, worker_id = NULL, step = 0, total_steps = 0,"
                " lease = NULL WHERE status = 'running'"
            )
        for row in lost:
            self._lost(row["id"])
        if lost or cur.rowcount:
            self._changed(ANY)
        return cur.rowcount

    def _lost(self, job_id: str) -> None:
        log.warning("job %s stopped its worker %d times; it ends failed (worker_lost)", job_id, self.max_attempts)
        if self.on_lost is not None:
            try:
                self.on_lost(self.get(job_id))  # type: ignore[arg-type]
            except Exception:  # a notification problem must not stop recovery
                log.exception("worker-lost hook failed for job %s", job_id)

    # --- internals -------------------------------------------------------------------------------

    def _finish(self, job_id: str, status: JobStatus, lease: str | None, **fields: Any) -> Job:
        with self.transaction() as db:
            job = self._require(db, job_id, lease)
            self._set(db, job, status, finished=self.clock(), lease=None, **fields)
            job = self._get(db, job_id)
        self._changed(job_id)
        return job  # type: ignore[return-value]

    def _changed(self, *job_ids: str) -> None:
        """Tell the feed, after the transaction committed (a follower woken earlier would read the old row)."""
        if self.changes is not None:
            for job_id in job_ids:
                self.changes.changed(job_id)

    def _require(self, db: sqlite3.Connection, job_id: str, lease: str | None = None) -> Job:
        """The job; with ``lease``, only while that lease is current (else :class:`LeaseLost`)."""
        job = self._get(db, job_id)
        if job is None:
            raise KeyError(job_id)
        if lease is not None and (job.status is not JobStatus.RUNNING or job.lease != lease):
            raise LeaseLost(f"job {job_id}: lease {lease} is no longer current (the job is {job.status})")
        return job

    @staticmethod
    def _set(db: sqlite3.Connection, job: Job, status: JobStatus, **fields: Any) -> None:
        check_transition(job.id, job.status, status)
        columns = ", ".join(f"{name} = ?" for name in fields)
        sql = f"UPDATE jobs SET status = ?{', ' + columns if columns else ''} WHERE id = ? AND status = ?"
        cur = db.execute(sql, (status.value, *fields.values(), job.id, job.status.value))
        assert cur.rowcount == 1, "row changed under an IMMEDIATE transaction"

    @staticmethod
    def _get(db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        return Job(
            id=row["id"],
            status=JobStatus(row["status"]),
            priority=Priority(row["priority"]),
            payload=json.loads(row["payload"]),
            created=row["created"],
            key_id=row["key_id"],
            idempotency_key=row["idempotency_key"],
            started=row["started"],
            finished=row["finished"],
            step=row["step"],
            total_steps=row["total_steps"],
            output=row["output"],
            result=json.loads(row["result"]) if row["result"] else None,
            error_code=row["error_code"],
            error_message=row["error_message"],
            attempts=row["attempts"],
            worker_id=row["worker_id"],
            cancel_requested=bool(row["cancel_requested"]),
            lease=row["lease"],
        )
