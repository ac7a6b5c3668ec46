"""Webhooks: Standard Webhooks signatures, the durable outbox and its schedule, the dispatcher against
a real receiver on 127.0.0.1 (retries, redirects, TLS and connection errors) and httpx mock transports
(huge and trickling answers, the concurrency cap). No fixed sleeps: a fake clock, explicit rounds,
events with timeouts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import random
import shutil
import socket
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from helpers import Clock

from kiln.webhooks import (
    DEFAULT_SCHEDULE,
    DeliveryState,
    Dispatcher,
    Outbox,
    WebhookVerificationError,
    new_secret,
    sign,
    validate_webhook_url,
    verify,
)

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
OTHER = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()
BODY = b'{"id":"j_1","status":"complete"}'
T0 = 1_700_000_000.0


def independent_signature(secret: str, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """The spec's computation, written out here so the tests do not trust sign()."""
    key = base64.b64decode(secret.split("_", 1)[1])
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def headers_for(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def outbox(tmp_path, clock):
    box = Outbox(tmp_path / "webhooks.db", clock=clock, rng=random.Random(7))
    yield box
    box.close()


# --- signing -------------------------------------------------------------------------------------


def test_new_secret_is_whsec_base64_of_random_bytes():
    a, b = new_secret(), new_secret()
    assert a.startswith("whsec_") and a != b
    assert len(base64.b64decode(a.removeprefix("whsec_"), validate=True)) == 32
    with pytest.raises(ValueError, match="at least 24"):
        new_secret(16)


def test_signature_is_the_spec_hmac():
    ts = int(T0)
    assert sign(SECRET, "msg_1", ts, BODY) == "v1," + independent_signature(SECRET, "msg_1", ts, BODY)
    # and verify() accepts a header computed without sign()
    verify(SECRET, headers_for("msg_1", ts, "v1," + independent_signature(SECRET, "msg_1", ts, BODY)), BODY, now=T0)
    # the prefix is optional for the key; header names are case-insensitive; str bodies are UTF-8
    loud = {k.title(): v for k, v in headers_for("msg_1", ts, sign(SECRET, "msg_1", ts, BODY)).items()}
    verify(SECRET.removeprefix("whsec_"), loud, BODY.decode(), now=T0)


def test_tolerance_window():
    ts = int(T0)
    headers = headers_for("msg_1", ts, sign(SECRET, "msg_1", ts, BODY))
    verify(SECRET, headers, BODY, now=T0 + 300)
    verify(SECRET, headers, BODY, now=T0 - 300)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, headers, BODY, now=T0 + 301)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify(SECRET, headers, BODY, now=T0 - 301)
    verify(SECRET, headers, BODY, tolerance_s=3600, now=T0 + 3000)


def test_several_signatures_in_one_header():
    ts = int(T0)
    good = "v1," + independent_signature(SECRET, "msg_1", ts, BODY)
    noise = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= v1a,c29tZXRoaW5nIGVsc2U= v2,x"
    verify(SECRET, headers_for("msg_1", ts, f"{noise} {good}"), BODY, now=T0)
    # a sender rotating secrets signs with both; a receiver holding either accepts
    both = sign([OTHER, SECRET], "msg_1", ts, BODY)
    assert both.split() == ["v1," + independent_signature(s, "msg_1", ts, BODY) for s in (OTHER, SECRET)]
    for secret in (OTHER, SECRET, [new_secret(), SECRET]):
        verify(secret, headers_for("msg_1", ts, both), BODY, now=T0)
    with pytest.raises(WebhookVerificationError):
        verify(new_secret(), headers_for("msg_1", ts, both), BODY, now=T0)


def test_tampering_is_rejected():
    ts = int(T0)
    sig = sign(SECRET, "msg_1", ts, BODY)
    for headers, body in [
        (headers_for("msg_1", ts, sig), BODY + b" "),  # body
        (headers_for("msg_2", ts, sig), BODY),  # id
        (headers_for("msg_1", ts + 1, sig), BODY),  # timestamp, still inside the window
        (headers_for("msg_1", ts, sig.replace("v1,", "v1a,")), BODY),  # not a v1 signature
        (headers_for("msg_1", ts, "v1," + sig[4:-4] + "AAA="), BODY),
    ]:
        with pytest.raises(WebhookVerificationError):
            verify(SECRET, headers, body, now=T0)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(SECRET, {"webhook-id": "msg_1", "webhook-timestamp": str(ts)}, BODY, now=T0)
    with pytest.raises(WebhookVerificationError, match="integer"):
        verify(SECRET, headers_for("msg_1", ts, sig) | {"webhook-timestamp": f"{T0}"}, BODY, now=T0)


def test_a_malformed_secret_is_a_configuration_error_not_a_bad_message():
    headers = headers_for("msg_1", int(T0), sign(SECRET, "msg_1", int(T0), BODY))
    for bad in ("whsec_not*base64", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError) as info:
            verify(bad, headers, BODY, now=T0)
        assert type(info.value) is ValueError


# --- the outbox ----------------------------------------------------------------------------------


def test_enqueue_is_due_now_and_idempotent_per_job_and_url(outbox, clock, tmp_path):
    d = outbox.enqueue("j_1", "https://example.com/hook", BODY, "k_1")
    assert d.state is DeliveryState.PENDING and d.attempts == 0 and d.msg_id.startswith("msg_")
    assert d.next_attempt_at == T0 and d.body == BODY and d.secret_ref == "k_1"
    assert [x.msg_id for x in outbox.due(T0)] == [d.msg_id] and outbox.due(T0 - 1) == []
    assert outbox.enqueue("j_1", "https://example.com/hook", b"other", "k_1").msg_id == d.msg_id
    elsewhere = Outbox(tmp_path / "other-node.db", clock=clock)  # another API node saw the job end too
    assert elsewhere.enqueue("j_1", "https://example.com/hook", BODY, "k_1").msg_id == d.msg_id
    elsewhere.close()
    second = outbox.enqueue("j_1", "https://example.com/other", BODY, "k_1")
    assert [x.msg_id for x in outbox.state_for_job("j_1")] == [d.msg_id, second.msg_id]
    assert outbox.state_for_job("j_unknown") == []
    with pytest.raises(ValueError):
        outbox.enqueue("j_2", "ftp://example.com/hook", BODY, "k_1")


@pytest.mark.parametrize(
    "url",
    ["ftp://x.com/", "https:///path", "/relative", "https://user:pw@x.com/", "http://x.com:99999/",
     "http://x" + "y" * 2050],
)
def test_validate_webhook_url_refuses(url):
    with pytest.raises(ValueError):
        validate_webhook_url(url)


def test_validate_webhook_url_accepts():
    for url in ("https://example.com/hook?token=1", "http://10.0.0.1:8080/cb", "https://[::1]/x"):
        assert validate_webhook_url(url) == url


def test_backoff_is_the_schedule_stretched_by_bounded_jitter(tmp_path, clock):
    box = Outbox(tmp_path / "w.db", clock=clock, jitter=0.2, rng=random.Random(1))
    bases = [DEFAULT_SCHEDULE[min(n, len(DEFAULT_SCHEDULE)) - 1] for n in range(1, 40)]
    assert bases == sorted(bases) and bases[:7] == [5, 30, 120, 600, 1800, 3600, 7200]
    for n, base in enumerate(bases, start=1):
        for _ in range(20):
            assert base <= box.backoff(n) < base * 1.2
    exact = Outbox(tmp_path / "x.db", clock=clock, jitter=0.0)
    assert [exact.backoff(n) for n in range(1, 10)] == [5, 30, 120, 600, 1800, 3600, 7200, 7200, 7200]
    for bad in ((), (5, 0), (30, 5)):
        with pytest.raises(ValueError, match="schedule"):
            Outbox(tmp_path / "y.db", schedule=bad)
    for box_ in (box, exact):
        box_.close()


def test_failing_forever_retries_for_24_hours_then_fails(outbox, clock):
    d = outbox.enqueue("j_1", "https://example.com/hook", BODY, "k_1")
    times, delays = [], []
    while True:
        assert [x.msg_id for x in outbox.due(clock.now)] == [d.msg_id]
        times.append(clock.now)
        d = outbox.record_attempt(d.msg_id, 503)
        if d.state is not DeliveryState.PENDING:
            break
        delays.append(d.next_attempt_at - clock.now)
        assert outbox.due(clock.now) == []
        clock.now = d.next_attempt_at
    assert d.state is DeliveryState.FAILED and d.next_attempt_at is None and d.last_status == "503"
    assert d.attempts == len(times) and d.first_attempt_at == times[0] and d.last_error == "HTTP 503"
    assert times[-1] - times[0] >= 24 * 3600 > times[-2] - times[0]  # at least 24 h, then it stops
    for n, delay in enumerate(delays, start=1):
        base = DEFAULT_SCHEDULE[min(n, len(DEFAULT_SCHEDULE)) - 1]
        assert base <= delay < base * 1.2
    assert 17 <= d.attempts <= 20
    assert outbox.record_attempt(d.msg_id, 200) == d  # an end state never changes


def test_success_and_permanent_failure(outbox, clock):
    a = outbox.enqueue("j_1", "https://example.com/a", BODY, "k_1")
    b = outbox.enqueue("j_2", "https://example.com/b", BODY, "k_1")
    clock.now += 3
    a = outbox.record_attempt(a.msg_id, 204)
    assert (a.state, a.attempts, a.last_status, a.last_error, a.delivered_at) == ("delivered", 1, "204", None, T0 + 3)
    b = outbox.record_attempt(b.msg_id, error="refused", detail="private address", permanent=True)
    assert (b.state, b.last_status, b.last_error, b.next_attempt_at) == ("failed", "refused", "private address", None)
    summary = a.summary()
    assert summary["state"] == "delivered" and summary["delivered_at"].timestamp() == T0 + 3
    assert "body" not in summary and "secret_ref" not in summary
    with pytest.raises(KeyError):
        outbox.record_attempt("msg_missing", 200)
    assert outbox.purge(T0 + 1) == 2 and outbox.get(a.msg_id) is None


def test_the_outbox_survives_a_restart_and_claims_are_leased(tmp_path, clock):
    path = tmp_path / "webhooks.db"
    box = Outbox(path, clock=clock)
    d = box.enqueue("j_1", "https://example.com/hook", BODY, "k_1")
    box.close()

    box = Outbox(path, clock=clock)
    assert [x.msg_id for x in box.due()] == [d.msg_id] and box.get(d.msg_id).body == BODY
    assert [x.msg_id for x in box.claim(limit=4, lease=60)] == [d.msg_id]
    assert box.due() == [] and box.claim(limit=4, lease=60) == []
    box.close()  # "crashed" mid-attempt: nothing was recorded

    box = Outbox(path, clock=clock)
    assert box.due() == [] and box.next_due_at() == T0 + 60
    clock.now += 60
    assert [x.msg_id for x in box.due()] == [d.msg_id] and box.get(d.msg_id).attempts == 0
    box.close()


# --- the dispatcher against a real receiver -------------------------------------------------------


class Receiver:
    """A threaded HTTP server on 127.0.0.1; the n-th POST gets actions[n] (the last one repeats)."""

    def __init__(self, *actions, tls: ssl.SSLContext | None = None) -> None:
        self.actions = list(actions)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.cond = threading.Condition()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.cond:
                    receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    action = receiver.actions[min(len(receiver.requests), len(receiver.actions)) - 1]
                    receiver.cond.notify_all()
                try:
                    action(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the dispatcher gave up on a slow answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str = "/hook", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def wait_for(self, n: int, timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.requests) >= n, timeout)

    def slow(self, handler: BaseHTTPRequestHandler) -> None:
        """Answers only when the test ends, long after the dispatcher's deadline."""
        self.release.wait(30)
        answer(200)(handler)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def answer(code: int, headers: dict[str, str] | None = None, body: bytes = b""):
    def act(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(code)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return act


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(*actions, tls: ssl.SSLContext | None = None) -> Receiver:
        made.append(Receiver(*actions, tls=tls))
        return made[-1]

    yield make
    for r in made:
        r.close()


def dispatcher(outbox, **kw) -> Dispatcher:
    kw.setdefault("secret_for", lambda ref: SECRET)
    kw.setdefault("timeout", 5.0)
    return Dispatcher(outbox, **kw)


def test_retries_until_the_receiver_accepts(outbox, clock, receiver):
    r = receiver(answer(500, body=b"boom: not ready"), None, answer(200))
    r.actions[1] = r.slow
    d = outbox.enqueue("j_1", r.url(), BODY, "k_1")
    disp = dispatcher(outbox, timeout=1.0)

    [first] = disp.run_round()
    assert (first.state, first.attempts, first.last_status) == ("pending", 1, "500")
    assert first.last_error == "HTTP 500: boom: not ready"
    assert disp.run_round() == []  # not due yet
    clock.now += 10
    [second] = disp.run_round()
    assert (second.state, second.attempts, second.last_status) == ("pending", 2, "timeout")
    clock.now += 60
    [third] = disp.run_round()
    assert (third.state, third.attempts, third.last_status) == ("delivered", 3, "200")
    assert outbox.state_for_job("j_1") == [third] and third.delivered_at == T0 + 70

    assert r.wait_for(3)
    ids = {headers["webhook-id"] for _, headers, _ in r.requests}
    stamps = [int(headers["webhook-timestamp"]) for _, headers, _ in r.requests]
    assert ids == {d.msg_id} and stamps == [int(T0), int(T0) + 10, int(T0) + 70]
    for (path, headers, body), stamp in zip(r.requests, stamps):
        assert path == "/hook" and body == BODY and headers["content-type"] == "application/json"
        assert headers["webhook-signature"] == "v1," + independent_signature(SECRET, d.msg_id, stamp, BODY)
        verify(SECRET, headers, body, now=stamp)


def test_redirects_are_not_followed(outbox, receiver):
    r = receiver(None, answer(200))
    r.actions[0] = answer(302, {"location": r.url("/elsewhere")})
    outbox.enqueue("j_1", r.url(), BODY, "k_1")
    [d] = dispatcher(outbox).run_round()
    assert (d.state, d.last_status) == ("pending", "302") and "not followed" in d.last_error
    assert [path for path, _, _ in r.requests] == ["/hook"]


def test_tls_and_connection_errors_are_retried(outbox, receiver):
    r = receiver(answer(200))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    outbox.enqueue("j_tls", r.url(scheme="https"), BODY, "k_1")  # TLS to a plain-HTTP server
    outbox.enqueue("j_closed", f"http://127.0.0.1:{closed_port}/hook", BODY, "k_1")
    results = {d.job_id: d for d in dispatcher(outbox).run_round()}
    assert (results["j_tls"].state, results["j_tls"].last_status) == ("pending", "tls_error")
    assert (results["j_closed"].state, results["j_closed"].last_status) == ("pending", "connect_error")


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_refused_url_fails_without_a_connection(outbox, asynchronous):
    def refuse(url: str) -> None:
        raise ValueError(f"{url} resolves to a private address")

    async def refuse_async(url: str) -> None:
        refuse(url)

    def transport() -> httpx.AsyncBaseTransport:
        return httpx.MockTransport(lambda request: pytest.fail("a refused URL was contacted"))

    outbox.enqueue("j_1", "http://10.0.0.1/hook", BODY, "k_1")
    [d] = dispatcher(outbox, check_url=refuse_async if asynchronous else refuse, transport=transport).run_round()
    assert (d.state, d.attempts, d.last_status) == ("failed", 1, "refused")
    assert d.last_error == "http://10.0.0.1/hook resolves to a private address"


def test_vetted_addresses_are_pinned(outbox, receiver):
    r = receiver(answer(200))
    checked: list[str] = []

    async def vet(url: str) -> list[str]:
        checked.append(url)
        return ["127.0.0.2", "127.0.0.1"]  # nothing listens on the first: the second is tried

    url = f"http://hooks.example.invalid:{r.port}/hook"  # a name that resolves nowhere
    outbox.enqueue("j_1", url, BODY, "k_1")
    [d] = dispatcher(outbox, check_url=vet).run_round()
    assert (d.state, d.last_status) == ("delivered", "200") and checked == [url]
    [(path, headers, body)] = r.requests
    assert path == "/hook" and headers["host"] == f"hooks.example.invalid:{r.port}" and body == BODY

    outbox.enqueue("j_2", url, BODY, "k_1")
    [d] = dispatcher(outbox, check_url=lambda url: []).run_round()
    assert (d.state, d.last_status) == ("pending", "dns_error")


def test_pinned_https_checks_the_certificate_against_the_urls_host(outbox, receiver, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=hooks.test", "-addext", "subjectAltName=DNS:hooks.test"],
        check=True, capture_output=True,
    )
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    r = receiver(answer(200), tls=server_tls)

    def transport() -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport(verify=ssl.create_default_context(cafile=str(cert)))

    outbox.enqueue("j_right", f"https://hooks.test:{r.port}/hook", BODY, "k_1")
    outbox.enqueue("j_wrong", f"https://other.test:{r.port}/hook", BODY, "k_1")
    disp = dispatcher(outbox, check_url=lambda url: ["127.0.0.1"], transport=transport)
    results = {d.job_id: d for d in disp.run_round()}
    assert (results["j_right"].state, results["j_right"].last_status) == ("delivered", "200")
    assert (results["j_wrong"].state, results["j_wrong"].last_status) == ("pending", "tls_error")
    assert [h["host"] for _, h, _ in r.requests] == [f"hooks.test:{r.port}"]


def test_a_failed_address_lookup_is_retried(outbox):
    def unresolvable(url: str) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    outbox.enqueue("j_1", "https://nowhere.invalid/hook", BODY, "k_1")
    [d] = dispatcher(outbox, check_url=unresolvable).run_round()
    assert (d.state, d.last_status) == ("pending", "dns_error")


def test_secrets_resolved_at_each_attempt(outbox):
    seen: list[httpx.Request] = []

    def transport() -> httpx.AsyncBaseTransport:
        return httpx.MockTransport(lambda request: seen.append(request) or httpx.Response(200))

    outbox.enqueue("j_rotating", "https://example.com/a", BODY, "k_rotating")
    outbox.enqueue("j_deleted", "https://example.com/b", BODY, "k_deleted")
    keys = {"k_rotating": [OTHER, SECRET], "k_deleted": None}
    results = {d.job_id: d for d in dispatcher(outbox, secret_for=keys.get, transport=transport).run_round()}
    assert results["j_rotating"].state == "delivered"
    assert (results["j_deleted"].state, results["j_deleted"].last_status) == ("failed", "no_secret")
    [request] = seen
    for secret in (OTHER, SECRET):
        verify(secret, request.headers, request.content, now=T0)

    def broken(ref: str) -> str:
        raise RuntimeError("key store locked")

    outbox.enqueue("j_later", "https://example.com/c", BODY, "k_1")
    [d] = dispatcher(outbox, secret_for=broken, transport=transport).run_round()
    assert (d.state, d.last_status) == ("pending", "secret_unavailable")


def test_an_unexpected_error_is_a_failed_attempt_not_a_dead_dispatcher(outbox):
    def explode(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("bug")

    outbox.enqueue("j_1", "https://example.com/hook", BODY, "k_1")
    [d] = dispatcher(outbox, transport=lambda: httpx.MockTransport(explode)).run_round()
    assert (d.state, d.attempts, d.last_status) == ("pending", 1, "internal_error")


class Endless(httpx.AsyncByteStream):
    """A response body that never ends: counts what was read, or stalls after one chunk."""

    def __init__(self, stall: bool = False) -> None:
        self.chunks = 0
        self.stall = stall

    async def __aiter__(self):
        while True:
            self.chunks += 1
            yield b"x" * 512
            if self.stall:
                await asyncio.Event().wait()


def test_huge_and_trickling_answers_are_not_read(outbox, clock):
    bodies = {"/huge": Endless(), "/slow-ok": Endless(stall=True), "/trickle": Endless(stall=True)}

    def transport() -> httpx.AsyncBaseTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            code = 200 if request.url.path == "/slow-ok" else 500
            return httpx.Response(code, stream=bodies[request.url.path])

        return httpx.MockTransport(handler)

    outbox.enqueue("/huge", "https://example.com/huge", BODY, "k_1")
    outbox.enqueue("/slow-ok", "https://example.com/slow-ok", BODY, "k_1")
    results = {d.job_id: d for d in dispatcher(outbox, transport=transport).run_round()}
    assert (results["/huge"].last_status, results["/huge"].state) == ("500", "pending")
    assert bodies["/huge"].chunks <= 3 and results["/huge"].last_error == "HTTP 500: " + "x" * 200
    assert (results["/slow-ok"].last_status, results["/slow-ok"].state) == ("200", "delivered")
    assert bodies["/slow-ok"].chunks == 0  # a 2xx body is never read

    outbox.enqueue("/trickle", "https://example.com/trickle", BODY, "k_1")
    [d] = dispatcher(outbox, timeout=0.3, transport=transport).run_round()
    assert (d.last_status, d.state, d.last_error) == ("500", "pending", "HTTP 500")  # the code counts, not the stall


def test_no_more_than_concurrency_attempts_at_once(outbox):
    inflight, peak = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        for _ in range(5):
            await asyncio.sleep(0)
        inflight -= 1
        return httpx.Response(200)

    for n in range(10):
        outbox.enqueue(f"j_{n}", "https://example.com/hook", BODY, "k_1")
    results = dispatcher(outbox, concurrency=4, transport=lambda: httpx.MockTransport(handler)).run_round()
    assert len(results) == 10 and {d.state for d in results} == {"delivered"} and peak == 4


def test_the_thread_resumes_wakes_on_enqueue_and_stops(tmp_path, clock, receiver):
    r = receiver(answer(200))
    path = tmp_path / "webhooks.db"
    before = Outbox(path, clock=clock)
    old = before.enqueue("j_old", r.url(), BODY, "k_1")  # enqueued before a restart
    before.close()

    box = Outbox(path, clock=clock)
    disp = dispatcher(box)
    disp.start()
    try:
        assert r.wait_for(1)
        new = box.enqueue("j_new", r.url(), BODY, "k_1")  # nothing else is due: only the enqueue wakes it
        assert r.wait_for(2)
    finally:
        assert disp.stop(timeout=5)  # waits for attempts in flight, so both are recorded
    assert not disp.alive
    assert [d.state for d in box.state_for_job("j_old") + box.state_for_job("j_new")] == ["delivered"] * 2
    assert [h["webhook-id"] for _, h, _ in r.requests] == [old.msg_id, new.msg_id]
    box.close()


def test_stop_cancels_a_hanging_attempt_and_keeps_it_pending(outbox, clock, receiver):
    r = receiver(None)
    r.actions[0] = r.slow
    d = outbox.enqueue("j_1", r.url(), BODY, "k_1")
    disp = dispatcher(outbox, timeout=30)
    disp.start()
    assert r.wait_for(1)
    assert disp.stop(timeout=0.1)
    after = outbox.get(d.msg_id)
    assert (after.state, after.attempts) == ("pending", 0)  # not recorded: sent again after the lease
    assert after.next_attempt_at == T0 + disp.lease
    disp.start()  # restarted: the message waits out its lease, so nothing is sent
    try:
        with pytest.raises(RuntimeError, match="running"):
            disp.run_round()  # would race the thread
    finally:
        assert disp.stop(timeout=1)
    assert len(r.requests) == 1
