"""The Vyro-style door: a multipart form in, the image's bytes out, numeric error codes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from api_helpers import StalledWorker, running_server
from kiln import errors

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine):
    with running_server(tmp_path_factory.mktemp("vyro"), engine) as srv:
        yield srv


def form(**fields):
    """Fields as ``curl --form`` sends them: multipart, no file names."""
    return {name: (None, str(value)) for name, value in fields.items()}


def generate(srv, headers=None, **fields):
    return srv.client.post("/v2/image/generations", files=form(**fields), headers=srv.auth if headers is None else headers)


def test_image_bytes_in_the_style_and_seed(server):
    r = generate(server, prompt=PROMPT, style="flux-mini", aspect_ratio="1:1", seed=123456789)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "123456789"
    with Image.open(io.BytesIO(r.content)) as img:
        assert (img.format, img.size) == ("PNG", (512, 512))  # flux/mini's square format
    assert generate(server, prompt=PROMPT, style="flux-mini", seed=123456789).content == r.content  # 1:1 by default
    location = r.headers["content-location"].removeprefix("http://127.0.0.1:8080")
    assert server.client.get(location).content == r.content


class RecordingWorker(StalledWorker):
    """Takes each sync request at once and fails it with ``exc``; keeps the requests it saw."""

    alive, current_job, seconds_per_job = True, None, 1.0

    def __init__(self, exc: BaseException) -> None:
        self.exc, self.requests = exc, []

    def submit_sync(self, request, **kwargs):
        from kiln.worker import SyncTicket

        self.requests.append(request)
        ticket = SyncTicket(request)
        ticket.started.set_result(None)
        ticket.done.set_exception(self.exc)
        return ticket

    def withdraw(self, ticket):
        return False


@pytest.mark.parametrize(("style", "ratio", "model", "fmt"), [
    ("flux-mini", "16:9", "mini", "landscape-wide"),
    ("flux-mini", "9:16", "mini", "portrait-wide"),
    ("flux-mini", "4:3", "mini", "landscape"),
    ("flux-mini", "3:4", "mini", "portrait"),
    ("flux-dev", "1:1", "dev", "1024"),
    ("flux-schnell", "1:1", "schnell", "1024"),
])
def test_styles_and_aspect_ratios_map_through_the_catalog(tmp_path, engine, style, ratio, model, fmt):
    worker = RecordingWorker(errors.GenerationError("the generation failed"))
    with running_server(tmp_path, engine, worker=worker) as srv:
        r = generate(srv, prompt=PROMPT, style=style, aspect_ratio=ratio)
    assert r.status_code == 500 and r.json()["code"] == 1205
    (request,) = worker.requests
    assert (request.model, request.format, request.encoding, request.task) == (model, fmt, "png", "t2i")


@pytest.mark.parametrize(("style", "ratio", "size"), [
    ("flux-mini", "3:2", (624, 416)), ("flux-mini", "2:3", (416, 624)), ("flux-mini", "21:9", (784, 336)),
    ("flux-dev", "21:9", (1568, 672)), ("flux-dev", "42:18", (1568, 672)), ("flux-mini", " 5 : 4 ", (576, 464)),
])
def test_other_ratios_get_a_pixel_size_of_that_shape(tmp_path, engine, style, ratio, size):
    worker = RecordingWorker(errors.GenerationError("the generation failed"))
    with running_server(tmp_path, engine, worker=worker) as srv:
        generate(srv, prompt=PROMPT, style=style, aspect_ratio=ratio)
    (request,) = worker.requests
    assert (request.format, (request.width, request.height)) == (None, size)


def test_an_other_ratio_comes_back_exactly_that_size(server):
    r = generate(server, prompt=PROMPT, style="flux-mini", aspect_ratio="3:2", seed=1)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (624, 416)


@pytest.mark.parametrize(("exc", "status", "code", "name"), [
    (errors.GenerationError("the generation failed"), 500, 1205, "InternalServiceError"),
    (errors.OutOfMemory("out of memory"), 500, 1205, "InternalServiceError"),
    (errors.ModelNotInstalled("flux/mini is not installed"), 503, 1200, "ServiceUnavailable"),
    (errors.ModelLoadFailed("flux/mini could not be loaded"), 503, 1200, "ServiceUnavailable"),
    (errors.ModelUnavailable("announced, not served yet"), 503, 1206, "NotImplemented"),
    (errors.QueueUnavailable("the job queue cannot be used"), 503, 1200, "ServiceUnavailable"),
    (errors.RedisUnavailable("the sync tier (Redis at 127.0.0.1:1/0) cannot be reached"), 503, 1201,
     "ServiceUnavailable"),
    (RuntimeError("a bug"), 500, 1300, "InternalServerError"),
])
def test_service_errors(tmp_path, engine, exc, status, code, name):
    with running_server(tmp_path, engine, worker=RecordingWorker(exc)) as srv:
        r = generate(srv, prompt=PROMPT, style="flux-mini")
    assert r.status_code == status
    body = r.json()
    assert (body["status"], body["code"], body["error"]) == ("error", code, name) and body["message"]
    assert "Traceback" not in r.text and "a bug" not in r.text


class IdleWorker(RecordingWorker):
    def submit_sync(self, request, **kwargs):
        from kiln.worker import SyncTicket

        return SyncTicket(request)  # never started

    def withdraw(self, ticket):
        return True


def test_a_request_that_waits_too_long_is_1204(tmp_path, engine):
    with running_server(tmp_path, engine, worker=IdleWorker(None), sync_wait_s=0.05) as srv:
        r = generate(srv, prompt=PROMPT, style="flux-mini")
    assert (r.status_code, r.json()["code"], r.json()["error"]) == (504, 1204, "GatewayTimeout")
    assert r.headers["retry-after"] == "5"


@pytest.mark.parametrize(("fields", "words"), [
    ({"style": "flux-mini"}, "prompt"),
    ({"prompt": PROMPT}, "style"),
    ({"prompt": PROMPT, "style": "watercolour"}, "unknown style"),
    ({"prompt": PROMPT, "style": "flux-mini", "aspect_ratio": "5:1"}, "aspect_ratio must be one of 1:1"),
    ({"prompt": PROMPT, "style": "flux-mini", "aspect_ratio": "wide"}, "aspect_ratio is WIDTH:HEIGHT"),
    ({"prompt": PROMPT, "style": "flux-mini", "aspect_ratio": "0:1"}, "aspect_ratio is WIDTH:HEIGHT"),
    ({"prompt": PROMPT, "style": "flux-mini", "seed": "abc"}, "seed"),
    ({"prompt": PROMPT, "style": "flux-mini", "seed": "-1"}, "seed"),
    ({"prompt": PROMPT, "style": "flux-mini", "colour": "red"}, "colour"),
    ({"prompt": "ab", "style": "flux-mini"}, "prompt"),
    ({"prompt": "x" * 5001, "style": "flux-mini"}, "prompt"),
])
def test_invalid_requests_are_1100(server, fields, words):
    r = generate(server, **fields)
    assert r.status_code == 400, r.text
    body = r.json()
    assert (body["status"], body["code"], body["error"]) == ("error", 1100, "BadRequest") and words in body["message"]


@pytest.mark.parametrize("kwargs", [
    {"json": {"prompt": PROMPT, "style": "flux-mini"}},
    {"data": {"prompt": PROMPT, "style": "flux-mini"}},
    {"files": {"prompt": (None, PROMPT), "style": (None, "flux-mini"), "image": ("x.png", b"123", "image/png")}},
    {"content": b"--nope\r\n", "headers": {"content-type": "multipart/form-data; boundary=nope"}},
])
def test_bodies_that_are_not_the_form_are_1100(server, kwargs):
    headers = {**server.auth, **kwargs.pop("headers", {})}
    r = server.client.post("/v2/image/generations", headers=headers, **kwargs)
    assert r.status_code == 400 and r.json()["code"] == 1100, r.text


def test_prompt_filter_is_1100(tmp_path, engine):
    rules = tmp_path / "filter.txt"
    rules.write_text("\\bforbidden\\b\n")
    with running_server(tmp_path, engine, worker=RecordingWorker(RuntimeError()), prompt_filter_file=rules) as srv:
        r = generate(srv, prompt="a forbidden thing", style="flux-mini")
    assert (r.status_code, r.json()["code"]) == (400, 1100)


def test_authorization_errors(server):
    keys = server.services.keys
    cases = [({}, 400, 1000, "BadRequest"), ({"Authorization": "Bearer nonsense"}, 401, 1001, "Unauthorized")]
    revoked = keys.create("gone")
    keys.revoke(revoked.record.id)
    cases.append(({"Authorization": f"Bearer {revoked.secret}"}, 406, 1002, "NotAcceptable"))
    for headers, status, code, name in cases:
        r = generate(server, headers=headers, prompt=PROMPT, style="flux-mini")
        assert (r.status_code, r.json()["code"], r.json()["error"]) == (status, code, name)


def test_credits_and_rate(server):
    keys = server.services.keys
    broke = keys.create("broke", credits=0).secret
    r = generate(server, headers={"Authorization": f"Bearer {broke}"}, prompt=PROMPT, style="flux-mini")
    assert (r.status_code, r.json()["code"], r.json()["error"]) == (402, 1101, "PaymentRequired")
    slow = {"Authorization": f"Bearer {keys.create('slow', rate_per_min=1).secret}"}
    assert generate(server, headers=slow, prompt=PROMPT, style="nope").json()["code"] == 1100  # counted all the same
    r = generate(server, headers=slow, prompt=PROMPT, style="flux-mini")
    assert (r.status_code, r.json()["code"], r.json()["error"]) == (429, 1202, "TooManyRequests")
    assert int(r.headers["retry-after"]) >= 1


def test_unknown_routes_answer_in_the_error_shape(server):
    r = server.client.get("/v2/image/generations", headers=server.auth)
    assert r.status_code == 404 and r.json()["status"] == "error"


def test_a_database_failure_is_1203(server, monkeypatch):
    import sqlite3

    def locked(token):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(server.services.keys, "lookup", locked)
    r = generate(server, prompt=PROMPT, style="flux-mini")
    assert (r.status_code, r.json()["code"], r.json()["error"]) == (503, 1203, "ServiceUnavailable")
    assert "locked" not in r.text


def test_redis_out_of_reach_is_1201(server, monkeypatch):
    """A real Redis client pointed at a port nothing listens on: the outage reads as the reference's
    "Unable to connect to Redis" (1201), not as a model being unavailable (1200)."""
    from helpers import free_port
    from kiln.keys.redis_store import RedisKeyStore

    keys = RedisKeyStore(f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setattr(server.services, "keys", keys)
    try:
        r = generate(server, prompt=PROMPT, style="flux-mini")
    finally:
        keys.close()
    assert (r.status_code, r.json()["code"], r.json()["error"]) == (503, 1201, "ServiceUnavailable")
    assert "key store" in r.json()["message"] and "Traceback" not in r.text
