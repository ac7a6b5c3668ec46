"""The dispatcher: posts due outbox messages from a thread of its own, so no receiver can stall the GPU.

It runs an asyncio loop in one daemon thread, sends at most ``concurrency`` messages at once, and
sleeps until the earliest pending message is due or :meth:`Outbox.enqueue` wakes it. Each attempt
has one deadline (``timeout``, 10 s) covering connect, upload and the answer's head, so a receiver
that trickles bytes cannot hold a slot; a 2xx answer's body is never read. Redirects are not followed (a 3xx is a failed
attempt: a signed body must not be replayed to wherever a receiver points); of a non-2xx answer at
most ``max_error_bytes`` are read, for the error shown on the job. Proxy variables in the
environment are ignored (``trust_env=False``) and connections are not kept alive: webhooks go
straight to the receiver that ``check_url`` vetted.

Delivery is at least once: a message is claimed with a lease before it is sent, so a crash or a
:meth:`Dispatcher.stop` that cuts an attempt short leaves it pending, to be sent again once the
lease runs out (at the next start). Receivers dedupe on ``webhook-id``.

``secret_for(secret_ref)`` returns the current signing secret(s) of a message's API key — two
during a rotation, each giving one ``v1`` signature — or None when the key has none any more
(a permanent failure). An exception from it is retried.

``check_url(url)`` (optional; sync or async) runs before every attempt, because an address can
change in 24 hours. To refuse a URL (SSRF: loopback, private, link-local, metadata addresses), it
raises; the message fails permanently with the exception's text and nothing is sent. ``OSError``
(a failed DNS lookup) is the exception to that rule: it counts as a failed attempt and is retried.
It returns None to let httpx resolve the name itself, or — better — the addresses it resolved and
vetted: the dispatcher then connects only to those (in order, the next one when a connection is
refused), with the URL's host in the ``Host`` header and in TLS (SNI and certificate check), so a
DNS answer that changes between check and connect (rebinding) cannot redirect the message. An
empty list counts as a failed lookup. A sync check runs in a worker thread; each hook has the
attempt's ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import httpx

from kiln.webhooks.delivery import Delivery, DeliveryState, Outbox
from kiln.webhooks.signing import sign

log = logging.getLogger(__name__)

USER_AGENT = "kiln-webhooks/1"
MAX_IDLE_S = 60.0  # re-reads the outbox at least this often (other processes, wall-clock jumps)
ERROR_PAUSE_S = 5.0  # after the outbox itself failed (disk full, locked)
MIN_WAIT_S = 0.05  # a floor on timed waits, so a clock going backwards cannot make the loop spin

SecretResolver = Callable[[str], str | Sequence[str] | None]
Vetted = Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] | None
UrlCheck = Callable[[str], Awaitable[Vetted] | Vetted]


@dataclass(frozen=True)
class _Outcome:
    status_code: int | None = None
    error: str | None = None
    detail: str | None = None
    permanent: bool = False


class Dispatcher:
    """Sends the outbox's due messages, signed, with httpx; see the module docstring for the rules.

    ``transport``: a factory for the httpx transport of each client the dispatcher opens (tests pass
    ``httpx.MockTransport``; an egress proxy or a private CA goes here as an
    ``httpx.AsyncHTTPTransport``). ``clock`` (the ``webhook-timestamp``) defaults to the outbox's.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        secret_for: SecretResolver,
        check_url: UrlCheck | None = None,
        timeout: float = 10.0,
        concurrency: int = 4,
        max_error_bytes: int = 1024,
        transport: Callable[[], httpx.AsyncBaseTransport] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if concurrency < 1 or timeout <= 0:
            raise ValueError("concurrency must be at least 1 and timeout positive")
        self.outbox = outbox
        self.secret_for = secret_for
        self.check_url = check_url
        self.timeout = timeout
        self.concurrency = concurrency
        self.max_error_bytes = max_error_bytes
        self.transport = transport
        self.clock = clock or outbox.clock
        # An attempt is at most three deadlines (check, secret, post), so a claim this long never
        # expires under a live attempt and the message is never sent twice at once.
        self.lease = max(60.0, 4 * timeout)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._grace = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the sending thread; pending messages in the outbox (from before a restart) are picked up."""
        if self.alive:
            return
        self._stopping.clear()
        self.outbox.subscribe(self.notify)
        self._thread = threading.Thread(target=self._run, name="kiln-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Let attempts in flight finish for up to ``timeout`` s, cancel the rest, end the thread.

        A cancelled attempt stays pending in the outbox. True when the thread has ended.
        """
        self.outbox.unsubscribe(self.notify)
        thread = self._thread
        if thread is None:
            return True
        self._grace = timeout
        self._stopping.set()
        self.notify()
        thread.join(timeout + 1.0)
        return not thread.is_alive()

    def notify(self) -> None:
        """Wake the thread to look for due messages now. Safe from any thread; a no-op when not running."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    def run_round(self) -> list[Delivery]:
        """Attempt every due message once, in the calling thread, and return their new states.

        For tests and maintenance commands; refused while the thread runs (it would race it).
        """
        if self.alive:
            raise RuntimeError("the dispatcher thread is running; run_round is for a stopped dispatcher")
        return asyncio.run(self._round())

    # --- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            log.exception("the webhook dispatcher stopped on an error; pending messages wait for the next start")

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout),
            follow_redirects=False,
            trust_env=False,
            # No keep-alive: a pooled connection is keyed by address, and one opened (and its
            # certificate checked) for one host name must not carry another host's message.
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=0),
            transport=self.transport() if self.transport is not None else None,
            headers={"user-agent": USER_AGENT},
        )

    async def _round(self) -> list[Delivery]:
        results: list[Delivery] = []
        async with self._client() as client:
            while batch := await asyncio.to_thread(self._claim, self.concurrency):
                results += await asyncio.gather(*(self._attempt(client, d) for d in batch))
        return results

    def _claim(self, limit: int) -> list[Delivery]:
        return self.outbox.claim(self.clock(), limit=limit, lease=self.lease)

    def _next_delay(self) -> float:
        at = self.outbox.next_due_at()
        return MAX_IDLE_S if at is None else min(MAX_IDLE_S, max(MIN_WAIT_S, at - self.clock()))

    async def _main(self) -> None:
        wake = asyncio.Event()
        self._loop, self._wake = asyncio.get_running_loop(), wake
        try:
            await self._serve(wake)
        finally:
            if self._wake is wake:
                self._loop = self._wake = None

    async def _serve(self, wake: asyncio.Event) -> None:
        # The outbox is called in worker threads: a database busy with another writer must not
        # stall this loop, or attempts in flight would miss their deadlines.
        tasks: set[asyncio.Task[Delivery]] = set()

        def done(task: asyncio.Task[Delivery]) -> None:
            tasks.discard(task)
            wake.set()
            if not task.cancelled() and task.exception() is not None:
                log.error("webhook attempt not recorded; retried after its lease", exc_info=task.exception())

        async with self._client() as client:
            while not self._stopping.is_set():
                wake.clear()
                delay = MAX_IDLE_S
                try:
                    if len(tasks) < self.concurrency:
                        for delivery in await asyncio.to_thread(self._claim, self.concurrency - len(tasks)):
                            task = asyncio.create_task(self._attempt(client, delivery))
                            tasks.add(task)
                            task.add_done_callback(done)
                    if len(tasks) < self.concurrency:  # else a finishing attempt wakes the loop
                        delay = await asyncio.to_thread(self._next_delay)
                except Exception:
                    log.exception("the webhook outbox failed; trying again in %g s", ERROR_PAUSE_S)
                    delay = ERROR_PAUSE_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), delay)
            if tasks:
                _, late = await asyncio.wait(tasks, timeout=self._grace)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)

    # --- one attempt -----------------------------------------------------------------------------

    async def _attempt(self, client: httpx.AsyncClient, delivery: Delivery) -> Delivery:
        try:
            outcome = await self._send(client, delivery)
        except Exception:
            log.exception("webhook %s (job %s): the attempt failed inside Kiln", delivery.msg_id, delivery.job_id)
            outcome = _Outcome(error="internal_error", detail="the attempt failed inside the server; see its log")
        updated = await asyncio.to_thread(
            self.outbox.record_attempt,
            delivery.msg_id,
            outcome.status_code,
            outcome.error,
            detail=outcome.detail,
            permanent=outcome.permanent,
        )
        level = logging.WARNING if updated.state is DeliveryState.FAILED else logging.DEBUG
        log.log(level, "webhook %s (job %s): attempt %d, %s, now %s", updated.msg_id, updated.job_id,
                updated.attempts, updated.last_status, updated.state)
        return updated

    async def _send(self, client: httpx.AsyncClient, delivery: Delivery) -> _Outcome:
        addresses: list[str] | None = None
        if self.check_url is not None:
            try:
                async with asyncio.timeout(self.timeout):
                    vetted = await _call(self.check_url, delivery.url)
                if vetted is not None:
                    addresses = [ipaddress.ip_address(str(a)).compressed for a in vetted]
            except TimeoutError:
                return _Outcome(error="check_timeout", detail=f"the address check took over {self.timeout:g} s")
            except OSError as exc:
                return _Outcome(error="dns_error", detail=f"the webhook's address could not be checked: {exc}")
            except Exception as exc:  # any other exception is a refusal, by the hook's contract
                log.debug("webhook %s (job %s): URL refused", delivery.msg_id, delivery.job_id, exc_info=True)
                return _Outcome(error="refused", detail=str(exc) or type(exc).__name__, permanent=True)
        try:
            async with asyncio.timeout(self.timeout):
                found = await _call(self.secret_for, delivery.secret_ref)
        except Exception:
            log.exception("webhook %s: looking up its signing secret failed", delivery.msg_id)
            return _Outcome(error="secret_unavailable", detail="the signing secret could not be read; will retry")
        keys = [found] if isinstance(found, str) else list(found or ())
        if not keys:
            no_key = "the API key that submitted this job has no signing secret any more"
            return _Outcome(error="no_secret", detail=no_key, permanent=True)
        timestamp = int(self.clock())
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(keys, delivery.msg_id, timestamp, delivery.body),
        }
        if addresses == []:
            return _Outcome(error="dns_error", detail="the webhook's host name resolved to no address")
        return await self._post(client, delivery, headers, addresses)

    async def _post(
        self, client: httpx.AsyncClient, delivery: Delivery, headers: dict[str, str], addresses: list[str] | None
    ) -> _Outcome:
        status: int | None = None
        try:
            url = httpx.URL(delivery.url)
            targets = _targets(url, addresses)
            async with asyncio.timeout(self.timeout):
                for n, target in enumerate(targets, start=1):
                    request = client.build_request("POST", target, content=delivery.body, headers=headers)
                    if addresses is not None:  # connect to the vetted address, speak to the named host
                        request.headers["host"] = url.netloc.decode("ascii")
                        request.extensions["sni_hostname"] = url.raw_host.decode("ascii")
                    try:
                        response = await client.send(request, stream=True)
                    except httpx.ConnectError as exc:
                        if n == len(targets) or _is_tls(exc):
                            raise
                        continue  # the next vetted address
                    try:
                        status = response.status_code
                        return await self._judge(response)
                    finally:
                        await response.aclose()
                return _Outcome(error="connect_error", detail="no vetted address accepted a connection")
        except TimeoutError:  # the one deadline, however the receiver spent it
            if status is not None:
                return _Outcome(status, detail=None if 200 <= status < 300 else f"HTTP {status}")
            return _Outcome(error="timeout", detail=f"no answer within {self.timeout:g} s")
        except httpx.TimeoutException as exc:
            return _Outcome(error="timeout", detail=f"{type(exc).__name__}: no answer within {self.timeout:g} s")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            return _Outcome(error="invalid_url", detail=str(exc), permanent=True)
        except httpx.TransportError as exc:
            if _is_tls(exc):
                return _Outcome(error="tls_error", detail=f"TLS failed: {_root(exc)}")
            name = "connect_error" if isinstance(exc, httpx.ConnectError) else "network_error"
            return _Outcome(error=name, detail=f"{type(exc).__name__}: {_root(exc)}")

    async def _judge(self, response: httpx.Response) -> _Outcome:
        status = response.status_code
        if 200 <= status < 300:
            return _Outcome(status)  # the body is never read: nothing in it changes the outcome
        if 300 <= status < 400:
            location = response.headers.get("location", "")[:200]
            hint = "point the webhook at the final URL"
            return _Outcome(status, detail=f"HTTP {status}: redirect to {location!r} not followed; {hint}")
        return _Outcome(status, detail=f"HTTP {status}{await self._excerpt(response)}")

    async def _excerpt(self, response: httpx.Response) -> str:
        """The start of a refusal's body (``: invalid signature``), read raw and capped, or ""."""
        if response.headers.get("content-encoding", "identity") != "identity":
            return ""  # not decompressed: a small compressed body can expand to gigabytes
        data = b""
        async for chunk in response.aiter_raw():
            data += chunk
            if len(data) >= self.max_error_bytes:
                break
        text = " ".join(data[: self.max_error_bytes].decode("utf-8", "replace").split())
        text = "".join(c for c in text if c.isprintable())[:200]
        return f": {text}" if text else ""


def _targets(url: httpx.URL, addresses: list[str] | None) -> list[httpx.URL]:
    """The URL itself, or one copy per vetted address with that address as its host."""
    if addresses is None:
        return [url]
    return [url.copy_with(host=address) for address in addresses]


async def _call(hook: Callable[[str], object], arg: str) -> object:
    """Call a sync or async hook without blocking the loop; a sync one runs in a worker thread."""
    result = await hook(arg) if inspect.iscoroutinefunction(hook) else await asyncio.to_thread(hook, arg)
    if inspect.isawaitable(result):
        result = await result
    return result


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in seen and len(seen) < 10:
        seen.append(node)
        node = node.__cause__ or node.__context__
    return seen


def _is_tls(exc: BaseException) -> bool:
    return any(isinstance(e, ssl.SSLError) for e in _chain(exc))


def _root(exc: BaseException) -> str:
    """The innermost cause's message (httpx wraps httpcore wraps the socket or ssl error)."""
    for e in reversed(_chain(exc)):
        if str(e):
            return str(e)[:300]
    return type(exc).__name__
