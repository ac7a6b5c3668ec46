"""The Redis broker beyond the shared contract (tests/test_queue.py runs that against it too):
several API nodes on one server, leases that expire, jobs that kill their workers, the worker's side.

Lease expiry runs on the Redis server's clock, so these tests use a short lease and poll with a
deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import redis
from helpers import until

from kiln.errors import LeaseLost, QueueUnavailable
from kiln.queue import JobStatus, Priority
from kiln.queue.redis import RedisBroker

LEASE_S = 0.3
# workers whose _render is replaced need no engine, only what routing asks of one
NO_ENGINE = SimpleNamespace(loaded=lambda: [], catalog=SimpleNamespace(aliases={}))


@pytest.fixture
def make_broker(redis_url):
    made = []

    def make(**kwargs) -> RedisBroker:
        made.append(RedisBroker(redis_url, **{"lease_s": LEASE_S, **kwargs}))
        return made[-1]

    yield make
    for b in made:
        b.close()


def pending(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return sum(client.xpending(f"kiln:stream:{p.value}", "workers")["pending"]
                   for p in Priority if client.exists(f"kiln:stream:{p.value}"))
    finally:
        client.close()


def test_two_api_nodes_see_the_same_jobs(make_broker, redis_url):
    node_a, node_b = make_broker(), make_broker()
    first, _ = node_a.submit({"n": 1}, key_id="k1", idempotency_key="once", request_hash="h")
    again, created = node_b.submit({"n": 1}, key_id="k1", idempotency_key="once", request_hash="h")
    assert not created and again.id == first.id
    second, _ = node_b.submit({"n": 2}, priority=Priority.HIGH)
    assert node_a.get(second.id) == second and node_a.position(second.id) == 1 and node_a.position(first.id) == 2
    assert node_b.depth() == node_a.depth() == {Priority.HIGH: 1, Priority.NORMAL: 1, Priority.LOW: 0}
    running = node_a.claim("w1")
    assert running.id == second.id and node_b.get(second.id).status is JobStatus.RUNNING
    assert node_b.cancel(second.id).cancel_requested
    assert node_a.report_progress(second.id, 1, 4, lease=running.lease) is True  # the worker hears it
    node_a.mark_cancelled(second.id, lease=running.lease)
    assert pending(redis_url) == 0
    assert sorted(p["n"] for p in node_b.active_payloads()) == [1]
    assert [j.id for j in node_b.finished_since(0)] == [second.id]
    assert node_b.queued_through(first.id) == [{"n": 1}]


def test_idempotent_submissions_raced_across_nodes_make_one_job(make_broker):
    nodes = [make_broker() for _ in range(4)]
    ids, errors = [], []

    def client(node):
        try:
            ids.append(node.submit({"p": 1}, key_id="k", idempotency_key="race", request_hash="h")[0].id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(nodes[i % 4],)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ids) == 20 and len(set(ids)) == 1
    assert sum(nodes[0].depth().values()) == 1


def test_workers_racing_for_jobs_claim_each_exactly_once(make_broker, redis_url):
    submitted = {make_broker().submit({"n": i}, priority=list(Priority)[i % 3])[0].id for i in range(90)}
    claimed: list[str] = []

    def worker(name):
        broker = make_broker()  # its own connection, as another machine would have
        while (job := broker.claim(name)) is not None:
            claimed.append(job.id)
            broker.complete(job.id, f"/i/{job.id}.webp", {}, lease=job.lease)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(submitted) and pending(redis_url) == 0


def test_a_worker_silent_past_its_lease_loses_the_job_and_its_stale_result_is_refused(make_broker, redis_url):
    """The issue's SIGSTOP test at the broker level: the paused worker simply stops calling."""
    broker = make_broker()
    job, _ = broker.submit({"n": 1})
    paused = broker.claim("w1")
    assert broker.claim("w2") is None  # leased, and the lease is young
    deadline = time.monotonic() + 3 * LEASE_S
    while time.monotonic() < deadline:  # a heartbeating worker keeps its job past several leases
        broker.heartbeat(job.id, paused.lease)
        assert broker.claim("w2") is None
        time.sleep(LEASE_S / 6)
    taken = until(lambda: broker.claim("w2"))  # w1 went quiet: w2 gets it once the lease runs out
    assert taken.id == job.id and taken.worker_id == "w2" and taken.lease != paused.lease and taken.attempts == 2
    with pytest.raises(LeaseLost):
        broker.heartbeat(job.id, paused.lease)
    broker.report_progress(job.id, 2, 4, lease=taken.lease)
    done = broker.complete(job.id, "/i/w2.webp", {"by": "w2"}, lease=taken.lease)
    assert done.status is JobStatus.COMPLETE
    with pytest.raises(LeaseLost):  # w1 resumes and reports its (stale) result
        broker.complete(job.id, "/i/w1.webp", {"by": "w1"}, lease=paused.lease)
    assert broker.get(job.id).output == "/i/w2.webp" and broker.get(job.id).result == {"by": "w2"}
    assert pending(redis_url) == 0 and broker.claim("w3") is None


PAUSABLE_WORKER = r"""
import sys, threading
from kiln.errors import LeaseLost, QueueUnavailable
from kiln.queue.redis import RedisBroker

broker = RedisBroker(sys.argv[1], lease_s=float(sys.argv[2]))
job = broker.claim("pausable")
print(job.id, flush=True)
stop = threading.Event()

def beat():
    while not stop.wait(broker.lease_s / 3):
        try:
            broker.heartbeat(job.id, job.lease)
        except LeaseLost:
            return

threading.Thread(target=beat, daemon=True).start()
sys.stdin.readline()  # "store your result now"
try:
    broker.complete(job.id, "/i/stale.webp", {"by": "pausable"}, lease=job.lease)
    print("stored", flush=True)
except LeaseLost:
    print("refused", flush=True)
"""


def test_a_worker_paused_with_sigstop_past_its_lease_has_its_stale_result_refused(make_broker, redis_url):
    """The issue's test with a real process: heartbeats keep the job while it runs; SIGSTOP silences
    them, another worker takes the job over and finishes it; resumed, the paused worker is refused."""
    broker = make_broker()
    job, _ = broker.submit({"n": 1})
    proc = subprocess.Popen([sys.executable, "-c", PAUSABLE_WORKER, redis_url, str(LEASE_S)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == job.id
        deadline = time.monotonic() + 3 * LEASE_S
        while time.monotonic() < deadline:  # running and heartbeating: nobody else gets it
            assert broker.claim("other") is None
            time.sleep(LEASE_S / 6)
        os.kill(proc.pid, signal.SIGSTOP)
        taken = until(lambda: broker.claim("other"))
        assert taken.id == job.id
        broker.complete(job.id, "/i/fresh.webp", {"by": "other"}, lease=taken.lease)
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate("go\n", timeout=30)
        assert out.split() == ["refused"], out
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    assert broker.get(job.id).result == {"by": "other"} and pending(redis_url) == 0


def test_two_api_nodes_serve_one_queue(tmp_path, engine, redis_url):
    """`kiln serve --redis` on two nodes: a job queued on one runs on the other's worker, and either
    answers for it."""
    from api_helpers import StalledWorker, running_server

    body = {"prompt": "a red circle", "modality": "image", "family": "flux", "model": "dev", "task": "t2i",
            "format": "toy-64"}
    with running_server(tmp_path / "a", engine, redis_url=redis_url) as node_a, \
            running_server(tmp_path / "b", engine, redis_url=redis_url, worker=StalledWorker()) as node_b:
        assert isinstance(node_a.services.broker, RedisBroker)
        queued = node_b.client.post("/queue", json=body, headers=node_b.auth)
        assert queued.status_code == 202, queued.text
        done = node_a.wait_for(queued.json()["id"])
        assert done.status is JobStatus.COMPLETE and done.worker_id != "local" and done.lease is None
        answer = node_b.client.get(f"/jobs/{done.id}", headers=node_b.auth, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"].endswith(done.output)
    assert pending(redis_url) == 0


def test_a_wrong_redis_url_stops_start_up(tmp_path):
    from kiln.server import make_broker
    from kiln.settings import Settings, SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"redis_url \(Redis at 127.0.0.1:1/0\): cannot reach Redis"):
        make_broker(Settings(data_dir=tmp_path, redis_url="redis://:secret@127.0.0.1:1/0"))
    with pytest.raises(SettingsError, match="KILN_REDIS_URL=http://x: .*redis://"):
        load_settings(environ={"KILN_REDIS_URL": "http://x"})


def test_redis_out_of_reach_is_queue_unavailable():
    broker = RedisBroker("redis://:secret@127.0.0.1:1/0")
    for call in (lambda: broker.get("j_x"), lambda: broker.submit({}), lambda: broker.claim("w")):
        with pytest.raises(QueueUnavailable, match="Redis at 127.0.0.1:1/0") as info:
            call()
        assert "secret" not in info.value.message
    broker.close()


def test_jobs_whose_202_was_sent_survive_a_redis_crash(durable_redis):
    """With ``appendfsync always`` a SIGKILLed Redis comes back with every acknowledged write: queued
    jobs, the running one with its lease and pending entry, idempotency keys; clients reconnect."""
    broker = RedisBroker(durable_redis.url, lease_s=LEASE_S)
    queued = [broker.submit({"n": i}, key_id="k", idempotency_key=f"i{i}", request_hash="h")[0] for i in range(3)]
    running = broker.claim("w1")
    broker.report_progress(running.id, 2, 4, lease=running.lease)
    durable_redis.kill()
    with pytest.raises(QueueUnavailable):
        broker.get(running.id)
    durable_redis.start()
    back = broker.get(running.id)  # the same client, reconnected
    assert (back.status, back.step, back.lease) == (JobStatus.RUNNING, 2, running.lease)
    assert broker.position(queued[1].id) == 1 and broker.depth()[Priority.NORMAL] == 2
    assert broker.submit({"n": 1}, key_id="k", idempotency_key="i1", request_hash="h") == (queued[1], False)
    broker.complete(running.id, "/i/x.webp", {}, lease=running.lease)
    while (job := broker.claim("w2")) is not None:
        broker.complete(job.id, "/i/y.webp", {}, lease=job.lease)
    assert all(broker.get(j.id).status is JobStatus.COMPLETE for j in queued)
    assert pending(durable_redis.url) == 0
    broker.close()


def test_a_job_that_kills_its_worker_three_times_ends_worker_lost(make_broker, redis_url):
    broker = make_broker(max_attempts=3)
    told = []
    broker.on_lost = told.append
    doomed, _ = broker.submit({"n": "doomed"}, priority=Priority.HIGH)
    assert broker.claim("w1").id == doomed.id
    for attempt in (2, 3):  # each worker dies holding it; the next takes it over
        taken = until(lambda worker=f"w{attempt}": broker.claim(worker))
        assert taken.id == doomed.id and taken.attempts == attempt
    # the third worker died too: the next claim past its lease fails the job instead of running it
    until(lambda: broker.claim("w4") is None and broker.get(doomed.id).status is JobStatus.FAILED)
    rest = [broker.submit({"n": i})[0] for i in range(2)]
    nxt = broker.claim("w4")
    assert nxt.id == rest[0].id
    failed = broker.get(doomed.id)
    assert (failed.status, failed.error_code, failed.attempts) == (JobStatus.FAILED, "worker_lost", 3)
    assert "3 times" in failed.error_message and failed.lease is None
    assert told == [failed]  # webhooks and metrics hear of it
    broker.complete(nxt.id, "/i/a.webp", {}, lease=nxt.lease)
    last = broker.claim("w4")
    broker.complete(last.id, "/i/b.webp", {}, lease=last.lease)
    assert pending(redis_url) == 0
    assert {j.id: j.status for j in broker.finished_since(0)} == {
        doomed.id: JobStatus.FAILED, rest[0].id: JobStatus.COMPLETE, rest[1].id: JobStatus.COMPLETE,
    }


def test_requeue_acknowledges_the_entry_and_the_job_keeps_its_place(make_broker, redis_url):
    broker = make_broker()
    old, _ = broker.submit({"n": "old"}, priority=Priority.LOW)
    newer, _ = broker.submit({"n": "newer"}, priority=Priority.LOW)
    running = broker.claim("w1")
    assert running.id == old.id and pending(redis_url) == 1
    broker.requeue(old.id, lease=running.lease)
    assert pending(redis_url) == 0 and broker.position(old.id) == 1 and broker.position(newer.id) == 2
    assert broker.claim("w2").id == old.id


def test_a_worker_that_lost_its_job_drops_its_result(make_broker, tmp_path, monkeypatch):
    """The worker's side: its writes carry the lease; LeaseLost means 'another worker owns it now'."""
    from kiln.storage import LocalAssetStore
    from kiln.worker import runner

    broker, other_node = make_broker(), make_broker()
    release, started = threading.Event(), threading.Event()
    finished: list = []

    class Slow(runner.Worker):
        def _render(self, request, **kwargs):
            started.set()
            release.wait(30)
            return runner.Rendered(request, _Result(), [])

    monkeypatch.setattr("kiln.worker.jobs.from_payload", lambda payload, store: payload)
    worker = Slow(engine=NO_ENGINE, broker=broker, store=LocalAssetStore(tmp_path / "assets"), worker_id="w1")
    worker.on_terminal = finished.append
    job, _ = broker.submit({"n": 1})
    worker.start()
    try:
        assert started.wait(10)
        running = broker.get(job.id)
        other_node.requeue(job.id)  # as if w1 had been presumed dead...
        taken = other_node.claim("w2")  # ...and w2 took the job over
        release.set()
        until(lambda: worker.current_job is None)
        assert broker.get(job.id).status is JobStatus.RUNNING and broker.get(job.id).worker_id == "w2"
        assert finished == [] and taken.lease != running.lease
        # the worker carries on with the next job
        nxt, _ = broker.submit({"n": 2})
        worker.wake()
        until(lambda: broker.get(nxt.id).status is JobStatus.COMPLETE)
        assert [j.id for j in finished] == [nxt.id]
    finally:
        release.set()
        worker.stop()


def test_the_worker_heartbeats_through_a_step_longer_than_the_lease(make_broker, tmp_path, monkeypatch):
    from kiln.storage import LocalAssetStore
    from kiln.worker import runner

    broker, other_node = make_broker(), make_broker()
    release, started = threading.Event(), threading.Event()

    class LongStep(runner.Worker):
        def _render(self, request, **kwargs):
            started.set()
            release.wait(30)  # no progress reports meanwhile
            return runner.Rendered(request, _Result(), [])

    monkeypatch.setattr("kiln.worker.jobs.from_payload", lambda payload, store: payload)
    worker = LongStep(engine=NO_ENGINE, broker=broker, store=LocalAssetStore(tmp_path / "assets"), worker_id="w1")
    job, _ = broker.submit({"n": 1})
    worker.start()
    try:
        assert started.wait(10)
        deadline = time.monotonic() + 4 * LEASE_S
        while time.monotonic() < deadline:
            assert other_node.claim("w2") is None  # the heartbeat thread keeps the lease
            time.sleep(LEASE_S / 6)
        release.set()
        until(lambda: broker.get(job.id).status is JobStatus.COMPLETE)
        assert broker.get(job.id).worker_id == "w1" and broker.get(job.id).attempts == 1
    finally:
        release.set()
        worker.stop()


class _Result:
    seed, elapsed_ms, width, height, model, steps, num_frames = 1, 1.0, 8, 8, "toy", 1, None
    upscale = latent_upscale = detail_strength = None
    outputs = ()
