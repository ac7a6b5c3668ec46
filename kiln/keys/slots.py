"""Per-key concurrency: at most ``limit`` unfinished tasks per key, in this process.

A slot is taken before the job is queued (a ticket) and then filled with the job's id, or given back
if queuing failed, so two requests can never both take a key's last slot. Filled slots free
themselves: each take drops the ids ``still_open`` says have finished.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable


class TaskSlots:
    def __init__(self) -> None:
        self._held: dict[str, set[str]] = {}  # key id -> job ids and tickets
        self._lock = threading.Lock()

    def take(self, key_id: str, limit: int, still_open: Callable[[str], bool]) -> str | None:
        """A ticket for one more task of ``key_id``, or None when ``limit`` are unfinished."""
        with self._lock:
            jobs = [i for i in self._held.get(key_id, ()) if not i.startswith("r:")]
        finished = {i for i in jobs if not still_open(i)}  # outside the lock: it asks the broker
        with self._lock:
            held = self._held.setdefault(key_id, set())
            held -= finished
            if len(held) >= limit:
                return None
            ticket = "r:" + secrets.token_hex(8)
            held.add(ticket)
            return ticket

    def fill(self, key_id: str, ticket: str, job_id: str) -> None:
        """The ticket's slot now holds ``job_id`` until it finishes."""
        with self._lock:
            held = self._held.setdefault(key_id, set())
            held.discard(ticket)
            held.add(job_id)

    def give_back(self, key_id: str, ticket: str) -> None:
        """The task was not queued after all."""
        with self._lock:
            self._held.get(key_id, set()).discard(ticket)
