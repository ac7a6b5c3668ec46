"""The broker contract, run against both brokers (embedded SQLite and Redis): ordering, aging, the
state machine, leases, idempotency, limits; and the embedded broker's crash recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from helpers import Clock

from kiln.errors import IdempotencyConflict, LeaseLost, QueueFull
from kiln.queue import InvalidTransition, JobStatus, Priority, SqliteBroker
from kiln.queue.local import SCHEMA


@pytest.fixture
def clock() -> Clock:
    return Clock(1_700_000_000.0)


@pytest.fixture(params=["sqlite", "redis"])
def broker(request, tmp_path, clock):
    if request.param == "sqlite":
        b = SqliteBroker(tmp_path / "jobs.db", aging_seconds=60, clock=clock)
    else:
        from kiln.queue.redis import RedisBroker

        b = RedisBroker(request.getfixturevalue("redis_url"), aging_seconds=60, clock=clock)
    yield b
    b.close()


@pytest.fixture
def sqlite_broker(tmp_path, clock) -> SqliteBroker:
    b = SqliteBroker(tmp_path / "jobs.db", aging_seconds=60, clock=clock)
    yield b
    b.close()


def submit(broker, name, priority=Priority.NORMAL, **kw):
    job, created = broker.submit({"name": name}, priority=priority, **kw)
    assert created
    return job


def claim_names(broker, n):
    return [broker.claim("w").payload["name"] for _ in range(n)]


def test_submit_get_and_unknown(broker):
    job = submit(broker, "a")
    assert job.status is JobStatus.QUEUED and job.id.startswith("j_") and job.attempts == 0
    assert broker.get(job.id) == job
    assert broker.get("j_missing") is None and broker.position("j_missing") is None


def test_priorities_in_order_fifo_within_one(broker, clock):
    for name, prio in [("low1", "low"), ("n1", "normal"), ("h1", "high"), ("n2", "normal"), ("h2", "high")]:
        submit(broker, name, Priority(prio))
        clock.now += 1
    assert [broker.position(j) for j in []] == []
    assert claim_names(broker, 5) == ["h1", "h2", "n1", "n2", "low1"]
    assert broker.claim("w") is None


def test_aging_keeps_low_from_starving(broker, clock):
    old_low = submit(broker, "old-low", Priority.LOW)
    clock.now += 130  # two aging periods: it now competes as high
    submit(broker, "new-high", Priority.HIGH)
    submit(broker, "new-normal", Priority.NORMAL)
    assert broker.position(old_low.id) == 1
    assert claim_names(broker, 3) == ["old-low", "new-high", "new-normal"]


def test_positions_follow_the_claim_order(broker, clock):
    jobs = []
    for prio in ("low", "normal", "high", "normal"):
        jobs.append(submit(broker, prio, Priority(prio)))
        clock.now += 1
    assert [broker.position(j.id) for j in jobs] == [4, 2, 1, 3]
    broker.claim("w")
    assert broker.position(jobs[2].id) is None and broker.position(jobs[1].id) == 1


def test_running_progress_complete(broker, clock):
    job = submit(broker, "a")
    clock.now += 5
    running = broker.claim("worker-1")
    assert running.status is JobStatus.RUNNING and running.worker_id == "worker-1" and running.attempts == 1
    assert running.started - running.created == 5
    assert broker.report_progress(job.id, 3, 10) is False
    assert broker.get(job.id).progress == pytest.approx(0.3)
    done = broker.complete(job.id, "/i/abc.webp", {"seed": 4})
    assert done.status is JobStatus.COMPLETE and done.output == "/i/abc.webp" and done.result == {"seed": 4}
    assert done.finished_at is not None and done.created_at.tzinfo is not None


def test_failed_keeps_code_and_message(broker):
    job = submit(broker, "a")
    broker.claim("w")
    failed = broker.fail(job.id, "out_of_memory", "flux/dev ran out of memory")
    assert (failed.status, failed.error_code, failed.error_message) == (JobStatus.FAILED, "out_of_memory", "flux/dev ran out of memory")


def test_cancel_queued_and_running(broker):
    queued = submit(broker, "q")
    running = submit(broker, "r")
    assert broker.cancel(queued.id).status is JobStatus.CANCELLED
    assert broker.claim("w").id == running.id
    asked = broker.cancel(running.id)
    assert asked.status is JobStatus.RUNNING and asked.cancel_requested
    assert broker.report_progress(running.id, 1, 4) is True
    assert broker.mark_cancelled(running.id).status is JobStatus.CANCELLED
    assert broker.cancel(running.id).status is JobStatus.CANCELLED  # terminal: unchanged
    assert broker.cancel("j_nope") is None
    assert broker.claim("w") is None


@pytest.mark.parametrize("finish", ["complete", "fail", "mark_cancelled"])
def test_terminal_states_never_change(broker, finish):
    job = submit(broker, "a")
    broker.claim("w")
    args = {"complete": ("/i/x.webp", {}), "fail": ("generation_failed", "x"), "mark_cancelled": ()}[finish]
    getattr(broker, finish)(job.id, *args)
    with pytest.raises(InvalidTransition):
        broker.complete(job.id, "/i/y.webp", {})
    with pytest.raises(InvalidTransition):
        broker.requeue(job.id)


def test_queued_job_cannot_complete(broker):
    job = submit(broker, "a")
    with pytest.raises(InvalidTransition, match="queued -> complete"):
        broker.complete(job.id, "/i/x.webp", {})


def test_idempotency(broker, clock):
    first, created = broker.submit({"p": 1}, key_id="k1", idempotency_key="abc", request_hash="h1")
    again, created_again = broker.submit({"p": 1}, key_id="k1", idempotency_key="abc", request_hash="h1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict) as info:
        broker.submit({"p": 2}, key_id="k1", idempotency_key="abc", request_hash="h2")
    assert info.value.job_id == first.id
    other_key, created_other = broker.submit({"p": 1}, key_id="k2", idempotency_key="abc", request_hash="h1")
    assert created_other and other_key.id != first.id
    clock.now += 24 * 3600 + 1
    later, created_later = broker.submit({"p": 2}, key_id="k1", idempotency_key="abc", request_hash="h2")
    assert created_later and later.id != first.id


def test_idempotent_submissions_raced_by_20_clients_make_one_job(tmp_path):
    path = tmp_path / "jobs.db"
    SqliteBroker(path).close()
    ids, errors = [], []

    def client():
        broker = SqliteBroker(path)  # its own connection, as another process would have
        try:
            ids.append(broker.submit({"p": 1}, key_id="k", idempotency_key="race", request_hash="h")[0].id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            broker.close()

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ids) == 20 and len(set(ids)) == 1
    assert sum(SqliteBroker(path).depth().values()) == 1


def test_queue_full(broker):
    submit(broker, "a", max_depth=2)
    submit(broker, "b", max_depth=2)
    with pytest.raises(QueueFull):
        broker.submit({"name": "c"}, max_depth=2)
    broker.claim("w")
    submit(broker, "c", max_depth=2)
    assert broker.depth() == {Priority.HIGH: 0, Priority.NORMAL: 2, Priority.LOW: 0}


def test_requeue_keeps_the_place_by_creation_time(broker, clock):
    a = submit(broker, "a")
    clock.now += 1
    submit(broker, "b")
    broker.claim("w")
    broker.report_progress(a.id, 2, 4)
    assert broker.requeue(a.id).status is JobStatus.QUEUED
    assert broker.position(a.id) == 1
    again = broker.claim("w2")
    assert again.id == a.id and again.attempts == 2 and again.step == 0 and again.worker_id == "w2"


def test_requeue_and_recover(sqlite_broker, clock):
    broker = sqlite_broker
    a = submit(broker, "a")
    clock.now += 1
    b = submit(broker, "b")
    broker.claim("w")
    broker.claim("w")
    assert broker.requeue(a.id).status is JobStatus.QUEUED
    assert broker.recover() == 1  # b was left running
    again = broker.claim("w2")
    assert again.id == a.id and again.attempts == 2 and again.step == 0
    assert broker.get(b.id).status is JobStatus.QUEUED


# --- leases ---------------------------------------------------------------------------------------


def test_every_claim_has_a_fresh_lease_and_an_old_one_is_refused(broker):
    job = submit(broker, "a")
    assert job.lease is None
    first = broker.claim("w1")
    assert first.lease
    assert broker.report_progress(job.id, 1, 4, lease=first.lease) is False
    broker.requeue(job.id, lease=first.lease)
    second = broker.claim("w2")
    assert second.lease and second.lease != first.lease
    for stale in (
        lambda: broker.report_progress(job.id, 3, 4, lease=first.lease),
        lambda: broker.complete(job.id, "/i/stale.webp", {}, lease=first.lease),
        lambda: broker.fail(job.id, "generation_failed", "x", lease=first.lease),
        lambda: broker.mark_cancelled(job.id, lease=first.lease),
        lambda: broker.requeue(job.id, lease=first.lease),
    ):
        with pytest.raises(LeaseLost):
            stale()
    unchanged = broker.get(job.id)
    assert (unchanged.status, unchanged.worker_id, unchanged.lease) == (JobStatus.RUNNING, "w2", second.lease)
    assert unchanged.step == 0
    done = broker.complete(job.id, "/i/new.webp", {"seed": 1}, lease=second.lease)
    assert done.status is JobStatus.COMPLETE and done.output == "/i/new.webp" and done.lease is None
    with pytest.raises(LeaseLost):  # already finished: the same lease is spent
        broker.complete(job.id, "/i/again.webp", {}, lease=second.lease)
    assert broker.get(job.id).output == "/i/new.webp"


def test_a_lease_is_refused_once_the_job_is_recovered(sqlite_broker):
    broker = sqlite_broker
    job = submit(broker, "a")
    lost = broker.claim("dead")
    assert broker.recover() == 1
    assert broker.get(job.id).lease is None
    with pytest.raises(LeaseLost):
        broker.complete(job.id, "/i/late.webp", {}, lease=lost.lease)
    again = broker.claim("w")
    assert broker.complete(job.id, "/i/x.webp", {}, lease=again.lease).status is JobStatus.COMPLETE


def test_a_job_that_keeps_killing_its_worker_ends_worker_lost(tmp_path, clock):
    broker = SqliteBroker(tmp_path / "jobs.db", clock=clock, max_attempts=3)
    told = []
    broker.on_lost = told.append
    doomed = submit(broker, "doomed")
    for attempt in (1, 2, 3):
        assert broker.claim("w").attempts == attempt
        broker.recover()  # the worker died with it
    failed = broker.get(doomed.id)
    assert (failed.status, failed.error_code, failed.attempts) == (JobStatus.FAILED, "worker_lost", 3)
    assert told == [failed]  # webhooks and metrics hear of it
    assert "3 times" in failed.error_message and failed.finished is not None
    fine = submit(broker, "fine")
    assert broker.claim("w").id == fine.id  # the rest still run
    broker.close()


def test_an_old_database_gets_the_lease_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    before_leases = SCHEMA.replace("DEFAULT 0,\n    lease TEXT\n", "DEFAULT 0\n")
    assert "lease" not in before_leases
    db = sqlite3.connect(path)
    db.executescript(before_leases)
    db.execute("INSERT INTO jobs (id, status, priority, rank, payload, created)"
               " VALUES ('j_old', 'queued', 'normal', 1, '{}', 1.0)")
    db.commit()
    db.close()
    broker = SqliteBroker(path)
    job = broker.claim("w")
    assert job.id == "j_old" and job.lease
    broker.close()


CRASHER = r"""
import os, signal, sys
from kiln.queue import SqliteBroker
broker = SqliteBroker(sys.argv[1])
ids = [broker.submit({"n": i})[0].id for i in range(5)]
running = broker.claim("doomed")
broker.report_progress(running.id, 2, 4)
done = broker.claim("doomed")
broker.complete(done.id, "/i/done.webp", {"seed": 1})
print(" ".join(ids), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_loses_nothing(tmp_path):
    path = tmp_path / "jobs.db"
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ids = proc.stdout.split()
    broker = SqliteBroker(path)
    assert broker.recover() == 1
    statuses = [broker.get(i).status for i in ids]
    assert statuses == [JobStatus.QUEUED, JobStatus.COMPLETE, JobStatus.QUEUED, JobStatus.QUEUED, JobStatus.QUEUED]
    assert broker.get(ids[1]).output == "/i/done.webp"
    assert broker.claim("w").id == ids[0]  # the interrupted job runs again, first
    assert os.path.exists(path)
