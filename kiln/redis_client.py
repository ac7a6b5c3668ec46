"""What every Redis-backed part of Kiln (the job queue, keys, rate limits, task slots) shares.

They use one Redis server, so one outage reads the same everywhere: :func:`reachable` turns a
refused or timed-out connection into :class:`~kiln.errors.RedisUnavailable` (a
:class:`~kiln.errors.QueueUnavailable`: 503 at the API, Vyro's 1201; a worker's loop retries), and
:func:`where_of` names the server in messages without its password.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import redis

from kiln.errors import RedisUnavailable

P = ParamSpec("P")
R = TypeVar("R")


CONNECT_TIMEOUT_S = 5.0


def connect(url: str) -> redis.Redis:
    """A client for ``url`` that gives up connecting after ``CONNECT_TIMEOUT_S`` (an unreachable host
    then reads as an outage, 503, instead of hanging a request or a health check). Reads have no
    timeout: the queue's blocking reads wait on purpose."""
    return redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S)


def where_of(client: redis.Redis) -> str:
    """host:port/db (or the socket path) of a client, never its password."""
    kw = client.connection_pool.connection_kwargs
    return kw.get("path") or f"{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"


def reachable(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A method decorator: Redis out of reach becomes :class:`RedisUnavailable` naming ``what`` and
    the server (``self.where``); the client reconnects by itself on the next call once Redis is back."""

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                where = args[0].where  # type: ignore[attr-defined]
                raise RedisUnavailable(f"{what} (Redis at {where}) cannot be reached: {exc}; retry later") from exc

        return wrapper

    return decorate
