"""Per-key request rates in Redis: one sliding window per bucket, shared by every API node.

The same window as :class:`~kiln.keys.ratelimit.RateLimiter`: a hit is allowed while fewer than
``limit`` allowed hits fall in the last minute, and only allowed hits are recorded. Each bucket is a
sorted set of its allowed hits scored by time, trimmed, counted and added to in one Lua script, so
two nodes never both take the last slot; it expires a minute after its last hit.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable


from kiln.keys.ratelimit import RateState
from kiln.redis_client import connect, reachable, where_of

# ARGV: now in seconds ('' for the Redis server's clock), window (s), limit, a member name unique to this hit.
# Answers: allowed (0/1), hits in the window, the oldest hit's score ('' none), now.
HIT = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local window, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
local allowed = 0
if n < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
  n, allowed = n + 1, 1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {allowed, n, oldest[2] or '', string.format('%.6f', now)}
"""


class RedisRateLimiter:
    """:class:`~kiln.keys.base.Limiter` on the Redis server at ``url``; buckets under ``prefix``
    (one prefix per limiter, as each in-process limiter has its own buckets).

    ``clock`` (seconds) is for tests; by default the Redis server's clock times every hit, so API nodes
    whose clocks disagree still share one window.
    """

    WINDOW_S = 60.0

    def __init__(self, url: str, *, prefix: str = "kiln:rate:", clock: Callable[[], float] | None = None) -> None:
        self.prefix, self.clock = prefix, clock
        self._r = connect(url)
        self.where = where_of(self._r)
        self._hit = self._r.register_script(HIT)

    def close(self) -> None:
        self._r.close()

    @reachable("the rate limiter")
    def hit(self, key_id: str, limit: int) -> RateState:
        given = "" if self.clock is None else repr(float(self.clock()))
        allowed, hits, oldest, now = self._hit(
            keys=[self.prefix + key_id], args=[given, self.WINDOW_S, limit, secrets.token_hex(8)]
        )
        now = float(given or now)
        reset = math.ceil(float(oldest) + self.WINDOW_S - now) if oldest else 0
        return RateState(bool(allowed), limit, max(0, limit - hits), reset if allowed else max(1, reset))
