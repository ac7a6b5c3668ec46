"""The worker handle of an API node that runs no worker of its own (``local_worker`` off).

Queued jobs go to Redis, where ``kiln worker`` processes claim them. :class:`NoWorker` answers every
sync request 503 ``capacity_exhausted`` at once; :class:`~kiln.worker.remote.RemoteWorkers`, which API
nodes use, builds on it and hands sync requests to idle ``kiln worker`` processes.
"""

from __future__ import annotations

from collections.abc import Callable

from kiln.queue import Job
from kiln.worker.runner import capacity_exhausted


class NoWorker:
    """Stands where :class:`~kiln.worker.Worker` stands in :class:`~kiln.api.services.Services`."""

    alive = True  # /readyz: this node is ready to queue jobs; the workers report their own readiness
    ready = True
    current_job: str | None = None
    seconds_per_job: float | None = None  # no measured runs here: queued jobs get no ETA

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        self.on_terminal: Callable[[Job], None] | None = None  # never called: no job finishes here

    def submit_sync(self, request, **kwargs):
        raise capacity_exhausted(self.retry_after)

    def run_sync(self, request, **kwargs):
        raise capacity_exhausted(self.retry_after)

    def withdraw(self, ticket) -> bool:
        return True

    def still_starting(self, began: float) -> bool:
        return False  # workers start on other machines (RemoteWorkers too): a sync request waits its own wait_s

    def wake(self) -> None:
        pass  # workers on other machines poll Redis

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 0.0) -> None:
        pass
