"""``kiln worker`` as a real process beside an in-process API node with no worker of its own
(``local_worker`` off): jobs queued at the API run in the worker and are served by the API's CDN;
SIGTERM hands back or finishes the job in hand and exits 0; webhooks of jobs finished elsewhere are
sent once across API nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from helpers import free_port
from api_helpers import Receiver, running_server

from kiln.settings import Settings, SettingsError, load_settings

pytestmark = pytest.mark.slow


class WorkerProcess:
    """``python -m kiln worker`` on the toy catalog; ready when its /readyz says so."""

    def __init__(self, catalog_file, data_dir, redis_url, **env) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln", "--catalog", str(catalog_file), "worker", "--redis", redis_url,
             "--data-dir", str(data_dir), "--port", str(self.port)],
            env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "worker did not become ready"
            time.sleep(0.05)  # polling for start-up, not timing the test

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=90)
        self.log = self.proc.stderr.read().decode()
        return code


def queue_body(**extra):
    return {"modality": "image", "family": "flux", "model": "dev", "task": "t2i", "format": "toy-96x64",
            "prompt": "a red circle", **extra}


@pytest.fixture
def receiver():
    r = Receiver(fail_first=0)
    yield r
    r.close()


def test_jobs_queued_at_a_workerless_api_node_run_in_kiln_worker(tmp_path, engine, catalog_file, redis_url, receiver):
    with running_server(tmp_path, engine, redis_url=redis_url, local_worker=False, allow_private_fetch=True,
                        sync_wait_s=60.0) as srv:
        # no worker here: a sync request is refused at once, not after sync_wait_s
        started = time.monotonic()
        sync = srv.client.post("/image/flux/dev/t2i?format=toy-96x64", json={"prompt": "a red circle"},
                               headers=srv.auth)
        assert sync.status_code == 503 and sync.json()["error"] == "capacity_exhausted", sync.text
        assert int(sync.headers["retry-after"]) >= 1 and time.monotonic() - started < 10
        assert srv.client.get("/readyz").status_code == 200  # ready to queue

        worker = WorkerProcess(catalog_file, tmp_path / "data", redis_url)
        try:
            assert httpx.get(f"{worker.base}/healthz").json() == {"status": "ok"}
            ready = httpx.get(f"{worker.base}/readyz").json()
            assert ready["model_loaded"] and ready["broker"]
            ids = [srv.client.post("/queue", json=queue_body(steps=15, seed=i, webhook=receiver.url),
                                   headers=srv.auth).json()["id"] for i in range(3)]
            for job_id in ids:
                job = srv.wait_for(job_id)
                assert job.status.value == "complete", job
                assert job.worker_id and job.worker_id.endswith(f":{worker.proc.pid}")
                done = srv.client.get(f"/jobs/{job_id}", headers=srv.auth, follow_redirects=False)
                assert done.status_code == 303
                image = srv.client.get(done.headers["location"])  # written by the worker, served by the API
                assert image.status_code == 200 and image.headers["content-type"] == "image/webp"
            # the job finished on another process: the API node's watch sends its webhook, once each
            srv.wait_for(ids[-1], until=lambda _: len(receiver.calls) >= 3)
            assert sorted(json.loads(body)["id"] for _, body, _ in receiver.calls) == sorted(ids)
            metrics = httpx.get(f"{worker.base}/metrics").text
            assert 'kiln_worker_jobs_total{status="complete"} 3.0' in metrics
            assert "kiln_worker_busy 0.0" in metrics and "kiln_worker_ready 1.0" in metrics
        finally:
            assert worker.stop() == 0, worker.log


def test_sigterm_hands_the_job_back_and_exits_0(tmp_path, engine, catalog_file, redis_url):
    with running_server(tmp_path, engine, redis_url=redis_url, local_worker=False) as srv:
        worker = WorkerProcess(catalog_file, tmp_path / "data", redis_url, KILN_SHUTDOWN_GRACE_S="0")
        try:
            job_id = srv.client.post("/queue", json=queue_body(steps=50, seed=1), headers=srv.auth).json()["id"]
            srv.wait_for(job_id, until=lambda j: j.status.value == "running" and j.step >= 1)
            assert httpx.get(f"{worker.base}/metrics").text.count(f'kiln_worker_current_job{{job_id="{job_id}"}} 1.0')
        finally:
            assert worker.stop() == 0, worker.log
        job = srv.services.broker.get(job_id)
        assert job.status.value in ("queued", "complete"), job  # grace 0: handed back unless it had just ended
        if job.status.value == "queued":
            # another worker takes it from the queue and finishes it
            again = WorkerProcess(catalog_file, tmp_path / "data", redis_url)
            try:
                assert srv.wait_for(job_id, timeout=120).status.value == "complete"
            finally:
                assert again.stop(signal.SIGINT) == 0, again.log


def test_sigterm_within_the_grace_period_finishes_the_job(tmp_path, engine, catalog_file, redis_url):
    with running_server(tmp_path, engine, redis_url=redis_url, local_worker=False) as srv:
        worker = WorkerProcess(catalog_file, tmp_path / "data", redis_url, KILN_SHUTDOWN_GRACE_S="60")
        try:
            job_id = srv.client.post("/queue", json=queue_body(steps=50, seed=2), headers=srv.auth).json()["id"]
            srv.wait_for(job_id, until=lambda j: j.status.value == "running" and j.step >= 1)
        finally:
            assert worker.stop() == 0, worker.log
        assert srv.services.broker.get(job_id).status.value == "complete"


def test_finished_jobs_webhooks_are_sent_by_exactly_one_api_node(tmp_path, engine, redis_url, receiver):
    """Jobs finished by a remote worker (here: the broker's worker calls, made by the test) are seen by
    both API nodes' watches; each webhook is queued by one node only."""
    from kiln.queue.redis import RedisBroker

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    with running_server(a_dir, engine, redis_url=redis_url, local_worker=False, allow_private_fetch=True) as a, \
            running_server(b_dir, engine, redis_url=redis_url, local_worker=False, allow_private_fetch=True) as b:
        ids = [n.client.post("/queue", json=queue_body(webhook=receiver.url), headers=n.auth).json()["id"]
               for n in (a, b) for _ in range(5)]
        remote = RedisBroker(redis_url)
        for _ in ids:
            job = remote.claim("remote:1")
            remote.complete(job.id, "/i/none.webp", {"outputs": ["/i/none.webp"]}, lease=job.lease)
        a.wait_for(ids[-1], until=lambda _: len(receiver.calls) >= len(ids))
        queued_a = [i for i in ids if a.services.outbox.state_for_job(i)]
        queued_b = [i for i in ids if b.services.outbox.state_for_job(i)]
        assert sorted(queued_a + queued_b) == sorted(ids)  # each job's webhook in exactly one outbox
        assert sorted(json.loads(body)["id"] for _, body, _ in receiver.calls) == sorted(ids)
        # either node shows each delivery, whichever node sent it (keys live in Redis: a's key works on b)
        for job_id, owner in zip(ids, [a] * 5 + [b] * 5, strict=True):
            for node in (a, b):
                node.wait_for(job_id, until=lambda j, node=node, owner=owner: node.client.get(
                    f"/jobs/{j.id}", headers=owner.auth, follow_redirects=False).json()["webhook"]["state"] == "delivered")
        remote.close()


def test_a_node_with_its_own_worker_claims_its_jobs_webhooks_too(tmp_path, engine, redis_url, receiver):
    from kiln.api.finished import FinishedWatch, node_name

    with running_server(tmp_path, engine, redis_url=redis_url, allow_private_fetch=True) as srv:
        job_id = srv.client.post("/queue", json=queue_body(steps=15, webhook=receiver.url), headers=srv.auth).json()["id"]
        assert receiver.done.wait(60)
        # another node's sweep finds the claim taken; this node's own (after a restart) queues nothing new
        assert FinishedWatch(srv.services, "elsewhere:/data").sweep() == 0
        assert FinishedWatch(srv.services, node_name(srv.services.settings)).sweep() == 1
        assert len(srv.services.outbox.state_for_job(job_id)) == 1
        srv.wait_for(job_id, until=lambda j: srv.services.outbox.state_for_job(j.id)[-1].state.value == "delivered")
    assert [json.loads(body)["id"] for _, body, _ in receiver.calls] == [job_id]


def test_worker_without_redis_exits_2_with_a_clear_message(tmp_path, catalog_file):
    env = {k: v for k, v in os.environ.items() if k != "KILN_REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "kiln", "--catalog", str(catalog_file), "worker", "--data-dir", str(tmp_path)],
        env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 2 and "--redis" in done.stderr and "KILN_REDIS_URL" in done.stderr, done.stderr


def test_no_local_worker_needs_redis():
    with pytest.raises(SettingsError, match=r"needs redis_url \(--redis\)"):
        load_settings({"local_worker": False}, environ={})
    assert not Settings(local_worker=False, redis_url="redis://127.0.0.1:6379/0").local_worker


def test_an_api_node_and_a_worker_ride_out_a_redis_restart(tmp_path, engine, catalog_file, durable_redis):
    """Redis (append-only, fsync always) SIGKILLed mid-run and started again: the API node answers 503
    while it is down, both processes reconnect on their own, and every job whose 202 was sent completes."""
    with running_server(tmp_path, engine, redis_url=durable_redis.url, local_worker=False, lease_s=2.0) as srv:
        worker = WorkerProcess(catalog_file, tmp_path / "data", durable_redis.url, KILN_LEASE_S="2")
        try:
            def submit(i: int):
                return srv.client.post("/queue", json=queue_body(steps=15, seed=i), headers=srv.auth)

            accepted = []
            for i in range(8):
                r = submit(i)
                assert r.status_code == 202, r.text
                accepted.append(r.json()["id"])
            srv.wait_for(accepted[0], until=lambda j: j.status.value != "queued")  # the worker is at work
            durable_redis.kill()
            down = submit(99)
            assert down.status_code == 503 and down.json()["error"] == "queue_unavailable", down.text
            assert srv.client.get(f"/jobs/{accepted[0]}", headers=srv.auth).status_code == 503
            durable_redis.start()
            for i in range(8, 12):
                r = submit(i)
                assert r.status_code == 202, r.text
                accepted.append(r.json()["id"])
            for job_id in accepted:
                job = srv.wait_for(job_id, timeout=120)
                assert job.status.value == "complete", (job_id, job.error_code, job.error_message)
            assert worker.proc.poll() is None  # it rode it out
            assert httpx.get(f"{worker.base}/readyz").status_code == 200
        finally:
            assert worker.stop() == 0, worker.log
