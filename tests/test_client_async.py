"""kiln.client.AsyncClient against the real render API in process (httpx's ASGI transport onto the
app; the worker, queue and store are real, the engine is tests/client_helpers.StepEngine).

httpx's ASGI transport hands a response over once the app has sent all of it, so an event stream
arrives when its job has ended; streams that must arrive live are tested on loopback
(tests/test_client_loopback.py)."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest
from PIL import Image

from api_helpers import StalledWorker, running_server
from client_helpers import PUBLIC_URL, AsyncFakeSleep, StepEngine, in_background
from helpers import png, until
from kiln import client as kc

MINI = {"model": "flux/mini", "format": "512", "steps": 4}


@pytest.fixture(scope="module")
def engine():
    return StepEngine()


@pytest.fixture(autouse=True)
def _release(engine):
    engine.hold.set()
    engine.held.clear()
    yield
    engine.hold.set()


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine):
    with running_server(tmp_path_factory.mktemp("aclient"), engine, public_url=PUBLIC_URL) as srv:
        yield srv


@pytest.fixture
def tight(tmp_path, engine):
    with running_server(tmp_path, engine, public_url=PUBLIC_URL, sync_wait_s=1.0) as srv:
        yield srv


@pytest.fixture
def busy(tmp_path, engine):
    with running_server(tmp_path, engine, worker=StalledWorker(), public_url=PUBLIC_URL, sync_wait_s=0.05,
                        queue_max_depth=2) as srv:
        yield srv


def make_client(srv, *, key=None, transport=None, **options) -> kc.AsyncClient:
    http = httpx.AsyncClient(transport=transport or httpx.ASGITransport(app=srv.client.app))
    options.setdefault("sleep", AsyncFakeSleep())
    return kc.AsyncClient(PUBLIC_URL, srv.key if key is None else key, http=http, **options)


def hold_the_worker(srv) -> dict:
    """Queue a job that holds the worker (the engine's hold is cleared) and return it."""
    body = {"modality": "image", "family": "flux", "model": "mini", "task": "t2i", "format": "512", "steps": 4,
            "prompt": "hold it"}
    response = srv.client.post("/queue", json=body, headers=srv.auth)
    assert response.status_code == 202, response.text
    return response.json()


def test_generate_returns_the_bytes_seed_url_and_timing(server):
    async def go():
        async with make_client(server) as c:
            out = await c.generate("a red circle on a blue background", seed=7, **MINI)
            return out, await c.download(out.url)

    out, again = asyncio.run(go())
    assert out.media_type == "image/webp" and out.seed == 7 and out.url.startswith(f"{PUBLIC_URL}/i/")
    assert again == out.data and set(out.timing) == {"generate", "encode", "store"} and out.generation_ms >= 0
    with Image.open(io.BytesIO(out.data)) as img:
        assert img.size == (512, 512)


@pytest.mark.parametrize(("call", "cls"), [
    (lambda c: c.generate("a red circle", model="flux/mini", format="512", steps=99), kc.InvalidParameters),
    (lambda c: c.generate("a red circle", model="flux/dev9"), kc.ModelNotFound),
    (lambda c: c.generate("nsfw", **MINI), kc.NsfwDetected),
    (lambda c: c.generate("a red circle", model="flux/dev", format="512"), kc.ModelNotInstalled),
    (lambda c: c.job("j_nope"), kc.NotFound),
    (lambda c: c.upload(b"not an image"), kc.InvalidImage),
])
def test_errors(server, call, cls):
    async def go():
        async with make_client(server) as c:
            with pytest.raises(kc.KilnAPIError) as caught:
                await call(c)
            return caught.value, c._sleep.waits

    error, waits = asyncio.run(go())
    assert type(error) is cls and error.status == cls.status and waits == []


def test_a_bad_key_is_invalid_token(server):
    async def go():
        async with make_client(server, key="nonsense") as c:
            await c.models()

    with pytest.raises(kc.InvalidToken):
        asyncio.run(go())


def test_503_retries_back_off_and_give_up(busy):
    async def go():
        async with make_client(busy, max_retries=3, backoff=4.0, max_backoff=10.0, rng=lambda: 0.0) as c:
            with pytest.raises(kc.CapacityExhausted):
                await c.generate("a red circle", **MINI)
            return c._sleep.waits

    assert asyncio.run(go()) == [5.0, 8.0, 10.0]


def test_503_is_retried_and_then_succeeds(tight, engine):
    engine.hold.clear()
    held = hold_the_worker(tight)
    until(engine.held.is_set, what="the held job starting")

    def free_the_worker():
        engine.hold.set()
        until(lambda: tight.services.broker.get(held["id"]).status.terminal, what="the held job finishing")

    async def go():
        async with make_client(tight, sleep=AsyncFakeSleep(then=free_the_worker)) as c:
            return await c.generate("a red circle", seed=3, **MINI), c._sleep.waits

    out, waits = asyncio.run(go())
    assert out.seed == 3 and len(waits) == 1 and waits[0] >= 5


def test_fallback_to_async(tight, engine):
    engine.hold.clear()
    hold_the_worker(tight)
    until(engine.held.is_set, what="the held job starting")

    def release():
        until(lambda: sum(tight.services.broker.depth().values()) >= 1, what="the fallback job being queued")
        engine.hold.set()

    in_background(release)

    async def go():
        async with make_client(tight, fallback_to_async=True) as c:
            return await c.generate("a blue square", seed=11, **MINI)

    out = asyncio.run(go())
    assert out.job_id is not None and out.seed == 11 and out.timing == {} and out.data[:4] == b"RIFF"


def test_wait_times_out_even_while_events_keep_coming(server):
    """As the sync client: the deadline holds while the stream keeps bringing events."""
    ticks = iter(range(1000))

    async def go():
        async with make_client(server, clock=lambda: float(next(ticks))) as c:  # each look: 1 s later
            job = await c.submit("a red circle", **MINI)
            with pytest.raises(TimeoutError):
                await c.wait(job, timeout=1.5)  # the first event crosses it, as in the sync test
        async with make_client(server) as c:
            return await c.wait(job)

    assert asyncio.run(go()).status == "complete"


def test_submit_stream_wait_cancel_upload_and_discovery(server, busy):
    async def go():
        async with make_client(server) as c:
            url = await c.upload(png(80, 64), filename="in.png")
            job = await c.submit("make it blue", task="i2i", image=url, strength=0.6, seed=5, **MINI)
            events = [event async for event in c.stream(job)]
            done = await c.wait(job)
            with pytest.raises(kc.NsfwDetected) as caught:
                await c.wait(await c.submit("nsfw", **MINI))
            models, aliases = await c.models(family="flux"), await c.aliases()
        async with make_client(busy) as b:
            queued = await b.submit("a red circle", idempotency_key="a-1", **MINI)
            same = await b.submit("a red circle", idempotency_key="a-1", **MINI)
            cancelled = await b.cancel(queued)
            with pytest.raises(kc.JobCancelled):
                await b.wait(queued)
        return url, job, events, done, caught.value, models, aliases, queued, same, cancelled

    url, job, events, done, nsfw, models, aliases, queued, same, cancelled = asyncio.run(go())
    assert url.startswith(f"{PUBLIC_URL}/u/") and job.status == "queued"
    assert events[-1].name == "complete" and "started" in [e.name for e in events]
    assert done.status == "complete" and done.seed == 5 and done.output == events[-1].output
    assert nsfw.job_id is not None and nsfw.status is None
    assert {m.family for m in models} == {"flux"} and aliases["fast"] == "schnell"
    assert same.id == queued.id and cancelled.status == "cancelled"


class CutsTheFirstStream(httpx.AsyncBaseTransport):
    """The first event stream breaks after its first event; later ones go through."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.streams: list[dict[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/events"):
            return response
        self.streams.append(dict(request.headers))
        if len(self.streams) > 1:
            return response
        return httpx.Response(response.status_code, headers=response.headers, stream=_FirstEventOnly(response),
                              request=request)


class _FirstEventOnly(httpx.AsyncByteStream):
    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    async def __aiter__(self):
        sent = b""
        async for chunk in self.response.stream:
            sent += chunk
            if b"\n\n" in sent:
                yield sent[: sent.index(b"\n\n") + 2]
                raise httpx.ReadError("connection reset by peer")
        yield sent

    async def aclose(self) -> None:
        await self.response.aclose()


def test_stream_resumes_with_last_event_id(server):
    transport = CutsTheFirstStream(httpx.ASGITransport(app=server.client.app))

    async def go():
        async with make_client(server, transport=transport) as c:
            job = await c.submit("a red circle", **MINI)
            return [event async for event in c.stream(job)], c._sleep.waits

    events, waits = asyncio.run(go())
    ids = [e.event_id for e in events if not isinstance(e, kc.Position)]
    assert events[-1].name == "complete" and ids == sorted(set(ids)) and len(waits) == 1
    assert len(transport.streams) == 2 and transport.streams[1]["last-event-id"] == str(events[0].event_id)
