"""``/metrics`` in the Prometheus text format: HTTP traffic, queue depth, job times by model and stage."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from kiln.queue import Job

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _QueueDepth:
    def __init__(self, broker) -> None:
        self.broker = broker

    def collect(self):
        gauge = GaugeMetricFamily("kiln_queue_depth", "Jobs waiting in the queue", labels=["priority"])
        for priority, count in self.broker.depth().items():
            gauge.add_metric([priority.value], count)
        yield gauge


class Metrics:
    """One registry per app, so several apps (tests) never share counters."""

    def __init__(self, broker) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kiln_http_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "kiln_http_request_duration_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "kiln_job_seconds", "Time jobs spend per stage (queued, running, sync)", ["model", "stage"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_QueueDepth(broker))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_job(self, job: Job) -> None:
        request = job.payload.get("request", {})
        model = f"{request.get('family', '?')}/{request.get('model', '?')}"
        if job.started is not None:
            self.job_seconds.labels(model, "queued").observe(job.started - job.created)
            if job.finished is not None:
                self.job_seconds.labels(model, "running").observe(job.finished - job.started)

    def observe_sync(self, model: str, seconds: float) -> None:
        self.job_seconds.labels(model, "sync").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def now() -> float:
    return time.perf_counter()
