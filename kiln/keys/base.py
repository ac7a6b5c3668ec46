"""What the API needs of a key store and of a rate limiter: the embedded ones (SQLite file, process
memory) and the Redis ones (shared by every API node) both fit."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kiln.keys.ratelimit import RateState
    from kiln.keys.store import KeyRecord, NewKey


class KeyBackend(Protocol):
    """API keys with their rate, credit balance, expiry and revocation; secrets stored only hashed."""

    clock: Callable[[], float]  # the time ``KeyRecord.active`` is asked about

    def create(
        self, name: str = "", *, rate_per_min: int = 100, credits: int | None = None, expires: float | None = None
    ) -> NewKey: ...

    def lookup(self, presented: str) -> KeyRecord | None: ...

    def get(self, key_id: str) -> KeyRecord | None: ...

    def list(self) -> list[KeyRecord]: ...

    def revoke(self, key_id: str) -> bool: ...

    def spend(self, key_id: str, amount: int = 1) -> bool: ...

    def refund(self, key_id: str, amount: int = 1) -> None: ...

    def count(self) -> int: ...

    def close(self) -> None: ...


class Limiter(Protocol):
    """At most ``limit`` allowed hits per bucket in any sliding minute."""

    def hit(self, key_id: str, limit: int) -> RateState: ...


class Slots(Protocol):
    """At most ``limit`` unfinished tasks per key: a slot is taken (a ticket), then filled with the
    job's id or given back; it frees itself once ``still_open`` says its job has finished."""

    def take(self, key_id: str, limit: int, still_open: Callable[[str], bool]) -> str | None: ...

    def fill(self, key_id: str, ticket: str, job_id: str) -> None: ...

    def give_back(self, key_id: str, ticket: str) -> None: ...
