"""Webhooks for jobs that finish on other machines (Redis): exactly one API node queues each.

With ``kiln worker`` processes, a job can finish where no API node runs: nothing calls an API node's
``on_terminal`` for it. Every API node therefore watches Redis' record of finished jobs
(``finished_ids_since``) and, for each job with a webhook, asks the broker for the right to send it
(``claim_notice``, a ``SET NX`` per job): the first node to ask queues the webhook in its outbox, the
others leave it. A node's own worker's jobs go through the same claim, so a job is never sent by two
nodes. The claim names the node (host and data directory), so a node that restarts before its outbox
has the webhook queues it again (the outbox ignores one it already has).

The sending node's outbox copies each delivery's state to Redis after every change, so
``GET /jobs/{id}`` shows it on every node. Left as it is: a node that claims a job and dies for good
before queueing it loses that webhook (a window of one SQLite insert).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from kiln.api.services import Services
from kiln.api.webhooks import notify_terminal
from kiln.errors import KilnError
from kiln.queue import Job
from kiln.webhooks import GIVE_UP_AFTER

log = logging.getLogger(__name__)


def node_name(settings: Any) -> str:
    """Who claims notifications: the same after a restart of the same node (host and data directory)."""
    return f"{socket.gethostname()}:{settings.data_dir.resolve()}"


class FinishedWatch:
    """Polls ``broker.finished_ids_since`` every ``interval_s`` and queues each new terminal job's
    webhook once across nodes. ``overlap_s`` re-reads that much before the newest finish time seen, so
    a job stamped by a worker whose clock is a little behind is not missed."""

    def __init__(self, svc: Services, owner: str, *, interval_s: float = 0.5, overlap_s: float = 30.0,
                 lookback_s: float = GIVE_UP_AFTER, clock: Callable[[], float] = time.time) -> None:
        self.svc, self.broker, self.owner = svc, svc.broker, owner
        self.interval_s, self.overlap_s = interval_s, overlap_s
        self.cursor = clock() - lookback_s  # the first sweep resends what a restart may have missed
        self._seen: dict[str, float] = {}  # job id -> finish time, for the overlap window
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def notify(self, job: Job) -> bool:
        """Queue ``job``'s webhook if it has one and this node holds its claim; whether it did."""
        if not job.payload.get("webhook"):
            return False
        if not self.broker.claim_notice(job.id, self.owner, 2 * GIVE_UP_AFTER):
            return False
        notify_terminal(self.svc, job)
        self._seen[job.id] = job.finished or self.cursor  # the sweep need not queue it again
        return True

    def sweep(self) -> int:
        """One pass; how many webhooks this node queued."""
        sent = 0
        finished = self.broker.finished_ids_since(self.cursor - self.overlap_s)
        for job_id, when in finished:
            if job_id in self._seen:
                continue
            job = self.broker.get(job_id)
            if job is not None and self.notify(job):
                sent += 1
            self._seen[job_id] = when
        if finished:
            self.cursor = max(self.cursor, finished[-1][1])
        horizon = self.cursor - self.overlap_s
        self._seen = {i: t for i, t in self._seen.items() if t >= horizon}
        return sent

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kiln-finished-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while True:
            try:
                self.sweep()
            except KilnError as exc:  # Redis away: the cursor stays, the next pass catches up
                log.warning("finished-jobs watch: %s", exc.message)
            except Exception:
                log.exception("finished-jobs watch failed; retrying")
            if self._stop.wait(self.interval_s):
                return
