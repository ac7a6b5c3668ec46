"""Write-behind: an output is named at once and written to the store just after its bytes are sent.

A sync request's client is waiting on the connection; the content address (and so the permanent
URL in ``Content-Location``) is known as soon as the bytes are encoded, but making the file durable
(temp file, fsync, rename, folder fsync: 1.5-2 ms on a local disk, far more on S3) is not something
the client needs to wait for. :meth:`WriteBehindStore.put_soon` returns the asset record at once and
hands the write to one background thread; until the write lands, :meth:`stat` and
:meth:`open_range` serve the asset from memory, so its URL works from the first instant.

The price is named: a process killed in the few milliseconds between the response and the write
loses that one file (the client already has the bytes; no job is involved). Async jobs use the
durable :meth:`put`, which returns only once the inner store has the asset, because a job is marked
complete only after its output is stored. A failed write is retried with backoff and stays
servable from memory meanwhile; after the last attempt it is logged and dropped.

Memory is bounded: past ``max_pending_bytes`` of queued writes, :meth:`put_soon` writes
synchronously (back-pressure instead of unbounded growth).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from kiln.storage.base import Asset, AssetRange, AssetStore, clamp_range
from kiln.storage.names import Kind, asset_name, validate_media_type

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.05, 0.5, 2.0, 10.0)
"""Waits between attempts at a failed background write; after the last, the write is dropped."""


@dataclass(eq=False)
class _Pending:
    asset: Asset
    data: bytes
    deleted: bool = False


class WriteBehindStore(AssetStore):
    """An :class:`AssetStore` in front of ``inner`` whose :meth:`put_soon` does not wait for the write.

    Everything else is the inner store's behaviour, with pending assets visible to reads. Safe to
    share between threads. Call :meth:`close` at shutdown: it waits for every pending write.
    """

    def __init__(self, inner: AssetStore, *, max_pending_bytes: int = 256 * 1024 * 1024,
                 retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S) -> None:
        self.inner = inner
        self.max_pending_bytes = max_pending_bytes
        self.retry_delays_s = retry_delays_s
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._queue: deque[_Pending] = deque()
        self._pending_bytes = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.dropped = 0  # writes given up after every retry failed (also logged)

    def __repr__(self) -> str:
        return f"WriteBehindStore({self.inner!r})"

    # --- the write-behind part ---------------------------------------------------------------------

    def put_soon(self, data: bytes, kind: Kind, media_type: str) -> Asset:
        media_type = validate_media_type(kind, media_type)
        name = asset_name(data, media_type)
        asset = Asset.of(kind, name, size=len(data), created_at=datetime.now(UTC))
        with self._cond:
            if self._closed or self._pending_bytes + len(data) > self.max_pending_bytes:
                behind = False
            else:
                behind = True
                entry = _Pending(asset, bytes(data))
                self._pending[(kind, name)] = entry  # a newer put of the same content replaces it
                self._queue.append(entry)
                self._pending_bytes += len(data)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="kiln-store-writer", daemon=True)
                    self._thread.start()
                self._cond.notify_all()
        return asset if behind else self.inner.put(data, kind, media_type)

    def pending(self) -> int:
        """How many assets are waiting for their write to land."""
        with self._cond:
            return len(self._pending)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write handed over so far has landed (or was given up); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish the pending writes and stop the writer thread; later puts are synchronous."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%d asset write(s) still pending at shutdown", len(self._pending))
        self.inner.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed and drained
                entry = self._queue.popleft()
            self._write(entry)
            with self._cond:
                self._pending_bytes -= len(entry.data)
                if self._pending.get((entry.asset.kind, entry.asset.name)) is entry:
                    del self._pending[(entry.asset.kind, entry.asset.name)]
                self._cond.notify_all()

    def _write(self, entry: _Pending) -> None:
        kind, name = entry.asset.kind, entry.asset.name
        for attempt, delay in enumerate((*self.retry_delays_s, None)):
            try:
                self.inner._put(kind, name, entry.data)
            except Exception:
                if delay is None:
                    self.dropped += 1
                    log.exception("gave up writing asset /%s/%s after %d attempts", kind, name, attempt + 1)
                    return
                log.warning("writing asset /%s/%s failed; retrying in %.2f s", kind, name, delay, exc_info=True)
                time.sleep(delay)
                continue
            if entry.deleted:  # deleted while it was being written: the delete wins
                self.inner._delete(kind, name)
            return

    def _lookup(self, kind: Kind, name: str) -> _Pending | None:
        with self._cond:
            entry = self._pending.get((kind, name))
            return None if entry is None or entry.deleted else entry

    # --- the contract, pending assets included -----------------------------------------------------

    def _put(self, kind: Kind, name: str, data: bytes) -> Asset:
        return self.inner._put(kind, name, data)

    def _stat(self, kind: Kind, name: str) -> Asset | None:
        entry = self._lookup(kind, name)
        return entry.asset if entry is not None else self.inner._stat(kind, name)

    def _open_range(self, kind: Kind, name: str, start: int, end: int | None) -> AssetRange:
        entry = self._lookup(kind, name)
        if entry is None:
            return self.inner._open_range(kind, name, start, end)
        start, end = clamp_range(entry.asset.size, start, end)
        view = memoryview(entry.data)[start:end]
        return AssetRange(entry.asset, start, end, [bytes(view)] if len(view) else [], lambda: None)

    def _delete(self, kind: Kind, name: str) -> None:
        with self._cond:
            entry = self._pending.pop((kind, name), None)
            if entry is not None:
                entry.deleted = True
        self.inner._delete(kind, name)

    def _expire(self, kind: Kind, older_than: datetime) -> int:
        return self.inner._expire(kind, older_than)  # pending assets are newer than any cutoff
