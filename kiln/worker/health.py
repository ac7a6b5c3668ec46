"""``kiln worker``'s own small HTTP endpoint: ``/healthz``, ``/readyz`` and ``/metrics``.

A worker process serves no API, so a standard-library server on a thread is enough: three GET
routes, no auth (bind it to an address only the monitoring can reach), answering while the engine
is busy on the worker's thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from kiln.queue import Job

JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

log = logging.getLogger(__name__)


class _WorkerState:
    """Read at scrape time: what the worker is doing now."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def collect(self):
        ready = GaugeMetricFamily("kiln_worker_ready", "1 once the default model is loaded and warmed up")
        ready.add_metric([], 1 if self.worker.alive and self.worker.ready else 0)
        busy = GaugeMetricFamily("kiln_worker_busy", "1 while a job runs")
        current = GaugeMetricFamily("kiln_worker_current_job", "The job running now (1), if any", labels=["job_id"])
        job_id = self.worker.current_job
        busy.add_metric([], 1 if job_id else 0)
        if job_id:
            current.add_metric([job_id], 1)
        average = GaugeMetricFamily("kiln_worker_seconds_per_job", "Moving average of run time per job")
        if self.worker.seconds_per_job is not None:
            average.add_metric([], self.worker.seconds_per_job)
        yield from (ready, busy, current, average)


class WorkerMetrics:
    """Jobs this process ended, by status, and their run times by model."""

    def __init__(self, worker: Any) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("kiln_worker_jobs", "Jobs this worker ended, by final status", ["status"],
                            registry=self.registry)
        self.job_seconds = Histogram("kiln_worker_job_seconds", "Seconds from claim to end, per job", ["model"],
                                     buckets=JOB_BUCKETS, registry=self.registry)
        self.registry.register(_WorkerState(worker))

    def observe_job(self, job: Job) -> None:
        self.jobs.labels(job.status.value).inc()
        if job.started is not None and job.finished is not None:
            request = job.payload.get("request", {})
            model = f"{request.get('family', '?')}/{request.get('model', '?')}"
            self.job_seconds.labels(model).observe(max(0.0, job.finished - job.started))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """Serves the three routes on ``host:port`` (port 0: a free one, see :attr:`port`) on a thread.
    ``ready()`` returns ``(ready, details)`` for ``/readyz``."""

    def __init__(self, host: str, port: int, *, ready: Callable[[], tuple[bool, dict]], metrics: WorkerMetrics) -> None:
        handler = _handler(ready, metrics)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kiln-worker-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(ready: Callable[[], tuple[bool, dict]], metrics: WorkerMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, "application/json", b'{"status":"ok"}')
            elif path == "/readyz":
                ok, details = ready()
                body = {"status": "ready" if ok else "not_ready", **details}
                self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, metrics.render())
            else:
                self._send(404, "application/json", b'{"error":"not_found"}')

        def _send(self, status: int, media_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", media_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("health: " + format, *args)

    return Handler
