"""Per-key concurrency in Redis: :class:`~kiln.keys.slots.TaskSlots` shared by every API node.

Per key, ``P <key>:jobs`` is a set of its unfinished job ids and ``P <key>:held`` a sorted set of the
tickets taken and not yet filled, by the Redis server's time. Taking a slot counts both and adds a
ticket in one script, so two nodes never both take the last slot; a ticket left by a node that died
between taking and filling it lapses after ``ticket_s``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable


from kiln.redis_client import connect, reachable, where_of

# KEYS: jobs, held. ARGV: limit, ticket, ticket lifetime (s). Answers 1 when the ticket was added.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
if redis.call('SCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], now, ARGV[2])
return 1
"""


class RedisTaskSlots:
    """:class:`~kiln.keys.base.Slots` on the Redis server at ``url``, under ``prefix``."""

    def __init__(self, url: str, *, prefix: str = "kiln:slots:", ticket_s: float = 60.0) -> None:
        self.prefix, self.ticket_s = prefix, ticket_s
        self._r = connect(url)
        self.where = where_of(self._r)
        self._take = self._r.register_script(TAKE)

    def close(self) -> None:
        self._r.close()

    @reachable("the task slots")
    def take(self, key_id: str, limit: int, still_open: Callable[[str], bool]) -> str | None:
        """A ticket for one more task of ``key_id``, or None when ``limit`` are unfinished."""
        jobs = f"{self.prefix}{key_id}:jobs"
        finished = [i for i in self._r.smembers(jobs) if not still_open(i)]
        if finished:
            self._r.srem(jobs, *finished)
        ticket = secrets.token_hex(8)
        taken = self._take(keys=[jobs, f"{self.prefix}{key_id}:held"], args=[limit, ticket, self.ticket_s])
        return ticket if taken else None

    @reachable("the task slots")
    def fill(self, key_id: str, ticket: str, job_id: str) -> None:
        """The ticket's slot now holds ``job_id`` until it finishes."""
        pipe = self._r.pipeline(transaction=True)
        pipe.sadd(f"{self.prefix}{key_id}:jobs", job_id)
        pipe.zrem(f"{self.prefix}{key_id}:held", ticket)
        pipe.execute()

    @reachable("the task slots")
    def give_back(self, key_id: str, ticket: str) -> None:
        """The task was not queued after all."""
        self._r.zrem(f"{self.prefix}{key_id}:held", ticket)
