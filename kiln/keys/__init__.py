"""API keys and their limits: in the SQLite file and process memory, or in Redis for several API nodes."""

from __future__ import annotations

from pathlib import Path

from kiln.keys.base import KeyBackend, Limiter, Slots
from kiln.keys.ratelimit import RateLimiter, RateState
from kiln.keys.slots import TaskSlots
from kiln.keys.store import KEY_PREFIX, KeyRecord, KeyStore, NewKey, looks_like_a_key

__all__ = ["KEY_PREFIX", "KeyBackend", "KeyRecord", "KeyStore", "Limiter", "NewKey", "RateLimiter", "RateState",
           "Slots", "TaskSlots", "looks_like_a_key", "open_key_store", "open_limiter", "open_slots"]


def open_key_store(database: str | Path, redis_url: str | None = None) -> KeyBackend:
    """The keys a server keeps: in Redis when ``redis_url`` is set (every API node sees them), else in
    the SQLite file ``database``. The server, ``kiln serve``'s first key and ``kiln keys`` all open them here."""
    if redis_url:
        from kiln.keys.redis_store import RedisKeyStore

        return RedisKeyStore(redis_url)
    return KeyStore(database)


def open_limiter(name: str, redis_url: str | None = None) -> Limiter:
    """A rate limiter with buckets of its own (``name``): shared in Redis when ``redis_url`` is set,
    else in this process."""
    if redis_url:
        from kiln.keys.redis_ratelimit import RedisRateLimiter

        return RedisRateLimiter(redis_url, prefix=f"kiln:rate:{name}:")
    return RateLimiter()


def open_slots(name: str, redis_url: str | None = None) -> Slots:
    """Per-key task slots of their own (``name``): shared in Redis when ``redis_url`` is set, else in
    this process."""
    if redis_url:
        from kiln.keys.redis_slots import RedisTaskSlots

        return RedisTaskSlots(redis_url, prefix=f"kiln:slots:{name}:")
    return TaskSlots()
