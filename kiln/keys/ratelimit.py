"""Per-key request rates: a sliding one-minute window, in process (:mod:`kiln.keys.redis_ratelimit` shares it
across API nodes)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RateState:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until a slot frees up (X-RateLimit-Reset, Retry-After)


class RateLimiter:
    WINDOW_S = 60.0

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key_id: str, limit: int) -> RateState:
        now = self.clock()
        with self._lock:
            hits = self._hits.setdefault(key_id, deque())
            while hits and hits[0] <= now - self.WINDOW_S:
                hits.popleft()
            allowed = len(hits) < limit
            if allowed:
                hits.append(now)
            reset = math.ceil(hits[0] + self.WINDOW_S - now) if hits else 0
            return RateState(allowed, limit, max(0, limit - len(hits)), max(1, reset) if not allowed else reset)
