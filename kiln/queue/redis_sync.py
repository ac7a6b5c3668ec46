"""The sync tier across machines, in Redis: an API node offers a sync request, an idle worker takes it.

Keys (``P`` is the prefix, as in :mod:`kiln.queue.redis_scripts`):

- ``P sync:queue``: a list of offered request ids, oldest first; idle workers pop it.
- ``P sync:for:<worker>``: requests offered to one idle worker that holds their model (routing, as
  for jobs: :mod:`kiln.queue.redis_scripts`); if it has not taken one within ``route_grace_s`` (it
  died, or is busy after all), the API node moves it to ``P sync:queue`` for any worker.
- ``P sync:<id>``: a hash (``state`` waiting | taken, ``payload``, ``target`` while offered to one
  worker), expiring when its API node stops waiting, so a request left behind by a node that died is
  never run.
- ``P sync:<id>:reply``: a list of messages to the API node that offered it (JSON objects, ``type``
  one of ``started``, ``step`` {step, total, preview?: base64 WebP}, ``beat``, ``done`` {...},
  ``error`` {code, message, details}, ``withdrawn``). One reader, so a list rather than pub/sub: no
  message is lost to a subscription that starts late.
- ``P sync:<id>:cancel``: set when the client cancels (WebSocket); the worker checks at each step.
- ``P sync:workers``: a sorted set of worker ids scored by when their presence expires; with none
  present an API node answers 503 at once instead of waiting for a start that cannot come.

Taking and withdrawing are one script each, so a request is either run by exactly one worker or
withdrawn (and answered 503) — never both.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from kiln.queue.redis_scripts import COMMON
from kiln.redis_client import connect, reachable, where_of

TAKE = """
local k = ARGV[1] .. 'sync:' .. ARGV[2]
if redis.call('HGET', k, 'state') ~= 'waiting' then return false end
redis.call('HSET', k, 'state', 'taken', 'worker', ARGV[3])
redis.call('ZREM', ARGV[1] .. 'idle', ARGV[3])  -- busy now: jobs and offers are not routed to it
redis.call('RPUSH', k .. ':reply', '{"type":"started"}')
redis.call('PEXPIRE', k .. ':reply', ARGV[4])
return redis.call('HGET', k, 'payload')
"""

WITHDRAW = """
local k = ARGV[1] .. 'sync:' .. ARGV[2]
if redis.call('HGET', k, 'state') == 'taken' then return 0 end
local target = redis.call('HGET', k, 'target')
if target then redis.call('LREM', ARGV[1] .. 'sync:for:' .. target, 0, ARGV[2]) end
redis.call('DEL', k)
redis.call('LREM', ARGV[1] .. 'sync:queue', 0, ARGV[2])
redis.call('RPUSH', k .. ':reply', '{"type":"withdrawn"}')
redis.call('PEXPIRE', k .. ':reply', ARGV[3])
return 1
"""


# ARGV: P, id, payload, ttl (ms), needs (space-separated). Offers the request to the idle worker that
# fits it best (holds its model, better its LoRAs too), else to any. Returns that worker's id or ''.
OFFER = COMMON + """
local id, ttl, needs = ARGV[2], ARGV[4], words(ARGV[5])
local k = P .. 'sync:' .. id
redis.call('HSET', k, 'state', 'waiting', 'payload', ARGV[3])
redis.call('PEXPIRE', k, ttl)
local best, best_fit = nil, 0
if #needs > 0 then
  for _, o in ipairs(idle_holdings('')) do
    local f = fit(o[2], needs)
    if f > best_fit then best, best_fit = o[1], f end
  end
end
if not best then
  redis.call('RPUSH', P .. 'sync:queue', id)
  return ''
end
redis.call('HSET', k, 'target', best)
redis.call('ZREM', P .. 'idle', best)  -- busy with this from now on: no second offer, no job routed to it
redis.call('RPUSH', P .. 'sync:for:' .. best, id)
redis.call('PEXPIRE', P .. 'sync:for:' .. best, ttl)
return best
"""

# ARGV: P, id. A request its target worker did not take in time goes to the front of the shared queue.
UNPIN = """
local k = ARGV[1] .. 'sync:' .. ARGV[2]
if redis.call('HGET', k, 'state') ~= 'waiting' then return 0 end
local target = redis.call('HGET', k, 'target')
if not target then return 0 end
if redis.call('LREM', ARGV[1] .. 'sync:for:' .. target, 0, ARGV[2]) == 0 then return 0 end
redis.call('HDEL', k, 'target')
redis.call('LPUSH', ARGV[1] .. 'sync:queue', ARGV[2])
return 1
"""


class RedisSyncChannel:
    """Both ends of the cross-machine sync tier on the Redis server at ``url``.

    ``lease_s``: how long a worker that took a request may stay silent (no step, no beat) before the
    API node presumes it dead; replies and presence expire on the same clock."""

    def __init__(self, url: str, *, lease_s: float = 30.0, prefix: str = "kiln:") -> None:
        self.prefix, self.lease_s = prefix, lease_s
        self._r = connect(url)
        self.where = where_of(self._r)
        self._take = self._r.register_script(TAKE)
        self._withdraw = self._r.register_script(WITHDRAW)
        self._offer = self._r.register_script(OFFER)
        self._unpin = self._r.register_script(UNPIN)

    def close(self) -> None:
        self._r.close()

    def _k(self, sync_id: str, suffix: str = "") -> str:
        return f"{self.prefix}sync:{sync_id}{suffix}"

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_s * 1000)

    # --- API node ----------------------------------------------------------------------------------

    @reachable("the sync tier")
    def workers_present(self) -> int:
        """How many workers announced themselves within their lease."""
        return int(self._r.zcount(f"{self.prefix}sync:workers", f"({time.time()}", "+inf"))

    @reachable("the sync tier")
    def offer(self, payload: dict[str, Any], *, ttl_s: float) -> tuple[str, str | None]:
        """Offer a sync request to the idle worker that holds what it needs (``payload["needs"]``),
        else to the next idle worker: ``(its id, the worker it was offered to or None)``. Unless taken
        or withdrawn, it is forgotten after ``ttl_s``."""
        sync_id = "s_" + secrets.token_hex(12)
        target = self._offer(args=[self.prefix, sync_id, json.dumps(payload, separators=(",", ":")),
                                   int(ttl_s * 1000), " ".join(payload.get("needs", ()))])
        return sync_id, target or None

    @reachable("the sync tier")
    def unpin(self, sync_id: str) -> bool:
        """Let any worker take a request offered to one that has not taken it; whether it moved."""
        return bool(self._unpin(args=[self.prefix, sync_id]))

    @reachable("the sync tier")
    def withdraw(self, sync_id: str) -> bool:
        """Take back a request no worker has taken (it will never run); False if one already has."""
        return bool(self._withdraw(args=[self.prefix, sync_id, self._lease_ms]))

    @reachable("the sync tier")
    def cancel(self, sync_id: str) -> None:
        self._r.set(self._k(sync_id, ":cancel"), 1, px=self._lease_ms * 2)

    @reachable("the sync tier")
    def next_message(self, sync_id: str, timeout_s: float) -> dict[str, Any] | None:
        """The next reply for ``sync_id``, waiting at most ``timeout_s``; None if none came."""
        got = self._r.blpop([self._k(sync_id, ":reply")], timeout=max(0.01, timeout_s))
        return None if got is None else json.loads(got[1])

    def forget(self, sync_id: str) -> None:
        self._r.delete(self._k(sync_id, ":reply"), self._k(sync_id, ":cancel"))

    # --- worker --------------------------------------------------------------------------------------

    @reachable("the sync tier")
    def announce(self, worker_id: str) -> None:
        """This worker is up and may take sync requests for the next ``lease_s`` (call every ``lease_s / 3``)."""
        now = time.time()
        key = f"{self.prefix}sync:workers"
        pipe = self._r.pipeline(transaction=False)
        pipe.zadd(key, {worker_id: now + self.lease_s})
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.execute()

    @reachable("the sync tier")
    def leave(self, worker_id: str) -> None:
        self._r.zrem(f"{self.prefix}sync:workers", worker_id)

    @reachable("the sync tier")
    def take(self, worker_id: str, block_s: float = 0.0, *, bell: str | None = None) -> tuple[str, dict[str, Any]] | None:
        """The oldest request offered to this worker, else the oldest offered to any, now this worker's:
        ``(id, payload)``; None if there is none (after waiting up to ``block_s``, or as soon as the
        list ``bell`` gets an item: the broker's wake-up for a queued job)."""
        mine, queue = f"{self.prefix}sync:for:{worker_id}", f"{self.prefix}sync:queue"
        while True:
            if block_s > 0:
                got = self._r.blpop([mine, queue, *([bell] if bell else [])], timeout=block_s)
                if got is None or got[0] == bell:
                    return None
                sync_id = got[1]
            else:
                sync_id = self._r.lpop(mine) or self._r.lpop(queue)
            if sync_id is None:
                return None
            payload = self._take(args=[self.prefix, sync_id, worker_id, self._lease_ms])
            if payload is not None:
                return sync_id, json.loads(payload)
            block_s = 0.0  # withdrawn or forgotten: look at the next one without waiting again

    @reachable("the sync tier")
    def reply(self, sync_id: str, message: dict[str, Any]) -> bool:
        """Send ``message`` to the API node waiting on ``sync_id``; returns whether the client cancelled."""
        key = self._k(sync_id, ":reply")
        pipe = self._r.pipeline(transaction=False)
        pipe.rpush(key, json.dumps(message, separators=(",", ":")))
        pipe.pexpire(key, self._lease_ms * 2)
        pipe.exists(self._k(sync_id, ":cancel"))
        return bool(pipe.execute()[-1])
