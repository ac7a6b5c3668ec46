"""The sync tier across machines (:mod:`kiln.queue.redis_sync`), from both ends.

:class:`RemoteWorkers` stands where the in-process :class:`~kiln.worker.Worker` stands on an API node
started with ``--no-worker``: a sync request is offered to the ``kiln worker`` processes; an idle one
takes it (:class:`RemoteSync`, between queued jobs, sync first as in one process), stores the outputs
durably and replies with their names; the API node reads the bytes back from the shared store and
answers as the local sync tier does. Not taken within ``sync_wait_s``: withdrawn, 503. A worker that
took it and then goes silent for ``lease_s`` (no step, no beat): a 500 saying so, never a hang.

Steps (and WebSocket previews, WebP) travel on the request's reply list, so ``on_step`` and cancel
work as in one process.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

from kiln.engine import GenerationResult, StepEvent
from kiln.errors import CapacityExhausted, GenerationError, KilnError
from kiln.queue.redis_sync import RedisSyncChannel
from kiln.storage import Asset, AssetStore
from kiln.worker.absent import NoWorker
from kiln.worker.payload import from_payload, to_payload
from kiln.worker.runner import Stored, SyncTicket, capacity_exhausted

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often a waiting API node looks at its client's cancel flag
ROUTE_GRACE_S = 0.25  # a request offered to one worker that holds its model goes to any after this


@dataclass
class RemoteTicket(SyncTicket):
    sync_id: str = ""
    target: str | None = None  # the worker it was offered to first (routing), None: any


class RemoteWorkers(NoWorker):
    """An API node's handle on the ``kiln worker`` processes behind ``channel``; reads their outputs
    from ``store`` (the same folder or bucket the workers write to)."""

    def __init__(self, channel: RedisSyncChannel, store: AssetStore, *, wait_s: float, retry_after: int) -> None:
        super().__init__(retry_after)
        self.channel, self.store, self.wait_s = channel, store, wait_s

    def submit_sync(self, request, *, on_step=None, cancel=None, previews: bool = False) -> RemoteTicket:
        if not self.channel.workers_present():
            raise capacity_exhausted(self.retry_after)  # no worker at all: no start can come
        payload = to_payload(request, self.store)
        payload["previews"] = previews
        sync_id, target = self.channel.offer(payload, ttl_s=self.wait_s + self.channel.lease_s)
        ticket = RemoteTicket(request, on_step=on_step, cancel=cancel, previews=previews, sync_id=sync_id,
                              target=target)
        threading.Thread(target=self._follow, args=(ticket,), name=f"kiln-sync-{sync_id}", daemon=True).start()
        return ticket

    def withdraw(self, ticket: RemoteTicket) -> bool:
        return self.channel.withdraw(ticket.sync_id)

    def stop(self, timeout: float = 0.0) -> None:
        self.channel.close()

    def _follow(self, ticket: RemoteTicket) -> None:
        try:
            stored = self._wait(ticket)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request, which maps it to HTTP
            if not ticket.started.done():
                ticket.started.set_result(None)
            ticket.done.set_exception(exc if isinstance(exc, KilnError) else GenerationError("generation failed"))
            return
        finally:
            try:
                self.channel.forget(ticket.sync_id)
            except KilnError:
                pass
        if stored is not None:
            ticket.done.set_result(stored)

    def _wait(self, ticket: RemoteTicket) -> Stored | None:
        """The result, once the worker replies; None if the request was withdrawn."""
        channel, sync_id = self.channel, ticket.sync_id
        started, cancel_sent = False, False
        heard = offered = time.monotonic()
        pinned = ticket.target is not None
        while True:
            if ticket.cancel is not None and ticket.cancel.is_set() and not cancel_sent:
                channel.cancel(sync_id)
                cancel_sent = True
            if pinned and not started and time.monotonic() - offered >= ROUTE_GRACE_S:
                # the worker it was routed to did not take it (died idle, or busy after all): any may
                pinned = False
                if channel.unpin(sync_id):
                    log.info("sync request %s: worker %s did not take it; offered to any", sync_id, ticket.target)
            limit = channel.lease_s if started else self.wait_s + channel.lease_s
            wait = min(POLL_S, max(0.0, heard + limit - time.monotonic()))
            if pinned:
                wait = min(wait, max(0.0, offered + ROUTE_GRACE_S - time.monotonic()))
            message = channel.next_message(sync_id, wait)
            if message is None:
                if time.monotonic() - heard < limit:
                    continue
                if not started:
                    if channel.withdraw(sync_id):
                        raise capacity_exhausted(self.retry_after)
                    heard = time.monotonic()  # taken just now: its started message is on the way
                    continue
                raise GenerationError(f"the worker running this request went silent for {channel.lease_s:g} s "
                                      "(presumed dead); nothing was made, retry")
            heard = time.monotonic()
            kind = message["type"]
            if kind == "started":
                started = True
                ticket.started.set_result(None)
            elif kind == "step" and ticket.on_step is not None:
                preview = message.get("preview")
                ticket.on_step(StepEvent(message["step"], message["total"], _image(preview) if preview else None))
            elif kind == "done":
                return self._stored(message)
            elif kind == "error":
                raise _error(message)
            elif kind == "withdrawn":
                return None

    def _stored(self, message: dict[str, Any]) -> Stored:
        assets = [Asset.of(a["kind"], a["name"], size=a["size"], created_at=datetime.fromisoformat(a["created_at"]))
                  for a in message["assets"]]
        first = self.store.read(assets[0].kind, assets[0].name) if assets else b""
        return Stored(
            # the decoded outputs stay on the worker: the API side needs their parameters and bytes only
            result=GenerationResult(outputs=[], **message["result"]), assets=assets,
            media_type=message["media_type"], first_bytes=first, generate_ms=message["generate_ms"],
            encode_ms=message["encode_ms"], store_ms=message["store_ms"], nsfw=message["nsfw"],
        )


class RemoteSync:
    """The worker's end: takes sync requests that API nodes offer on ``channel`` and runs them."""

    def __init__(self, channel: RedisSyncChannel) -> None:
        self.channel = channel
        self._announced = 0.0

    def announce(self, worker_id: str) -> None:
        """Keep this worker counted as present (call often; it writes every ``lease_s / 3``)."""
        now = time.monotonic()
        if now - self._announced >= self.channel.lease_s / 3:
            self.channel.announce(worker_id)
            self._announced = now

    def leave(self, worker_id: str) -> None:
        self.channel.leave(worker_id)

    def run_one(self, worker: Any, block_s: float = 0.0) -> bool:
        """Take one offered request (waiting up to ``block_s``) and run it; whether there was one."""
        wake_key = getattr(worker.broker, "wake_key", None)  # a queued job ends the wait too
        taken = self.channel.take(worker.worker_id, block_s,
                                  bell=wake_key(worker.worker_id) if wake_key is not None else None)
        if taken is None:
            return False
        sync_id, payload = taken
        previews = bool(payload.get("previews"))
        cancel = threading.Event()

        def send(message: dict[str, Any]) -> None:
            try:
                if self.channel.reply(sync_id, message):
                    cancel.set()
            except KilnError:  # Redis out of reach: the API node gives up after lease_s
                log.warning("sync request %s: could not reply", sync_id, exc_info=True)

        def on_step(event: StepEvent) -> None:
            message: dict[str, Any] = {"type": "step", "step": event.step, "total": event.total}
            if previews and event.preview is not None:
                buf = io.BytesIO()
                event.preview.save(buf, "WEBP", quality=80, method=0)
                message["preview"] = base64.b64encode(buf.getvalue()).decode()
            send(message)

        worker.current_job = sync_id
        beat = _Beat(lambda: send({"type": "beat"}), self.channel.lease_s / 3)
        try:
            with beat:
                stored = worker._generate(from_payload(payload, worker.store), on_step=on_step, cancel=cancel,
                                          previews=previews, durable=True)  # durable: the API node reads it back
        except KilnError as exc:
            send({"type": "error", "code": exc.code, "message": exc.message, "details": exc.details})
        except Exception:
            log.exception("sync request %s failed", sync_id)
            send({"type": "error", "code": "generation_failed", "message": "the generation failed; see the worker log"})
        else:
            send(_done(stored))
        finally:
            worker.current_job = None
        return True


class _Beat:
    """Calls ``beat`` every ``interval`` seconds on a thread of its own while in its ``with`` block."""

    def __init__(self, beat, interval: float) -> None:
        self.beat, self.interval = beat, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-sync-beat", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()


def _done(stored: Stored) -> dict[str, Any]:
    result = {f.name: getattr(stored.result, f.name) for f in dataclasses.fields(stored.result) if f.name != "outputs"}
    return {
        "type": "done", "media_type": stored.media_type, "result": result, "nsfw": stored.nsfw,
        "generate_ms": stored.generate_ms, "encode_ms": stored.encode_ms, "store_ms": stored.store_ms,
        "assets": [{"kind": a.kind, "name": a.name, "size": a.size, "created_at": a.created_at.isoformat()}
                   for a in stored.assets],
    }


def _image(data: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data)))


def _error(message: dict[str, Any]) -> KilnError:
    """The worker's error as the same class here (the HTTP status follows the class)."""
    code, text, details = message.get("code"), message.get("message", "generation failed"), message.get("details")
    cls = _classes().get(code, GenerationError)
    try:
        if issubclass(cls, CapacityExhausted):
            return cls(text, retry_after=int((details or {}).get("retry_after", 5)), details=details)
        return cls(text, details=details)
    except TypeError:  # a class with more required context: keep its code, as a failed generation
        error = GenerationError(text, details=details)
        error.code = code or error.code
        return error


def _classes() -> dict[str, type[KilnError]]:
    """Each error code's most general class (breadth first from :class:`KilnError`)."""
    found: dict[str, type[KilnError]] = {}
    todo: list[type[KilnError]] = [KilnError]
    while todo:
        cls = todo.pop(0)
        found.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return found
