"""Routing in the Redis broker: jobs and sync requests go to a free worker that already holds their
model (and LoRAs) when there is one, to any worker otherwise; idle workers are woken, not polled."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import until

from kiln.queue import JobStatus, Priority
from kiln.queue.redis import RedisBroker
from kiln.queue.redis_sync import RedisSyncChannel
from kiln.worker.routing import holdings, needs_of

A_LORA, B_LORA = "a" * 64, "b" * 64


def payload(model: str, *loras: str) -> dict:
    family, name = model.split("/")
    request = {"family": family, "model": name, "loras": [{"sha256": s, "weight": 1.0} for s in loras]}
    return {"request": request, "needs": needs_of(request)}


@pytest.fixture
def broker(redis_url):
    b = RedisBroker(redis_url, idle_s=2.0)
    yield b
    b.close()


def test_needs_and_holdings_speak_the_same_names():
    request = {"family": "flux", "model": "fast", "loras": [{"sha256": A_LORA}]}
    assert needs_of(request) == ["m:flux/fast", f"l:{A_LORA}"]
    held = holdings(["flux/schnell"], {"fast": "flux/schnell", "turbo": "zimage/turbo"}, [A_LORA])
    assert held == ["m:flux/schnell", "m:flux/fast", f"l:{A_LORA}"]  # an alias of a loaded model counts


def test_a_job_goes_to_the_idle_worker_that_holds_its_model(broker):
    assert broker.claim("wa", holds=["m:flux/a"]) is None  # both idle now
    assert broker.claim("wb", holds=["m:flux/b"]) is None
    assert set(broker.idle_workers()) == {"wa", "wb"}
    job, _ = broker.submit(payload("flux/b"))
    assert broker.claim("wa", holds=["m:flux/a"]) is None  # left for wb
    taken = broker.claim("wb", holds=["m:flux/b"])
    assert taken.id == job.id and taken.worker_id == "wb"
    assert set(broker.idle_workers()) == {"wa"}  # wb is busy


def test_with_the_holder_busy_any_worker_takes_the_job(broker):
    broker.claim("wb", holds=["m:flux/b"])  # idle...
    first, _ = broker.submit(payload("flux/b"))
    assert broker.claim("wb", holds=["m:flux/b"]).id == first.id  # ...and busy with it
    second, _ = broker.submit(payload("flux/b"))
    assert broker.claim("wa", holds=["m:flux/a"]).id == second.id  # it will load flux/b


def test_a_worker_that_went_quiet_while_idle_stops_counting(redis_url):
    broker = RedisBroker(redis_url, idle_s=0.3)
    try:
        broker.claim("wb", holds=["m:flux/b"])  # idle, then dies without claiming again
        job, _ = broker.submit(payload("flux/b"))
        assert broker.claim("wa", holds=["m:flux/a"]) is None
        taken = until(lambda: broker.claim("wa", holds=["m:flux/a"]))
        assert taken.id == job.id
    finally:
        broker.close()


def test_a_worker_skips_jobs_another_fits_better_and_takes_the_next(broker):
    broker.claim("wb", holds=["m:flux/b"])
    broker.claim("wa", holds=["m:flux/a"])
    for_b, _ = broker.submit(payload("flux/b"), priority=Priority.HIGH)
    for_a, _ = broker.submit(payload("flux/a"))
    assert broker.claim("wa", holds=["m:flux/a"]).id == for_a.id
    assert broker.claim("wb", holds=["m:flux/b"]).id == for_b.id


def test_the_worker_with_the_loras_cached_fits_better(broker):
    broker.claim("plain", holds=["m:flux/dev"])
    broker.claim("styled", holds=["m:flux/dev", f"l:{A_LORA}"])
    styled, _ = broker.submit(payload("flux/dev", A_LORA))
    assert broker.claim("plain", holds=["m:flux/dev"]) is None
    assert broker.claim("styled", holds=["m:flux/dev", f"l:{A_LORA}"]).id == styled.id
    other, _ = broker.submit(payload("flux/dev", B_LORA))  # nobody has B: both fit 1, the first to ask takes it
    assert broker.claim("plain", holds=["m:flux/dev"]).id == other.id


def test_jobs_without_needs_go_to_anyone(broker):
    broker.claim("wb", holds=["m:flux/b"])
    job, _ = broker.submit({"request": {}})
    assert broker.claim("wa", holds=["m:flux/a"]).id == job.id


def test_a_new_job_wakes_idle_workers_at_once(broker):
    assert broker.claim("wa", holds=["m:flux/a"]) is None
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(broker.wait_for_work("wa", 30.0)))
    waiter.start()
    started = time.monotonic()
    broker.submit(payload("flux/a"))
    waiter.join(30)
    assert woke == [True] and time.monotonic() - started < 10.0
    # a bell rung before the wait began is not lost
    broker.claim("wa", holds=["m:flux/a"])
    broker.claim("wa", holds=["m:flux/a"])  # nothing left: idle again
    broker.ring("wa")
    assert broker.wait_for_work("wa", 30.0) is True


def test_only_the_idle_worker_that_fits_best_is_woken(broker, redis_url):
    import redis

    broker.claim("wa", holds=["m:flux/a"])
    broker.claim("wb", holds=["m:flux/b"])
    broker.submit(payload("flux/b"))
    r = redis.Redis.from_url(redis_url)
    try:
        assert (r.llen("kiln:wake:wb"), r.llen("kiln:wake:wa")) == (1, 0)  # no herd of empty claims
    finally:
        r.close()


def test_a_handed_back_job_wakes_idle_workers(broker):
    job, _ = broker.submit(payload("flux/a"))
    running = broker.claim("wa", holds=["m:flux/a"])
    assert broker.claim("wb", holds=["m:flux/a"]) is None
    while broker.wait_for_work("wb", 0.01):  # drop the bell the submit rang
        pass
    broker.requeue(job.id, lease=running.lease)
    assert broker.wait_for_work("wb", 30.0) is True
    assert broker.claim("wb", holds=["m:flux/a"]).id == job.id


# --- the sync tier ------------------------------------------------------------------------------


@pytest.fixture
def channel(redis_url):
    c = RedisSyncChannel(redis_url, lease_s=5.0)
    yield c
    c.close()


def test_a_sync_request_is_offered_to_the_idle_worker_that_holds_its_model(broker, channel):
    broker.claim("wa", holds=["m:flux/a"])
    broker.claim("wb", holds=["m:flux/b"])
    sync_id, target = channel.offer(payload("flux/b"), ttl_s=30)
    assert target == "wb" and "wb" not in broker.idle_workers()  # no second offer, no job routed to it
    assert channel.take("wa") is None
    taken_id, taken = channel.take("wb")
    assert taken_id == sync_id and taken["request"]["model"] == "b"


def test_a_routed_request_not_taken_in_time_goes_to_anyone(broker, channel):
    broker.claim("wb", holds=["m:flux/b"])  # idle, but it will never take it
    sync_id, target = channel.offer(payload("flux/b"), ttl_s=30)
    assert target == "wb"
    assert channel.unpin(sync_id) is True and channel.unpin(sync_id) is False
    assert channel.take("wa")[0] == sync_id


def test_without_an_idle_holder_any_worker_takes_it(broker, channel):
    broker.claim("wa", holds=["m:flux/a"])
    sync_id, target = channel.offer(payload("flux/b"), ttl_s=30)
    assert target is None
    assert channel.take("wa", block_s=5)[0] == sync_id
    assert "wa" not in broker.idle_workers()  # taking it made the worker busy


def test_withdrawing_a_routed_request(broker, channel):
    broker.claim("wb", holds=["m:flux/b"])
    sync_id, _ = channel.offer(payload("flux/b"), ttl_s=30)
    assert channel.withdraw(sync_id) is True
    assert channel.take("wb") is None


def test_a_worker_waiting_for_sync_requests_wakes_for_a_queued_job(broker, channel):
    assert broker.claim("wa", holds=["m:flux/a"]) is None
    got = []
    waiter = threading.Thread(target=lambda: got.append(channel.take("wa", 30.0, bell=broker.wake_key("wa"))))
    waiter.start()
    started = time.monotonic()
    broker.submit(payload("flux/a"))
    waiter.join(30)
    assert got == [None] and time.monotonic() - started < 10.0


# --- workers ------------------------------------------------------------------------------------


class LoadingEngine:
    """Just what a Worker asks of an engine: models it loads and keeps, runs that take no time."""

    def __init__(self, catalog) -> None:
        self.catalog, self._loaded = catalog, []

    def load(self, spec):
        if spec.key not in self._loaded:
            self._loaded.append(spec.key)

    def loaded(self):
        return list(self._loaded)


def test_workers_take_the_jobs_of_the_models_they_hold(redis_url, tmp_path, catalog, monkeypatch):
    from kiln.storage import LocalAssetStore
    from kiln.worker import runner

    def fake_render(self, request, **kwargs):
        self.engine.load(self.engine.catalog.resolve(request["request"]["family"], request["request"]["model"]))
        return runner.Rendered(request, _Result(), [])

    monkeypatch.setattr("kiln.worker.jobs.from_payload", lambda payload, store: payload)
    monkeypatch.setattr(runner.Worker, "_render", fake_render)
    monkeypatch.setattr(runner, "HOLDINGS_TTL_S", 0.0)
    workers = []
    for name, model in (("w-dev", "flux/dev"), ("w-schnell", "flux/schnell")):
        broker = RedisBroker(redis_url, idle_s=30.0)  # a loaded machine must not make the holder look gone
        worker = runner.Worker(LoadingEngine(catalog), broker, LocalAssetStore(tmp_path / "assets"), worker_id=name,
                               preload=(model,), warmup=False)
        workers.append(worker)
        worker.start()
    submitter = RedisBroker(redis_url)
    try:
        until(lambda: len(submitter.idle_workers()) == 2)
        ran = {}
        for model in ["flux/schnell", "flux/dev", "flux/fast", "flux/dev", "flux/schnell"] * 2:
            until(lambda: len(submitter.idle_workers()) == 2)  # both free: the holder must get it
            job, _ = submitter.submit(payload(model))
            done = until(lambda: (j := submitter.get(job.id)).status is JobStatus.COMPLETE and j)
            ran.setdefault(model, set()).add(done.worker_id)
        assert ran == {"flux/schnell": {"w-schnell"}, "flux/fast": {"w-schnell"}, "flux/dev": {"w-dev"}}
    finally:
        for w in workers:
            w.stop()
            w.broker.close()
        submitter.close()


class _Result:
    seed, model, width, height, steps, num_frames, elapsed_ms = 1, "flux/dev", 64, 64, 1, None, 1
    upscale = latent_upscale = detail_strength = None
    outputs: list = []
