"""Housekeeping that runs beside the server: uploads are deleted once their lifetime is over."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from kiln.storage import AssetStore

log = logging.getLogger(__name__)


class Janitor:
    """Every ``interval_s``, deletes uploads older than ``upload_ttl_s`` (the reference keeps them 24 h).

    Uploads that a queued or running job still needs as its input (``in_use``) are kept: their
    age is reset instead, so a job that waits longer than a day still finds its image.
    """

    def __init__(
        self,
        store: AssetStore,
        *,
        upload_ttl_s: float,
        in_use: Callable[[], Iterable[str]] = tuple,
        interval_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.upload_ttl_s, self.interval_s, self.clock = store, upload_ttl_s, interval_s, clock
        self.in_use = in_use
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        for name in set(self.in_use()):
            if self.store.stat("u", name) is not None:
                self.store.put(self.store.read("u", name), "u", _media_type(name))  # a repeat put renews it
        cutoff = datetime.fromtimestamp(self.clock() - self.upload_ttl_s, UTC)
        removed = self.store.expire("u", cutoff)
        if removed:
            log.info("deleted %d expired uploads", removed)
        return removed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kiln-janitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # keep cleaning next time; a full disk must not kill the thread
                log.exception("upload expiry failed")
            self._stop.wait(self.interval_s)


def _media_type(name: str) -> str:
    from kiln.storage import validate_name

    return validate_name("u", name)
