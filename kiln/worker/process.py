"""A worker as a process of its own (``kiln worker``): claims queued jobs from Redis until told to stop.

It takes queued jobs and, when idle, sync requests offered by API nodes (:mod:`kiln.worker.remote`),
sync first as in one process. On SIGTERM or SIGINT the job in hand is finished
if it ends within the grace period, else stopped between two steps and handed back to the queue
(:meth:`~kiln.worker.Worker.stop`); then the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from kiln.errors import KilnError
from kiln.worker.health import HealthServer, WorkerMetrics
from kiln.worker.runner import Worker

log = logging.getLogger(__name__)


class WorkerProcess:
    """Runs ``worker`` (its broker and store already built) with a health endpoint on ``host:port``
    (port None: none; 0: a free one) until :meth:`shutdown` or a signal."""

    def __init__(self, worker: Worker, *, host: str = "127.0.0.1", port: int | None = 8081,
                 grace_s: float = 30.0) -> None:
        self.worker, self.broker, self.grace_s = worker, worker.broker, grace_s
        self.metrics = WorkerMetrics(worker)
        worker.on_terminal = self.metrics.observe_job
        self.broker.on_lost = self.metrics.observe_job  # jobs this process's claims ended as worker_lost
        self.health = None if port is None else HealthServer(host, port, ready=self.readiness, metrics=self.metrics)
        self._stop = threading.Event()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: the default model is loaded (and warmed up) and the broker answers."""
        loaded = bool(self.worker.alive and self.worker.ready)
        if loaded:
            self._announce()  # ready means API nodes may hand it sync requests too
        try:
            self.broker.check()
            reachable = True
        except (RuntimeError, KilnError):
            reachable = False
        return loaded and reachable, {"model_loaded": loaded, "broker": reachable, "job": self.worker.current_job}

    def _announce(self) -> None:
        """Tell API nodes this worker is up (they answer sync requests 503 at once when none is)."""
        if self.worker.remote is not None and self.worker.alive:
            try:
                self.worker.remote.announce(self.worker.worker_id)
            except KilnError:  # Redis out of reach: the worker's loop reports it; try again next time
                pass

    def shutdown(self, *_: Any) -> None:
        self._stop.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.shutdown)
        if self.health is not None:
            self.health.start()
            log.info("kiln worker %s: health on port %d", self.worker.worker_id, self.health.port)
        self.worker.start()
        try:
            while not self._stop.wait(0.5):  # woken by the signal handler, which runs on this thread
                self._announce()
        finally:
            if self.worker.remote is not None:
                try:
                    self.worker.remote.leave(self.worker.worker_id)  # API nodes stop offering it sync requests
                except KilnError:
                    pass
            log.info("kiln worker %s stopping (job in hand: %s)", self.worker.worker_id, self.worker.current_job)
            self.worker.stop(timeout=self.grace_s)
            self.worker.store.close()  # outputs being written land before exit
            if self.health is not None:
                self.health.stop()
        return 0
