"""kiln.client.Client against the real render API in process (the app, its worker, queue and store;
the engine is tests/client_helpers.StepEngine): results, every error, retries, fallback, jobs, SSE."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import httpx
import pytest
from PIL import Image

from api_helpers import StalledWorker, running_server
from client_helpers import PUBLIC_URL, FakeSleep, InProcess, MovableClock, StepEngine, in_background
from helpers import png, until
from kiln import client as kc
from kiln.client import protocol

MINI = {"model": "flux/mini", "format": "512", "steps": 4}


@pytest.fixture(scope="module")
def engine():
    return StepEngine()


@pytest.fixture(autouse=True)
def _release(engine):
    engine.hold.set()
    engine.held.clear()
    yield
    engine.hold.set()  # a test that failed while holding a job must not hold the next one


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine):
    rules = tmp_path_factory.mktemp("filter") / "filter.txt"
    rules.write_text("\\bforbidden\\b\n")
    with running_server(tmp_path_factory.mktemp("client"), engine, public_url=PUBLIC_URL,
                        prompt_filter_file=rules) as srv:
        yield srv


@pytest.fixture
def tight(tmp_path, engine):
    """A server whose sync tier gives up after 1 s: a held job makes it answer 503."""
    with running_server(tmp_path, engine, public_url=PUBLIC_URL, sync_wait_s=1.0) as srv:
        yield srv


@pytest.fixture
def busy(tmp_path, engine):
    """A worker that never starts anything: 503 on the sync tier, queued jobs stay queued (2 at most)."""
    with running_server(tmp_path, engine, worker=StalledWorker(), public_url=PUBLIC_URL, sync_wait_s=0.05,
                        queue_max_depth=2) as srv:
        yield srv


class Recorder:
    """Keeps (method, path, headers, body) of every request a client sends."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    def __call__(self, request: httpx.Request) -> None:
        self.requests.append((request.method, request.url.path, dict(request.headers), request.read()))

    def paths(self) -> list[str]:
        return [f"{method} {path}" for method, path, _, _ in self.requests]


def make_client(srv, *, key=None, transport=None, recorder=None, **options) -> kc.Client:
    hooks = {"request": [recorder]} if recorder is not None else {}
    http = httpx.Client(transport=transport or InProcess(srv.client), event_hooks=hooks)
    options.setdefault("sleep", FakeSleep())  # no test waits for real unless it says so
    return kc.Client(PUBLIC_URL, srv.key if key is None else key, http=http, **options)


@pytest.fixture
def client(server):
    return make_client(server)


# --- standing alone -------------------------------------------------------------------------------


def test_the_client_imports_no_server_engine_or_torch():
    code = ("import sys, kiln.client\n"
            "heavy = {'torch', 'diffusers', 'transformers', 'fastapi', 'starlette', 'uvicorn', 'PIL', 'numpy'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or "
            "(m.startswith('kiln.') and not m.startswith('kiln.client'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_error_the_server_can_send_has_its_class_and_status():
    """The client's vocabulary follows the server's: each code of kiln.errors (and of the HTTP-only
    errors) maps to a class of the same branch whose status is the one the server sends."""
    from kiln import errors as server
    from kiln.api.errors import STATUS

    def status_of(cls):
        return next(status for base, status in STATUS if issubclass(cls, base))

    internal = {server.LeaseLost, server.CatalogError}  # never leave the server
    classes, stack = [], [server.KilnError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__ == server.__name__ and cls not in internal:
            classes.append(cls)
    branches = {server.UserError: kc.UserError, server.UnavailableError: kc.UnavailableError,
                server.GenerationError: kc.GenerationError}
    for cls in classes:
        mine = kc.errors.ERRORS[cls.code]
        assert mine.code == cls.code and mine.status == status_of(cls), cls
        for theirs, ours in branches.items():
            assert issubclass(cls, theirs) == issubclass(mine, ours), (cls, mine)
    http_only = {"invalid_token": 401, "token_expired": 401, "insufficient_credits": 402,
                 "rate_limit_exceeded": 429, "not_found": 404}
    for code, status in http_only.items():
        assert kc.errors.ERRORS[code].status == status


# --- the sync tier --------------------------------------------------------------------------------


def test_generate_returns_the_bytes_seed_url_and_timing(client, tmp_path):
    out = client.generate("a red circle on a blue background", seed=7, **MINI)
    assert out.media_type == "image/webp" and out.seed == 7 and out.job_id is None
    with Image.open(io.BytesIO(out.data)) as img:
        assert img.format == "WEBP" and img.size == (512, 512)
    assert out.url.startswith(f"{PUBLIC_URL}/i/") and client.download(out.url) == out.data
    assert set(out.timing) == {"generate", "encode", "store"} and all(v >= 0 for v in out.timing.values())
    assert isinstance(out.generation_ms, int) and out.generation_ms >= 0 and out.elapsed_s > 0
    assert out.save(tmp_path / "x.webp").read_bytes() == out.data
    again = client.generate("a red circle on a blue background", seed=7, **MINI)
    assert again.data == out.data and again.url == out.url  # same request, same pixels, same address


def test_generate_video_goes_to_the_video_route(client):
    out = client.generate("a ball rolls", model="wan/default", task="t2v", format="480p-portrait", steps=10,
                          duration=0.5, cfg=7)
    assert out.media_type == "video/mp4" and out.data[4:8] == b"ftyp" and f"{PUBLIC_URL}/v/" in out.url


def test_aliases_in_the_model_name(client):
    with pytest.raises(kc.ModelNotInstalled):
        client.generate("a red circle", model="flux/default", format="512")  # default -> flux/dev


def test_local_inputs_are_uploaded_first(server, client, tmp_path):
    source = tmp_path / "in.png"
    source.write_bytes(png(80, 64))
    url = client.upload(source)
    assert url.startswith(f"{PUBLIC_URL}/u/") and url.endswith(".png") and client.download(url) == source.read_bytes()
    recorder = Recorder()
    uploading = make_client(server, recorder=recorder)
    out = uploading.generate("make it blue", task="i2i", image=source, strength=0.6, seed=1, **MINI)
    assert out.media_type == "image/webp"
    assert recorder.paths()[:2] == ["POST /uploads", "POST /image/flux/mini/i2i"]
    assert json.loads(recorder.requests[1][3])["image"].startswith(f"{PUBLIC_URL}/u/")
    assert "authorization" in recorder.requests[0][2]
    as_bytes = uploading.generate("make it blue", task="i2i", image=png(80, 64), strength=0.6, seed=1, **MINI)
    as_url = uploading.generate("make it blue", task="i2i", image=url, strength=0.6, seed=1, **MINI)
    assert as_bytes.data == as_url.data == out.data
    uploading.download(out.url)
    assert "authorization" not in recorder.requests[-1][2]  # the key goes to the API, not to output URLs


def test_unknown_parameters_are_a_type_error(client):
    with pytest.raises(TypeError, match="colour"):
        client.generate("a red circle", colour="red", **MINI)
    with pytest.raises(ValueError, match="FAMILY/MODEL"):
        client.generate("a red circle", model="mini")


# --- every error, from a real response ------------------------------------------------------------


def _key(server, **options) -> str:
    return server.services.keys.create("test", **options).secret


ERROR_CASES = [
    ("steps out of range", lambda c, s: c.generate("a red circle", model="flux/mini", format="512", steps=99),
     kc.InvalidParameters, 400),
    ("short prompt", lambda c, s: c.generate("ab", **MINI), kc.InvalidPrompt, 400),
    ("format", lambda c, s: c.generate("a red circle", model="flux/mini", format="2048"), kc.UnsupportedFormat, 400),
    ("task", lambda c, s: c.generate("a red circle", model="flux/dev2", task="edit", format="512"),
     kc.UnsupportedTask, 400),
    ("image", lambda c, s: c.generate("a red circle", task="i2i", image="data:image/png;base64,!!!", **MINI),
     kc.InvalidImage, 400),
    ("upload", lambda c, s: c.upload(b"not an image"), kc.InvalidImage, 400),
    ("model", lambda c, s: c.generate("a red circle", model="flux/dev9"), kc.ModelNotFound, 404),
    ("job", lambda c, s: c.job("j_nope"), kc.NotFound, 404),
    ("filtered", lambda c, s: c.generate("a forbidden thing", **MINI), kc.PromptFiltered, 403),
    ("nsfw", lambda c, s: c.generate("nsfw", **MINI), kc.NsfwDetected, 403),
    ("not installed", lambda c, s: c.generate("a red circle", model="flux/dev", format="512"),
     kc.ModelNotInstalled, 503),
    ("load failed", lambda c, s: c.generate("a red circle", model="flux/dev2", format="512"), kc.ModelLoadFailed, 503),
    ("oom", lambda c, s: c.generate("oom", **MINI), kc.OutOfMemory, 500),
    ("crash", lambda c, s: c.generate("crash", **MINI), kc.GenerationFailed, 500),
    ("bad key", lambda c, s: kc.Client(PUBLIC_URL, "nonsense", http=c._http).models(), kc.InvalidToken, 401),
    ("no key", lambda c, s: kc.Client(PUBLIC_URL, "", http=c._http).models(), kc.InvalidToken, 401),
    ("revoked", lambda c, s: kc.Client(PUBLIC_URL, _revoked(s), http=c._http).models(), kc.TokenExpired, 401),
    ("credits", lambda c, s: kc.Client(PUBLIC_URL, _key(s, credits=0), http=c._http).generate("a red circle", **MINI),
     kc.InsufficientCredits, 402),
]


def _revoked(server) -> str:
    created = server.services.keys.create("gone")
    server.services.keys.revoke(created.record.id)
    return created.secret


@pytest.mark.parametrize(("call", "cls", "status"), [case[1:] for case in ERROR_CASES],
                         ids=[case[0] for case in ERROR_CASES])
def test_each_error_class_from_a_real_error_response(server, client, call, cls, status):
    with pytest.raises(kc.KilnAPIError) as caught:
        call(client, server)
    error = caught.value
    assert type(error) is cls and error.status == status and error.code == cls.code, error
    assert error.message and "Traceback" not in error.message and str(error).startswith(f"{status} {cls.code}")
    assert client._sleep.waits == []  # none of these is worth retrying


def test_error_details_and_retry_after_are_kept(server, client):
    with pytest.raises(kc.InvalidParameters) as caught:
        client.generate("a red circle", model="flux/mini", format="512", steps=99)
    assert caught.value.details  # the allowed range, for a client to show
    with pytest.raises(kc.NsfwDetected) as caught:
        client.generate("nsfw", **MINI)
    assert caught.value.details == {"outputs": [0]}
    job = client.submit("a red circle", idempotency_key="conflict-1", **MINI)
    with pytest.raises(kc.IdempotencyConflict) as caught:
        client.submit("a blue circle", idempotency_key="conflict-1", **MINI)
    assert caught.value.status == 409
    assert client.submit("a red circle", idempotency_key="conflict-1", **MINI).id == job.id


def test_connection_refused_is_connection_failed():
    from helpers import free_port

    with kc.Client(f"http://127.0.0.1:{free_port()}", "k", sleep=FakeSleep()) as c:
        with pytest.raises(kc.ConnectionFailed, match="failed") as caught:
            c.models()
    assert caught.value.status is None and caught.value.code == "connection_failed"


# --- retries --------------------------------------------------------------------------------------


def test_503_is_retried_after_retry_after_and_then_succeeds(tight, engine):
    engine.hold.clear()
    held = make_client(tight).submit("hold a red circle", **MINI)
    until(engine.held.is_set, what="the held job starting")

    def free_the_worker():
        engine.hold.set()
        until(lambda: tight.services.broker.get(held.id).status.terminal, what="the held job finishing")

    sleep = FakeSleep(then=free_the_worker)
    out = make_client(tight, sleep=sleep).generate("a red circle", seed=3, **MINI)
    assert out.seed == 3 and out.job_id is None
    assert len(sleep.waits) == 1 and 5 <= sleep.waits[0] <= 5 * 1.25  # Retry-After: 5, plus jitter up to 25%


def test_503_retries_back_off_exponentially_and_give_up(busy):
    sleep = FakeSleep()
    c = make_client(busy, sleep=sleep, max_retries=3, backoff=4.0, max_backoff=10.0, rng=lambda: 0.0)
    with pytest.raises(kc.CapacityExhausted) as caught:
        c.generate("a red circle", **MINI)
    assert caught.value.retry_after == 5 and caught.value.status == 503
    assert sleep.waits == [5.0, 8.0, 10.0]  # never sooner than Retry-After, doubling from 4, capped at 10
    jittered = make_client(busy, sleep=FakeSleep(), max_retries=1, rng=lambda: 1.0)
    with pytest.raises(kc.CapacityExhausted):
        jittered.generate("a red circle", **MINI)
    assert jittered._sleep.waits == [5.0 * 1.25]


def test_429_rate_limit_is_retried_after_retry_after(server, monkeypatch):
    clock = MovableClock()
    monkeypatch.setattr(server.services.limiter, "clock", clock)  # the server's minute passes with the fake sleep
    sleep = FakeSleep(clock=clock)
    c = make_client(server, key=_key(server, rate_per_min=2), sleep=sleep)
    assert [len(c.models()) > 0 for _ in range(3)] == [True] * 3
    assert len(sleep.waits) == 1 and sleep.waits[0] >= 60  # the window's reset, from Retry-After
    impatient = make_client(server, key=_key(server, rate_per_min=1), max_retries=0)
    impatient.models()
    with pytest.raises(kc.RateLimitExceeded) as caught:
        impatient.models()
    assert caught.value.status == 429 and caught.value.retry_after >= 1


def test_429_queue_full_is_retried(busy):
    c = make_client(busy)
    first = c.submit("a red circle", **MINI)
    c.submit("a blue circle", **MINI)
    sleep = FakeSleep(then=lambda: c.cancel(first))
    job = make_client(busy, sleep=sleep).submit("a green circle", **MINI)
    assert job.status == "queued" and len(sleep.waits) == 1
    with pytest.raises(kc.QueueFull) as caught:
        make_client(busy, max_retries=0).submit("a pink circle", **MINI)
    assert caught.value.status == 429


def test_retry_after_as_an_http_date():
    from email.utils import format_datetime
    from datetime import UTC, datetime, timedelta

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    seconds = protocol.retry_after(httpx.Response(503, headers={"Retry-After": when}))
    assert 100 < seconds <= 120
    assert protocol.retry_after(httpx.Response(503, headers={"Retry-After": "soon"})) is None


# --- sync -> async fallback -----------------------------------------------------------------------


def _release_when_queued(srv, engine, count: int = 1) -> threading.Thread:
    """Let the held job go once ``count`` jobs wait behind it (the fallback's job among them)."""

    def release():
        until(lambda: sum(srv.services.broker.depth().values()) >= count, what="the fallback job being queued")
        engine.hold.set()

    return in_background(release)


def test_fallback_turns_a_503_into_a_queued_job_through_prefer(tight, engine):
    engine.hold.clear()
    make_client(tight).submit("hold a red circle", **MINI)
    until(engine.held.is_set, what="the held job starting")
    recorder = Recorder()
    c = make_client(tight, recorder=recorder, fallback_to_async=True)
    _release_when_queued(tight, engine)
    out = c.generate("a blue square", seed=11, **MINI)
    assert out.job_id is not None and out.seed == 11 and out.timing == {} and out.generation_ms is not None
    assert out.url.startswith(f"{PUBLIC_URL}/i/") and c.download(out.url) == out.data
    with Image.open(io.BytesIO(out.data)) as img:
        assert img.size == (512, 512)
    assert recorder.paths()[0] == "POST /image/flux/mini/t2i" and recorder.requests[0][2]["prefer"] == "respond-async"
    assert "POST /queue" not in recorder.paths() and c._sleep.waits == []
    direct = make_client(tight).generate("a blue square", seed=11, **MINI)
    assert direct.data == out.data  # the same request on either tier makes the same pixels


class IgnoresPrefer(httpx.BaseTransport):
    """A server that knows no ``Prefer: respond-async`` (the header is dropped on the way)."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        headers = [(k, v) for k, v in request.headers.raw if k.lower() != b"prefer"]
        return self.inner.handle_request(httpx.Request(request.method, request.url, headers=headers,
                                                       content=request.read()))


def test_fallback_queues_the_request_itself_when_the_server_answers_503(tight, engine):
    engine.hold.clear()
    make_client(tight).submit("hold a red circle", **MINI)
    until(engine.held.is_set, what="the held job starting")
    recorder = Recorder()
    c = make_client(tight, recorder=recorder, transport=IgnoresPrefer(InProcess(tight.client)),
                    fallback_to_async=True)
    _release_when_queued(tight, engine)
    out = c.generate("a blue square", seed=12, **MINI)
    assert out.job_id is not None and out.seed == 12
    paths = recorder.paths()
    assert paths[:2] == ["POST /image/flux/mini/t2i", "POST /queue"] and c._sleep.waits == []
    queued = json.loads(recorder.requests[1][3])
    assert queued["idempotency_key"].startswith("kiln-client-")  # a retried submission makes one job
    assert {k: queued[k] for k in ("modality", "family", "model", "task", "format", "seed")} == {
        "modality": "image", "family": "flux", "model": "mini", "task": "t2i", "format": "512", "seed": 12}


def test_without_fallback_capacity_exhausted_is_raised(busy):
    with pytest.raises(kc.CapacityExhausted):
        make_client(busy, max_retries=0).generate("a red circle", **MINI)


# --- the async tier -------------------------------------------------------------------------------


def test_submit_stream_and_wait(client):
    job = client.submit("a red circle", seed=5, **MINI)
    assert job.status == "queued" and job.id.startswith("j_") and job.position >= 1 and job.created_at
    events = list(client.stream(job))
    names = [event.name for event in events]
    assert names[-1] == "complete" and "started" in names
    assert all(event.job_id == job.id for event in events)
    ids = [event.event_id for event in events if not isinstance(event, kc.Position)]
    assert ids == sorted(set(ids))
    steps = [event.step for event in events if isinstance(event, kc.Progress)]
    assert steps == sorted(steps) and all(0 < s <= 4 for s in steps)
    done = client.wait(job)
    assert done.status == "complete" and done.seed == 5 and done.duration_ms >= 0 and done.completed_at
    assert done.output == events[-1].output and done.outputs == (done.output,)
    with Image.open(io.BytesIO(client.download(done.output))) as img:
        assert img.size == (512, 512)
    assert client.job(job.id).status == "complete"  # the 303 is read as the job, not followed


def test_stream_shows_a_held_job_step_by_step(client, engine):
    engine.hold.clear()
    job = client.submit("hold a red circle", **MINI)
    seen = []
    for event in client.stream(job):
        seen.append(event)
        if isinstance(event, kc.Started):
            engine.hold.set()
    names = [event.name for event in seen]
    assert names[names.index("started") + 1:][-1] == "complete" and "progress" in names
    assert max(e.step for e in seen if isinstance(e, kc.Progress)) == 4


@pytest.mark.parametrize("finished_first", [False, True], ids=["fresh", "finished"])
def test_wait_times_out_even_while_events_keep_coming(server, finished_first):
    """The deadline is wall-clock: a stream whose events keep arriving (no read ever times out) still
    ends wait() once the time is up, and the job goes on.

    The clock reads 0 (deadline 1.5), 1 (the stream opens with 0.5 s to read), then 2 after the first
    event: every stream starts with a non-terminal one (``position``, or ``started`` replayed by a job
    that already finished), so the check between events must fire whether or not the job is done."""
    ticks = iter(range(1000))
    client = make_client(server, clock=lambda: float(next(ticks)))  # every look at the clock: 1 s later
    job = client.submit("a red circle", **MINI)
    if finished_first:  # the stream is a replay: `started`, then `complete`
        make_client(server).wait(job)
    with pytest.raises(TimeoutError):
        client.wait(job, timeout=1.5)
    assert make_client(server).wait(job).status == "complete"


def test_idempotent_submissions_make_one_job(client):
    first = client.submit("a red circle", idempotency_key="same-1", **MINI)
    again = client.submit("a red circle", idempotency_key="same-1", **MINI)
    assert again.id == first.id


def test_cancel_a_running_job(client, engine, server):
    engine.hold.clear()
    job = client.submit("hold a red circle", **MINI)
    until(engine.held.is_set, what="the held job starting")
    assert client.cancel(job).status == "running"  # asked to stop: the worker stops between steps
    engine.hold.set()
    with pytest.raises(kc.JobCancelled) as caught:
        client.wait(job)
    assert caught.value.job_id == job.id and caught.value.status is None
    assert client.job(job).status == "cancelled"


def test_cancel_a_queued_job(busy):
    c = make_client(busy)
    job = c.submit("a red circle", **MINI)
    cancelled = c.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    assert [event.name for event in c.stream(job)] == ["cancelled"]
    with pytest.raises(kc.JobCancelled):
        c.wait(job)


@pytest.mark.parametrize(("prompt", "cls"), [("nsfw", kc.NsfwDetected), ("oom", kc.OutOfMemory),
                                             ("crash", kc.GenerationFailed)])
def test_a_failed_job_raises_its_error(client, prompt, cls):
    job = client.submit(prompt, **MINI)
    with pytest.raises(cls) as caught:
        client.wait(job)
    assert caught.value.job_id == job.id and caught.value.status is None and caught.value.message
    failed = [event for event in client.stream(job) if isinstance(event, kc.Failed)]
    assert failed and failed[0].error.code == cls.code


class CutsTheFirstStream(httpx.BaseTransport):
    """The first event stream breaks (a read error) after its first event; later ones go through."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.streams: list[dict[str, str]] = []  # the headers of each events request
        self.reconnected = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not request.url.path.endswith("/events"):
            return response
        self.streams.append(dict(request.headers))
        if len(self.streams) > 1:
            self.reconnected.set()
            return response
        return httpx.Response(response.status_code, headers=response.headers, stream=_FirstEventOnly(response),
                              request=request)


class _FirstEventOnly(httpx.SyncByteStream):
    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    def __iter__(self):
        sent = b""
        for chunk in self.response.stream:
            sent += chunk
            if b"\n\n" in sent:
                yield sent[: sent.index(b"\n\n") + 2]
                raise httpx.ReadError("connection reset by peer")
        yield sent

    def close(self) -> None:
        self.response.close()


def test_stream_resumes_after_a_dropped_connection_with_last_event_id(server, engine):
    transport = CutsTheFirstStream(InProcess(server.client))
    c = make_client(server, transport=transport)
    engine.hold.clear()
    job = c.submit("hold a red circle", **MINI)
    until(engine.held.is_set, what="the held job starting")
    in_background(lambda: transport.reconnected.wait(30) and engine.hold.set())
    events = list(c.stream(job))
    assert [e.name for e in events][0] == "started" and events[-1].name == "complete"
    ids = [e.event_id for e in events]
    assert ids == sorted(set(ids))  # nothing lost, nothing twice
    assert len(transport.streams) == 2 and transport.streams[1]["last-event-id"] == "1"
    assert len(c._sleep.waits) == 1  # one short backoff before reconnecting


def test_a_stream_that_keeps_breaking_without_news_gives_up(busy):
    class AlwaysCut(CutsTheFirstStream):
        def handle_request(self, request):
            self.streams.clear()  # every stream is "the first"
            return super().handle_request(request)

    c = make_client(busy, transport=AlwaysCut(InProcess(busy.client)), max_retries=2)
    job = c.submit("a red circle", **MINI)  # stays queued: each stream says its position, then breaks
    seen = []
    with pytest.raises(kc.ConnectionFailed, match="reset by peer"):
        for event in c.stream(job):
            seen.append(event)
    assert {e.name for e in seen} == {"position"} and len(seen) == 3 and len(c._sleep.waits) == 2


# --- discovery ------------------------------------------------------------------------------------


def test_models_and_aliases(client):
    models = client.models()
    mini = next(m for m in models if m.key == "flux/mini")
    assert mini.modality == "image" and "t2i" in mini.tasks and "512" in mini.formats and mini.status == "active"
    assert mini.info["default_steps"] == 8 and mini.backends
    assert {m.family for m in client.models(family="zimage")} == {"zimage"}
    assert {m.modality for m in client.models(modality="video")} == {"video"}
    aliases = client.aliases()
    assert aliases["latest"] == "dev2" and "fast" in aliases and aliases.updated_at.endswith("Z")
