"""The scale-out broker: jobs in Redis (7 or newer), shared by every API node and worker.

Job state, idempotency keys, depth and positions all live in Redis, so any API node answers for any
job. Every state change is one Lua script (:mod:`kiln.queue.redis_scripts`), atomic however many
nodes share the server.

How the issue's design maps onto Redis:

- **One stream per priority with a consumer group** (``workers``). A claim appends the job's entry
  and reads it into the worker's pending list in the same script (``XREADGROUP``); the entry stays
  pending while the job runs and is acknowledged (``XACK``, then ``XDEL``) only after the result,
  failure or cancellation is stored. The consumer group's pending lists are exactly the running jobs.
- **Heartbeats**: :meth:`RedisBroker.report_progress` with a lease, and :meth:`RedisBroker.heartbeat`,
  reset the entry's idle time (``XCLAIM`` by its own worker). An entry idle longer than ``lease_s``
  belongs to a worker presumed dead: the next :meth:`RedisBroker.claim` takes it over
  (``XAUTOCLAIM``) with a new lease, so the stale worker's later writes raise
  :class:`~kiln.errors.LeaseLost`. A job taken over when it already had ``max_attempts`` claims ends
  ``failed`` with ``worker_lost`` instead.
- **Order**: queued jobs wait in a sorted set per priority scored by creation time, not in the
  stream, because a stream cannot be reordered and the embedded broker's order needs two things it
  lacks: aging across priorities, and a job handed back (:meth:`requeue`) keeping its place by
  creation time. The claim script compares the three heads by effective rank, creation time and id,
  which is exactly :class:`~kiln.queue.local.SqliteBroker`'s order.

Differences from the embedded broker:

- Jobs taken over from a dead worker are claimed before any queued job (the embedded broker queues
  them again at :meth:`recover` and they usually come first anyway, being older).
- :meth:`recover` does nothing: a dead worker's jobs come back when their lease runs out, not when
  some process restarts (a restarting node cannot tell its own jobs from a live node's).
- Times (creation, aging, idempotency lifetime) come from the caller's clock; lease expiry from the
  Redis server's clock (entry idle time). Clocks of API nodes should agree to well under ``aging``.
- One Redis server (with replicas if you like), not Redis Cluster: scripts touch keys they build.
- Job records are kept, as in the embedded broker; nothing expires them yet.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

from kiln.errors import IdempotencyConflict, LeaseLost, QueueFull
from kiln.queue import redis_scripts as lua
from kiln.queue.job import WORKER_LOST_MESSAGE, Job, JobStatus, Priority, check_transition, effective_rank
from kiln.redis_client import connect, reachable, where_of

log = logging.getLogger(__name__)


_reachable = reachable("the job queue")


class RedisBroker:
    """:class:`~kiln.queue.base.Broker` on a Redis server at ``url`` (``redis://host:6379/0``).

    ``aging_seconds`` and ``idempotency_ttl`` as in :class:`~kiln.queue.local.SqliteBroker`;
    ``lease_s``: how long a worker may go without a heartbeat before its job is given to another;
    ``max_attempts``: claims a job gets before a lost worker fails it (``worker_lost``);
    ``prefix``: the start of every key, so several Kiln installations can share one server;
    ``idle_s`` and ``route_depth``: routing (:mod:`kiln.queue.redis_scripts`).
    """

    def __init__(
        self,
        url: str,
        *,
        aging_seconds: float = 60.0,
        lease_s: float = 30.0,
        max_attempts: int = 3,
        prefix: str = "kiln:",
        idempotency_ttl: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
        idle_s: float = 2.0,
        route_depth: int = 64,
    ) -> None:
        self.prefix = prefix
        # a worker counts as idle (a better fit that others leave its jobs to) this long after an empty
        # claim; workers claim again at least every 0.5 s while idle
        self.idle_s, self.route_depth = idle_s, route_depth
        self.aging, self.lease_s, self.max_attempts = aging_seconds, lease_s, max_attempts
        self.idempotency_ttl, self.clock = idempotency_ttl, clock
        # called with each job this broker ended as worker_lost (webhooks, metrics); must not block
        self.on_lost: Callable[[Job], None] | None = None
        self._r = connect(url)
        self.where = where_of(self._r)  # no password
        self._submit = self._r.register_script(lua.SUBMIT)
        self._claim = self._r.register_script(lua.CLAIM)
        self._claim_like = self._r.register_script(lua.CLAIM_LIKE)
        self._touch = self._r.register_script(lua.TOUCH)
        self._finish_script = self._r.register_script(lua.FINISH)
        self._cancel = self._r.register_script(lua.CANCEL)

    def check(self) -> None:
        """Connect once; ``RuntimeError`` saying why if the server cannot be reached or is older than
        Redis 7 (``XAUTOCLAIM`` as the scripts use it)."""
        try:
            version = self._r.info("server")["redis_version"]
        except redis.RedisError as exc:
            raise RuntimeError(f"cannot reach Redis: {exc}") from exc
        if int(version.split(".")[0]) < 7:
            raise RuntimeError(f"Redis {version} is too old; Kiln needs Redis 7 or newer")

    def close(self) -> None:
        self._r.close()

    # --- API side --------------------------------------------------------------------------------

    @_reachable
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
        job_id = "j_" + secrets.token_hex(12)
        created = repr(self.clock())
        fields = {"id": job_id, "status": JobStatus.QUEUED.value, "priority": priority.value, "created": created,
                  "payload": json.dumps(payload, separators=(",", ":")), "attempts": 0, "step": 0, "total_steps": 0,
                  "cancel_requested": 0, "key_id": key_id, "idempotency_key": idempotency_key,
                  "needs": " ".join(payload.get("needs", ())) or None,  # routing (kiln.worker.routing)
                  "batch": payload.get("batch")}  # which jobs may share a pipeline call (claim_like)
        idem = "" if idempotency_key is None else f"{self.prefix}idem:{key_id or ''}:{idempotency_key}"
        tag, value, *stored = self._submit(args=[
            self.prefix, job_id, priority.value, created, idem,
            "-" if request_hash is None else "h:" + request_hash,  # None and "" differ, as in SQLite
            "" if max_depth is None else max_depth, self.idempotency_ttl, *_pairs(fields),
        ])
        if tag == "conflict":
            raise IdempotencyConflict("this idempotency_key was already used with a different request", job_id=value)
        if tag == "full":
            raise QueueFull(f"the queue is full ({value} jobs waiting); retry later")
        job = _job(_hash(stored[0])) if stored else None
        assert job is not None, f"job {value} vanished right after submit"
        return job, tag == "created"

    @_reachable
    def get(self, job_id: str) -> Job | None:
        return _job(self._r.hgetall(self._key(job_id)))

    @_reachable
    def position(self, job_id: str) -> int | None:
        order = self._claim_order()
        return order.index(job_id) + 1 if job_id in order else None

    @_reachable
    def queued_through(self, job_id: str) -> list[dict[str, Any]]:
        """Payloads of the queued jobs claimed before ``job_id``, and its own, in claim order (for ETAs)."""
        order = self._claim_order()
        if job_id not in order:
            return []
        return [p for p in self._payloads(order[: order.index(job_id) + 1]) if p is not None]

    @_reachable
    def cancel(self, job_id: str) -> Job | None:
        return _job(_hash(self._cancel(args=[self.prefix, job_id, repr(self.clock())])))

    @_reachable
    def depth(self) -> dict[Priority, int]:
        pipe = self._r.pipeline(transaction=False)
        for p in Priority:
            pipe.zcard(f"{self.prefix}queued:{p.value}")
        return dict(zip(Priority, pipe.execute(), strict=True))

    @_reachable
    def active_payloads(self) -> list[dict[str, Any]]:
        """Payloads of queued and running jobs (housekeeping keeps what they reference)."""
        pipe = self._r.pipeline(transaction=False)
        pipe.smembers(f"{self.prefix}running")
        for p in Priority:
            pipe.zrange(f"{self.prefix}queued:{p.value}", 0, -1)
        ids = [i for group in pipe.execute() for i in group]
        return [p for p in self._payloads(ids) if p is not None]

    @_reachable
    def finished_since(self, since: float) -> list[Job]:
        """Jobs that reached a terminal state at or after ``since`` (for start-up sweeps)."""
        ids = self._r.zrangebyscore(f"{self.prefix}finished", since, "+inf")
        pipe = self._r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self._key(i))
        return [job for h in pipe.execute() if (job := _job(h)) is not None]

    @_reachable
    def finished_ids_since(self, since: float) -> list[tuple[str, float]]:
        """``(job id, finish time)`` of jobs that reached a terminal state at or after ``since``, oldest first."""
        return [(i, float(t)) for i, t in self._r.zrangebyscore(f"{self.prefix}finished", since, "+inf",
                                                               withscores=True)]

    @_reachable
    def claim_notice(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Whether ``owner`` sends ``job_id``'s terminal notification: the first node to ask gets it
        (``SET NX``, kept ``ttl_s``) and keeps getting True, every other node False. Several API nodes
        see every finished job; this makes exactly one of them queue its webhook."""
        key = f"{self.prefix}notice:{job_id}"
        return bool(self._r.set(key, owner, nx=True, px=int(ttl_s * 1000))) or self._r.get(key) == owner

    # --- worker side -----------------------------------------------------------------------------

    @_reachable
    def claim(self, worker_id: str, *, holds: Iterable[str] = ()) -> Job | None:
        """The next job, now running here with a new lease: first one whose worker stopped
        heartbeating (past ``lease_s``), else the first queued in claim order that no idle worker
        fits better (``holds``: what this worker has loaded, :mod:`kiln.worker.routing`). With none,
        this worker counts as idle for ``idle_s`` and gets a wake-up (:meth:`wait_for_work`) when a
        job arrives."""
        job_id, lost, fields = self._claim(args=[
            self.prefix, worker_id, repr(self.clock()), self.aging, int(self.lease_s * 1000), self.max_attempts,
            secrets.token_hex(8), WORKER_LOST_MESSAGE, " ".join(holds), int(self.idle_s * 1000), self.route_depth,
        ])
        for lost_id in lost:
            log.warning("job %s stopped its worker %d times; it ends failed (worker_lost)", lost_id, self.max_attempts)
            if self.on_lost is not None:
                try:
                    self.on_lost(self.get(lost_id))  # type: ignore[arg-type]
                except Exception:  # a notification problem must not lose the claimed job
                    log.exception("worker-lost hook failed for job %s", lost_id)
        return _job(_hash(fields)) if job_id else None

    @_reachable
    def claim_like(self, worker_id: str, batch: str, limit: int) -> list[Job]:
        """Up to ``limit`` queued jobs whose batch signature is ``batch`` (they can share one pipeline
        call with a job this worker just claimed), in claim order, now running here, each with its own
        lease."""
        if limit <= 0:
            return []
        taken = self._claim_like(args=[self.prefix, worker_id, repr(self.clock()), self.aging, batch,
                                       self.route_depth, *(secrets.token_hex(8) for _ in range(limit))])
        return [job for flat in taken if (job := _job(_hash(flat))) is not None]

    @_reachable
    def report_progress(self, job_id: str, step: int, total_steps: int, *, lease: str | None = None) -> bool:
        return self._touch_job(job_id, lease, step, total_steps)

    @_reachable
    def heartbeat(self, job_id: str, lease: str) -> bool:
        """Keep the lease of a running job (call every ``lease_s / 3``); returns whether cancellation
        was requested. :class:`~kiln.errors.LeaseLost` if the job is no longer this lease's."""
        return self._touch_job(job_id, lease, None, 0)

    @_reachable
    def complete(self, job_id: str, output: str, result: dict[str, Any], *, lease: str | None = None) -> Job:
        return self._finish(job_id, JobStatus.COMPLETE, lease, output=output, result=json.dumps(result))

    @_reachable
    def fail(self, job_id: str, code: str, message: str, *, lease: str | None = None) -> Job:
        return self._finish(job_id, JobStatus.FAILED, lease, error_code=code, error_message=message)

    @_reachable
    def mark_cancelled(self, job_id: str, *, lease: str | None = None) -> Job:
        return self._finish(job_id, JobStatus.CANCELLED, lease)

    @_reachable
    def requeue(self, job_id: str, *, lease: str | None = None) -> Job:
        return self._finish(job_id, JobStatus.QUEUED, lease)

    def recover(self) -> int:
        """Nothing to do: a dead worker's jobs are taken over by :meth:`claim` once their lease runs out."""
        return 0

    def wake_key(self, worker_id: str) -> str:
        """The list a new job pushes to while ``worker_id`` is idle (for a ``BLPOP`` over several lists)."""
        return f"{self.prefix}wake:{worker_id}"

    @_reachable
    def wait_for_work(self, worker_id: str, timeout_s: float) -> bool:
        """Block until a job was queued or handed back since this worker's last empty :meth:`claim`
        (or :meth:`ring` was called), at most ``timeout_s``; whether that happened."""
        return self._r.blpop([self.wake_key(worker_id)], timeout=max(0.01, timeout_s)) is not None

    @_reachable
    def ring(self, worker_id: str) -> None:
        """End ``worker_id``'s :meth:`wait_for_work` now (it has work that is not in Redis: a sync request)."""
        pipe = self._r.pipeline(transaction=False)
        pipe.rpush(self.wake_key(worker_id), "1")
        pipe.ltrim(self.wake_key(worker_id), -1, -1)
        pipe.pexpire(self.wake_key(worker_id), 60_000)
        pipe.execute()

    @_reachable
    def record_webhook(self, job_id: str, record: dict[str, Any], ttl_s: float = 2 * 24 * 3600.0) -> None:
        """Keep a copy of ``job_id``'s webhook delivery state (the sending node's outbox is the truth),
        so that every API node shows it."""
        self._r.set(f"{self.prefix}webhook:{job_id}", json.dumps(record, separators=(",", ":")), ex=int(ttl_s))

    @_reachable
    def webhook_record(self, job_id: str) -> dict[str, Any] | None:
        raw = self._r.get(f"{self.prefix}webhook:{job_id}")
        return None if raw is None else json.loads(raw)

    @_reachable
    def busy(self, worker_id: str) -> None:
        """``worker_id`` started work the broker does not see (a sync request): it is not idle."""
        self._r.zrem(f"{self.prefix}idle", worker_id)

    @_reachable
    def idle_workers(self) -> dict[str, set[str]]:
        """The workers idle now and what each holds (routing; metrics and tests)."""
        seconds, micros = self._r.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        ids = self._r.zrangebyscore(f"{self.prefix}idle", now_ms, "+inf")
        pipe = self._r.pipeline(transaction=False)
        for w in ids:
            pipe.smembers(f"{self.prefix}holds:{w}")
        return dict(zip(ids, pipe.execute(), strict=True))

    # --- internals -------------------------------------------------------------------------------

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _touch_job(self, job_id: str, lease: str | None, step: int | None, total_steps: int) -> bool:
        tag, value = self._touch(args=[self.prefix, job_id, lease or "", "" if step is None else step, total_steps])
        if tag == "lease_lost":
            raise LeaseLost(f"job {job_id}: lease {lease} is no longer current (the job is {value})")
        return value == "1"

    def _finish(self, job_id: str, status: JobStatus, lease: str | None, **fields: Any) -> Job:
        tag, value = self._finish_script(args=[
            self.prefix, job_id, lease or "", status.value, repr(self.clock()), *_pairs(fields),
        ])
        if tag == "unknown":
            raise KeyError(job_id)
        if tag == "lease_lost":
            raise LeaseLost(f"job {job_id}: lease {lease} is no longer current (the job is {value})")
        if tag == "invalid":
            check_transition(job_id, JobStatus(value), status)  # raises InvalidTransition
        return _job(_hash(value))  # type: ignore[return-value]

    def _claim_order(self) -> list[str]:
        """Ids of the queued jobs in the order :meth:`claim` would take them."""
        pipe = self._r.pipeline(transaction=False)
        for p in Priority:
            pipe.zrange(f"{self.prefix}queued:{p.value}", 0, -1, withscores=True)
        now = self.clock()
        ranked = [
            (effective_rank(p, created, now, self.aging), created, job_id)
            for p, members in zip(Priority, pipe.execute(), strict=True)
            for job_id, created in members
        ]
        return [job_id for _, _, job_id in sorted(ranked)]

    def _payloads(self, ids: Iterable[str]) -> list[dict[str, Any] | None]:
        pipe = self._r.pipeline(transaction=False)
        for i in ids:
            pipe.hget(self._key(i), "payload")
        return [None if raw is None else json.loads(raw) for raw in pipe.execute()]


def _pairs(fields: dict[str, Any]) -> list[Any]:
    """Field/value pairs for HSET, leaving out the None ones (an absent field reads as None)."""
    return [x for name, value in fields.items() if value is not None for x in (name, value)]


def _hash(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _job(h: dict[str, str]) -> Job | None:
    if not h:
        return None

    def when(name: str) -> float | None:
        return float(h[name]) if h.get(name) else None

    return Job(
        id=h["id"],
        status=JobStatus(h["status"]),
        priority=Priority(h["priority"]),
        payload=json.loads(h["payload"]),
        created=float(h["created"]),
        key_id=h.get("key_id"),
        idempotency_key=h.get("idempotency_key"),
        started=when("started"),
        finished=when("finished"),
        step=int(h.get("step", 0)),
        total_steps=int(h.get("total_steps", 0)),
        output=h.get("output"),
        result=json.loads(h["result"]) if h.get("result") else None,
        error_code=h.get("error_code"),
        error_message=h.get("error_message"),
        attempts=int(h.get("attempts", 0)),
        worker_id=h.get("worker_id"),
        cancel_requested=h.get("cancel_requested") == "1",
        lease=h.get("lease"),
    )
