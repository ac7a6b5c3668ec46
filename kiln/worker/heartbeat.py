"""Keeping a claimed job's lease while it runs, between progress steps too.

A broker whose leases expire (Redis: ``lease_s`` and ``heartbeat``) gives a job to another worker
when its worker goes quiet for ``lease_s``; one denoising step, a model load or a VAE decode can
outlast that, so progress reports alone are not enough. A broker without expiring leases (the
embedded one: a dead process's jobs are recovered at start) gets no thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Self

from kiln.errors import LeaseLost
from kiln.queue import Job

log = logging.getLogger(__name__)


class Heartbeat:
    """While in its ``with`` block, ``broker.heartbeat(job.id, job.lease)`` every ``lease_s / 3`` on
    a thread of its own. ``on_lost`` runs (on that thread) if the broker says the lease is gone;
    the worker's next write for the job then raises :class:`LeaseLost` too."""

    def __init__(self, broker: Any, job: Job, *, on_lost: Callable[[], None]) -> None:
        self.broker, self.job, self.on_lost = broker, job, on_lost
        lease_s = getattr(broker, "lease_s", None)
        self.interval = lease_s / 3 if lease_s and hasattr(broker, "heartbeat") and job.lease else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.interval is not None:
            self._thread = threading.Thread(target=self._run, name=f"kiln-heartbeat-{self.job.id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.broker.heartbeat(self.job.id, self.job.lease)
            except LeaseLost:
                log.warning("job %s: lease lost while running; stopping it", self.job.id)
                self.on_lost()
                return
            except Exception:  # a broker hiccup: the next beat may get through before the lease ends
                log.warning("heartbeat for job %s failed", self.job.id, exc_info=True)
