"""The webhook outbox: one row per message, kept in SQLite until it is delivered or given up on.

::

    pending ──▶ delivered      (a 2xx answer)
       └──────▶ failed         (refused before sending, or still failing 24 h after the first attempt)

Both end states are final. Each failed attempt (timeout, connection or TLS error, any non-2xx
answer, 3xx included) moves ``next_attempt_at`` along the schedule — by default 5 s, 30 s, 2 min,
10 min, 30 min, 1 h, then every 2 h, each stretched by up to ``jitter`` (20 %) so receivers that come
back are not hit by every sender at once — until an attempt fails ``give_up_after`` (24 h) or more
after the first one. Delays never shrink below the schedule, so a message is retried for at least
that long.

Secrets are not stored here. A row keeps ``secret_ref`` (the id of the API key that submitted the
job) and the dispatcher resolves it to the key's current secret(s) at every attempt, so a rotation
applies to retries already queued, a revoked key's secret is not left behind in this table, and
the database holds one copy of each secret (in the key store) instead of one per message.

Enqueueing is idempotent per ``(job_id, url)``: a job reaches a terminal state once, and a caller
that is unsure whether its enqueue committed (a crash, a retried hook) may simply enqueue again.
The message id is derived from the pair, so even two outboxes (two API nodes that both saw the
job end) send the same ``webhook-id``, and the receiver's deduplication drops the second.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kiln.sqlite import SqliteStore

log = logging.getLogger(__name__)

DEFAULT_SCHEDULE: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200)
GIVE_UP_AFTER = 24 * 3600.0
MAX_URL_LENGTH = 2048

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    msg_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    secret_ref TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    first_attempt_at REAL,
    last_attempt_at REAL,
    next_attempt_at REAL,
    last_status TEXT,
    last_error TEXT,
    delivered_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS webhook_deliveries_by_job ON webhook_deliveries (job_id, url);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
"""


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


def validate_webhook_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host; ``ValueError`` saying what is wrong otherwise.

    Syntax only: whether the address may be contacted (SSRF) is the dispatcher's ``check_url``.
    The API should call this when a job is submitted, so a bad URL is a 4xx then, not a failed
    delivery later.
    """
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise ValueError(f"webhook URL is malformed: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("webhook URL must not carry credentials; verify the webhook-signature header instead")
    return url


def message_id(job_id: str, url: str) -> str:
    """The ``webhook-id`` of a job's message to ``url``: ``msg_`` and 24 hex digits of a SHA-256."""
    return "msg_" + hashlib.sha256(f"{job_id}\n{url}".encode()).hexdigest()[:24]


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True)
class Delivery:
    """A snapshot of one outbox row. ``last_status`` is the HTTP code as text ("500") or an error name."""

    msg_id: str
    job_id: str
    url: str
    body: bytes = field(repr=False)
    secret_ref: str = field(repr=False)
    state: DeliveryState
    attempts: int
    created: float
    first_attempt_at: float | None = None
    last_attempt_at: float | None = None
    next_attempt_at: float | None = None
    last_status: str | None = None
    last_error: str | None = None
    delivered_at: float | None = None

    def record(self) -> dict[str, Any]:
        """The delivery's state as plain JSON values (no body, no secret reference): what other API
        nodes read to show it (:meth:`~kiln.queue.redis.RedisBroker.record_webhook`)."""
        return {"msg_id": self.msg_id, "state": self.state.value, "attempts": self.attempts,
                "last_status": self.last_status, "last_error": self.last_error,
                "next_attempt_at": self.next_attempt_at, "delivered_at": self.delivered_at}

    def summary(self) -> dict[str, Any]:
        """What a job's owner may see (``GET /jobs/{id}``): no body, no secret reference. Times are UTC datetimes."""
        return {
            "id": self.msg_id,
            "url": self.url,
            "state": self.state.value,
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "last_attempt_at": _dt(self.last_attempt_at),
            "next_attempt_at": _dt(self.next_attempt_at),
            "delivered_at": _dt(self.delivered_at),
        }


class Outbox(SqliteStore):
    """Webhook messages in a SQLite file (WAL), safe across threads and processes.

    ``schedule``: seconds to wait after the 1st, 2nd, … failed attempt; the last entry repeats.
    ``jitter``: each wait is stretched by a random fraction in ``[0, jitter)``.
    ``give_up_after``: an attempt that fails this long after the first attempt is the last.
    ``clock`` and ``rng``: tests pass fakes instead of sleeping.
    The file may be the server's own database (separate tables) or a file of its own.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        jitter: float = 0.2,
        give_up_after: float = GIVE_UP_AFTER,
        rng: random.Random | None = None,
    ) -> None:
        if not schedule or any(s <= 0 for s in schedule) or any(b < a for a, b in itertools.pairwise(schedule)):
            raise ValueError(f"schedule must be positive delays that never decrease, not {tuple(schedule)}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter is a fraction between 0 and 1, not {jitter}")
        super().__init__(path, SCHEMA)
        self.clock = clock
        self.schedule = tuple(float(s) for s in schedule)
        self.jitter = jitter
        self.give_up_after = give_up_after
        self._rng = rng or random.Random()
        self._listeners: list[Callable[[], None]] = []
        # told of every message's state after each change (enqueued, attempted): with Redis, other API
        # nodes show a job's webhook from this copy
        self.mirror: Callable[[Delivery], None] | None = None

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (from the enqueuing thread, after the commit) whenever a message is enqueued."""
        self._listeners.append(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    # --- the API side ----------------------------------------------------------------------------

    def enqueue(self, job_id: str, url: str, body: bytes, secret_ref: str) -> Delivery:
        """Add a message, due now; the existing one if this job already has one for this URL.

        Only a database insert: safe to call from the GPU worker's thread. ``body`` is sent byte for
        byte; ``secret_ref`` is what the dispatcher's ``secret_for`` resolves (an API key id).
        """
        validate_webhook_url(url)
        msg_id = message_id(job_id, url)
        now = self.clock()
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO webhook_deliveries (msg_id, job_id, url, body, secret_ref, state, created,"
                " next_attempt_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                (msg_id, job_id, url, bytes(body), secret_ref, now, now),
            )
            row = db.execute("SELECT * FROM webhook_deliveries WHERE msg_id = ?", (msg_id,)).fetchone()
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:  # the row is committed; a listener's failure must not undo the caller's work
                log.exception("webhook outbox listener failed")
        return self._mirrored(_delivery(row))

    def _mirrored(self, delivery: Delivery) -> Delivery:
        if self.mirror is not None:
            try:
                self.mirror(delivery)
            except Exception:  # the outbox is the truth; a copy that failed is refreshed at the next change
                log.warning("could not share webhook %s's state with other nodes", delivery.msg_id, exc_info=True)
        return delivery

    def state_for_job(self, job_id: str) -> list[Delivery]:
        """The job's messages, oldest first (one per webhook URL); ``summary()`` each for ``GET /jobs/{id}``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM webhook_deliveries WHERE job_id = ? ORDER BY created, rowid", (job_id,)
            ).fetchall()
        return [_delivery(r) for r in rows]

    def get(self, msg_id: str) -> Delivery | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM webhook_deliveries WHERE msg_id = ?", (msg_id,)).fetchone()
        return None if row is None else _delivery(row)

    def purge(self, before: float) -> int:
        """Delete delivered and failed messages created before ``before``; the number deleted."""
        with self.transaction() as db:
            cur = db.execute("DELETE FROM webhook_deliveries WHERE state != 'pending' AND created < ?", (before,))
            return cur.rowcount

    # --- the dispatcher side ---------------------------------------------------------------------

    def due(self, now: float | None = None, limit: int | None = None) -> list[Delivery]:
        """Pending messages whose next attempt is at or before ``now``, most overdue first."""
        now = self.clock() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, created, rowid LIMIT ?",
                (now, -1 if limit is None else limit),
            ).fetchall()
        return [_delivery(r) for r in rows]

    def claim(self, now: float | None = None, *, limit: int, lease: float) -> list[Delivery]:
        """Take up to ``limit`` due messages for one attempt each, atomically.

        Their next attempt moves ``lease`` seconds ahead, so no other round (or process) sends them
        meanwhile, and an attempt cut short by a crash is retried once the lease runs out.
        """
        now = self.clock() if now is None else now
        with self.transaction() as db:
            rows = db.execute(
                "SELECT * FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, created, rowid LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE webhook_deliveries SET next_attempt_at = ? WHERE msg_id = ?",
                [(now + lease, r["msg_id"]) for r in rows],
            )
        return [_delivery(r) for r in rows]

    def next_due_at(self) -> float | None:
        """When the earliest pending message is due (possibly in the past); None when none is pending."""
        with self._lock:
            (at,) = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending'"
            ).fetchone()
        return at

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt: the schedule's entry, jittered."""
        base = self.schedule[min(max(attempts, 1), len(self.schedule)) - 1]
        return base * (1.0 + self.jitter * self._rng.random())

    def record_attempt(
        self,
        msg_id: str,
        status_code: int | None = None,
        error: str | None = None,
        *,
        detail: str | None = None,
        permanent: bool = False,
    ) -> Delivery:
        """Record one attempt's outcome and decide what happens next.

        A 2xx ``status_code`` (and no ``error``) delivers the message. Anything else is a failure:
        ``status_code`` for an answer that was not 2xx, or ``error`` (a short name such as
        ``"timeout"``) when no answer came; ``detail`` is the human-readable reason. A failure is
        retried per the schedule unless ``permanent`` or the first attempt is ``give_up_after`` old.
        A message that is no longer pending is returned unchanged.
        """
        now = self.clock()
        with self.transaction() as db:
            row = db.execute("SELECT * FROM webhook_deliveries WHERE msg_id = ?", (msg_id,)).fetchone()
            if row is None:
                raise KeyError(msg_id)
            current = _delivery(row)
            if current.state is not DeliveryState.PENDING:
                return current
            attempts = current.attempts + 1
            first = current.first_attempt_at if current.first_attempt_at is not None else now
            ok = status_code is not None and 200 <= status_code < 300 and error is None
            fields: dict[str, Any] = {
                "attempts": attempts,
                "first_attempt_at": first,
                "last_attempt_at": now,
                "last_status": str(status_code) if status_code is not None else (error or "error"),
                "last_error": None if ok else (detail or error or f"HTTP {status_code}"),
            }
            if ok:
                fields |= {"state": DeliveryState.DELIVERED.value, "delivered_at": now, "next_attempt_at": None}
            elif permanent or now - first >= self.give_up_after:
                fields |= {"state": DeliveryState.FAILED.value, "next_attempt_at": None}
            else:
                fields["next_attempt_at"] = now + self.backoff(attempts)
            columns = ", ".join(f"{name} = ?" for name in fields)
            db.execute(
                f"UPDATE webhook_deliveries SET {columns} WHERE msg_id = ? AND state = 'pending'",
                (*fields.values(), msg_id),
            )
            row = db.execute("SELECT * FROM webhook_deliveries WHERE msg_id = ?", (msg_id,)).fetchone()
        return self._mirrored(_delivery(row))


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        msg_id=row["msg_id"],
        job_id=row["job_id"],
        url=row["url"],
        body=bytes(row["body"]),
        secret_ref=row["secret_ref"],
        state=DeliveryState(row["state"]),
        attempts=row["attempts"],
        created=row["created"],
        first_attempt_at=row["first_attempt_at"],
        last_attempt_at=row["last_attempt_at"],
        next_attempt_at=row["next_attempt_at"],
        last_status=row["last_status"],
        last_error=row["last_error"],
        delivered_at=row["delivered_at"],
    )
