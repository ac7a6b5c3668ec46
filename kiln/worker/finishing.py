"""Finishing jobs off the GPU owner's thread: encoding, storing and recording a generated job run on a
small thread pool while the worker's thread starts the next one.

The engine's work (the pipeline, then the safety classifier, which also runs on the device) stays on
the worker's thread; what follows needs only the CPU, the disk or the network: encoding WebP/PNG/MP4,
writing to the asset store, the broker's terminal write, webhooks. Each pending job keeps its lease
(its heartbeat runs until its result is recorded). At most ``pending`` jobs wait to be finished, so a
slow store holds the worker back instead of filling memory with decoded pictures.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class Finishing:
    def __init__(self, threads: int = 2, pending: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kiln-finish")
        self._room = threading.BoundedSemaphore(pending)

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on the pool; blocks while ``pending`` jobs are already waiting."""
        self._room.acquire()

        def run() -> None:
            try:
                fn(*args)
            except Exception:  # a finishing step has no caller to raise to
                log.exception("finishing a job failed")
            finally:
                self._room.release()

        self._pool.submit(run)

    def close(self) -> None:
        """Finish everything submitted, then stop the threads."""
        self._pool.shutdown(wait=True)
