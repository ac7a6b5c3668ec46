"""The worker's side of batching: which jobs may share a pipeline call (their batch signature), both
brokers handing out compatible queued jobs together, and a worker running them as one call."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from kiln.engine import GenerationRequest
from kiln.queue import JobStatus, SqliteBroker
from kiln.storage import LocalAssetStore
from kiln.worker import Worker, to_payload
from kiln.worker.payload import batch_signature
from helpers import until


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)


def request(**extra) -> GenerationRequest:
    fields = {"family": "flux", "model": "dev", "task": "t2i", "format": "toy-64", "prompt": "a red circle",
              "steps": 15, **extra}
    return GenerationRequest.create(**fields)


def signature(store, **extra):
    return to_payload(request(**extra), store).get("batch")


def test_requests_that_differ_only_in_prompt_seed_and_count_share_a_signature(tmp_path):
    store = LocalAssetStore(tmp_path)
    base = signature(store, seed=1)
    assert base is not None
    assert signature(store, seed=2, prompt="a blue square", num_outputs=2, encoding="png") == base
    assert signature(store, seed=1, steps=20) != base
    assert signature(store, seed=1, negative_prompt="blur") != base  # a negative branch changes the call
    assert signature(store, seed=1, negative_prompt="noise") == signature(store, seed=9, negative_prompt="blur")
    assert signature(store, upscale=2.0) is None and signature(store, detail_enhance=True) is None
    assert batch_signature({"task": "i2i", "family": "flux", "model": "dev"}) is None
    assert batch_signature({"task": "t2i", "image_asset": "x.png"}) is None


@pytest.fixture(params=["sqlite", "redis"])
def broker(request, tmp_path):
    if request.param == "sqlite":
        b = SqliteBroker(tmp_path / "jobs.db")
    else:
        from kiln.queue.redis import RedisBroker

        b = RedisBroker(request.getfixturevalue("redis_url"))
    yield b
    b.close()


def test_compatible_queued_jobs_are_handed_out_together_in_claim_order(broker):
    jobs = [broker.submit({"request": {"n": i}, "batch": sig})[0] for i, sig in enumerate("xyxxx")]
    first = broker.claim("w")
    assert first.id == jobs[0].id
    mates = broker.claim_like("w", "x", 2)
    assert [j.id for j in mates] == [jobs[2].id, jobs[3].id]
    assert all(j.status is JobStatus.RUNNING and j.worker_id == "w" and j.lease for j in mates)
    assert len({first.lease, *(j.lease for j in mates)}) == 3  # each its own lease
    assert broker.claim_like("w", "x", 0) == [] and broker.claim_like("w", "z", 3) == []
    assert broker.claim("w").id == jobs[1].id  # the one that could not join keeps its place
    for job in (first, *mates):
        broker.complete(job.id, "/i/x.webp", {}, lease=job.lease)


@pytest.mark.slow
def test_a_worker_runs_compatible_waiting_jobs_as_one_call(tmp_path, engine, monkeypatch):
    calls = []
    real = engine.generate_batch

    def spy(items, **kwargs):
        calls.append(len(items))
        return real(items, **kwargs)

    monkeypatch.setattr(engine, "generate_batch", spy)
    monkeypatch.setattr(engine, "max_batch", lambda spec: 3)
    broker, store = SqliteBroker(tmp_path / "jobs.db"), LocalAssetStore(tmp_path / "assets")
    ids = [broker.submit(to_payload(request(seed=s, prompt=p, encoding="png"), store))[0].id
           for s, p in ((1, "a red circle"), (2, "a blue square"), (3, "a green star"), (4, "a red circle"))]
    lone = broker.submit(to_payload(request(seed=5, steps=16), store))[0].id  # not compatible: alone
    done = threading.Event()
    worker = Worker(engine, broker, store, warmup=False)
    worker.on_terminal = lambda job: done.set() if all(
        broker.get(i).status.terminal for i in [*ids, lone]) else None
    worker.start()
    try:
        assert done.wait(120)
    finally:
        worker.stop()
    assert calls == [3]  # the first three together; the fourth and the lone one alone
    jobs = [broker.get(i) for i in ids]
    assert all(j.status is JobStatus.COMPLETE for j in jobs) and broker.get(lone).status is JobStatus.COMPLETE
    assert [j.result["seed"] for j in jobs] == [1, 2, 3, 4]
    # each batched job got what it gets alone (the same pixels up to 1 level, kiln.engine.batch says why)
    for job, seed, prompt in zip(jobs[:3], (1, 2, 3), ("a red circle", "a blue square", "a green star"), strict=True):
        alone = np.asarray(engine.generate(request(seed=seed, prompt=prompt)).outputs[0].image, dtype=int)
        batched = decoded(store.read("i", job.output.rsplit("/", 1)[1]))  # PNG: lossless
        assert np.abs(alone - batched).max() <= 1
    broker.close()


class SolidEngine:
    """Just what a Worker asks of an engine; each generation is a solid picture, and records its start."""

    def __init__(self, catalog) -> None:
        self.catalog, self.started = catalog, []

    def loaded(self):
        return []

    def max_batch(self, spec):
        return 1

    def generate(self, request, **kwargs):
        from kiln.engine import GenerationResult, ImageOutput

        self.started.append(request.seed)
        return GenerationResult(
            outputs=[ImageOutput(Image.new("RGB", (64, 64), (request.seed, 0, 0)), request.seed)], model="flux/dev",
            task="t2i", width=64, height=64, seed=request.seed, steps=15, guidance=3.5, sampler=None, scheduler=None,
            strength=None, num_frames=None, fps=None, elapsed_ms=1)


def test_the_next_job_renders_while_the_last_one_is_still_being_stored(tmp_path, catalog):
    """Encoding and storing run on the finishing pool: the GPU owner's thread does not wait for them."""

    class SlowStore(LocalAssetStore):
        def __init__(self, root) -> None:
            super().__init__(root)
            self.entered, self.release = threading.Event(), threading.Event()

        def put(self, data, kind, media_type):
            if not self.entered.is_set():  # the first job's output: held until the second job rendered
                self.entered.set()
                assert self.release.wait(60)
            return super().put(data, kind, media_type)

    broker, store = SqliteBroker(tmp_path / "jobs.db"), SlowStore(tmp_path / "assets")
    engine = SolidEngine(catalog)
    first = broker.submit(to_payload(request(seed=1), store))[0].id
    second = broker.submit(to_payload(request(seed=2), store))[0].id
    worker = Worker(engine, broker, store, warmup=False)
    worker.start()
    try:
        assert store.entered.wait(60)  # the first job is being stored...
        until(lambda: engine.started == [1, 2], what="the second job rendering")  # ...and the second rendered
        assert broker.get(first).status is JobStatus.RUNNING  # complete only once its output is stored
        store.release.set()
        until(lambda: broker.get(first).status.terminal and broker.get(second).status.terminal, what="both jobs ending")
    finally:
        store.release.set()
        worker.stop()
    assert broker.get(first).status is JobStatus.COMPLETE and broker.get(second).status is JobStatus.COMPLETE
    broker.close()
