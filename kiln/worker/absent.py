"""The worker handle of an API node that runs no worker of its own (``local_worker`` off).

Queued jobs go to Redis, where ``kiln worker`` processes claim them. The sync tier has no worker here
to hand a request to, so every sync request is answered 503 ``capacity_exhausted`` at once instead of
waiting ``sync_wait_s`` for a start that cannot come (the cross-machine sync tier is not built yet).
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

    def wake(self) -> None:
        pass  # workers on other machines poll Redis

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 0.0) -> None:
        pass
