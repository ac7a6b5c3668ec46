"""Job change notices: how an SSE stream learns that its job moved without polling the broker.

A broker tells a :class:`ChangeFeed` about every change it makes to a job (queued, claimed, a step,
finished, cancelled, handed back): ``feed.changed(job_id)``. A claim also says ``changed(ANY)``,
since taking the head of the queue moves every queued job's position. A follower subscribes *before*
it reads the job, so a change between its read and its wait is never missed::

    with feed.subscribe(job_id) as changes:
        while True:
            job = broker.get(job_id)          # read, emit what is new
            ...
            await changes.next(timeout=1.0)   # wake on the next notice, or after a second anyway

Notices are hints, never the data: the follower always reads the job from the broker, so a notice
that is lost (a Redis subscription reconnecting) costs at most one ``timeout`` of delay.

The embedded broker calls the feed directly (its worker runs in the same process). The Redis
broker's scripts ``PUBLISH`` each change on ``<prefix>changes``; :class:`RedisChangeListener` (one
subscription per API node) forwards them to that node's feed, so a job run by a worker on another
machine is followed as promptly as a local one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Self

log = logging.getLogger(__name__)

ANY = "*"  # a notice for every follower (the queue order moved, or notices may have been lost)


class Subscription:
    """One follower's view of a job's notices, on the event loop it was made on."""

    def __init__(self, feed: ChangeFeed, job_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.feed, self.job_id, self._loop = feed, job_id, loop
        self._event = asyncio.Event()

    def _fire(self) -> None:  # any thread
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the loop is closed: its follower is gone
            pass

    async def next(self, timeout: float) -> bool:
        """Wait for a notice that came after the last one taken (or since subscribing); True if one
        came, False after ``timeout`` seconds without."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        self._event.clear()
        return True

    def close(self) -> None:
        self.feed._remove(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChangeFeed:
    """Notices of job changes, from any thread, to followers on event loops. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = {}

    def subscribe(self, job_id: str) -> Subscription:
        """Follow ``job_id`` from the running event loop (close the subscription when done)."""
        sub = Subscription(self, job_id, asyncio.get_running_loop())
        with self._lock:
            self._subs.setdefault(job_id, set()).add(sub)
        return sub

    def changed(self, job_id: str) -> None:
        """``job_id`` changed (``ANY``: wake every follower). Never blocks; safe from any thread."""
        with self._lock:
            if job_id == ANY:
                targets = [s for subs in self._subs.values() for s in subs]
            else:
                targets = list(self._subs.get(job_id, ()))
        for sub in targets:
            sub._fire()

    def followers(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._subs.values())

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.job_id]


class RedisChangeListener:
    """Forwards the Redis broker's change notices (``PUBLISH <prefix>changes <job id>``) to ``feed``.

    One thread and one subscription per process. When the subscription breaks (Redis restarted, the
    network cut) it reconnects with backoff and then wakes every follower once (``ANY``), since notices
    sent meanwhile are lost; followers re-read their jobs and carry on."""

    def __init__(self, url: str, feed: ChangeFeed, *, prefix: str = "kiln:",
                 connect: Callable[[str], object] | None = None) -> None:
        from kiln.redis_client import connect as default_connect

        self.feed, self.channel = feed, f"{prefix}changes"
        self._client = (connect or default_connect)(url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.subscribed = threading.Event()  # set while the subscription is live (tests wait on it)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kiln-changes", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._client.close()

    def _run(self) -> None:
        import redis

        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                self.subscribed.set()
                self.feed.changed(ANY)  # anything sent while (re)connecting was lost: everyone re-reads
                backoff = 0.1
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "message":
                        self.feed.changed(message["data"])
            except (redis.RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("job change notices from Redis interrupted (%s); reconnecting in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(5.0, backoff * 2)
            finally:
                self.subscribed.clear()
                try:
                    pubsub.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
