"""API keys in Redis, so every API node knows every key, its credits and whether it is revoked.

Same records and semantics as :class:`~kiln.keys.store.KeyStore`, kept under a prefix (``P``):

- ``P id:<id>``: a hash per key (id, name, hash, hint, created, rate_per_min, webhook_secret; ``expires``,
  ``revoked`` and ``credits`` only when set: a missing field is None, and no ``credits`` is unlimited).
- ``P hash:<sha256>``: the id of the key with that digest (only the digest of a secret is stored).
- ``P all``: a sorted set of ids by creation time (listing, counting).

Every write that reads first (create, revoke, spend, refund) is one Lua script, so credits spent from
many nodes at once never go below zero and never double-spend.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import Any


from kiln.keys.store import KeyRecord, NewKey, key_digest, new_key
from kiln.redis_client import connect, reachable, where_of


CREATE = """
local P, id, digest = ARGV[1], ARGV[2], ARGV[3]
local k = P .. 'id:' .. id
if redis.call('EXISTS', k) == 1 or redis.call('EXISTS', P .. 'hash:' .. digest) == 1 then return 0 end
redis.call('HSET', k, unpack(ARGV, 5))
redis.call('SET', P .. 'hash:' .. digest, id)
redis.call('ZADD', P .. 'all', ARGV[4], id)
return 1
"""

LOOKUP = """
local id = redis.call('GET', ARGV[1] .. 'hash:' .. ARGV[2])
if not id then return {} end
return redis.call('HGETALL', ARGV[1] .. 'id:' .. id)
"""

REVOKE = """
local k = ARGV[1] .. 'id:' .. ARGV[2]
if redis.call('EXISTS', k) == 0 or redis.call('HEXISTS', k, 'revoked') == 1 then return 0 end
redis.call('HSET', k, 'revoked', ARGV[3])
return 1
"""

# unknown key: 0; unlimited: 1; a balance of at least ARGV[3]: taken, 1; else 0
SPEND = """
local k = ARGV[1] .. 'id:' .. ARGV[2]
if redis.call('EXISTS', k) == 0 then return 0 end
local credits = redis.call('HGET', k, 'credits')
if not credits then return 1 end
if tonumber(credits) < tonumber(ARGV[3]) then return 0 end
redis.call('HINCRBY', k, 'credits', -tonumber(ARGV[3]))
return 1
"""

REFUND = """
local k = ARGV[1] .. 'id:' .. ARGV[2]
if redis.call('HEXISTS', k, 'credits') == 1 then redis.call('HINCRBY', k, 'credits', ARGV[3]) end
return 1
"""


class RedisKeyStore:
    """:class:`~kiln.keys.base.KeyBackend` on the Redis server at ``url``, keys under ``prefix``."""

    def __init__(self, url: str, *, prefix: str = "kiln:keys:", clock: Callable[[], float] = time.time) -> None:
        self.prefix, self.clock = prefix, clock
        self._r = connect(url)
        self.where = where_of(self._r)
        self._create = self._r.register_script(CREATE)
        self._lookup = self._r.register_script(LOOKUP)
        self._revoke = self._r.register_script(REVOKE)
        self._spend = self._r.register_script(SPEND)
        self._refund = self._r.register_script(REFUND)

    def close(self) -> None:
        self._r.close()

    @reachable("the key store")
    def create(
        self, name: str = "", *, rate_per_min: int = 100, credits: int | None = None, expires: float | None = None
    ) -> NewKey:
        while True:  # an id or digest already taken (never seen: 64 and 256 random bits) draws again
            new = new_key(name, rate_per_min=rate_per_min, credits=credits, expires=expires, created=self.clock())
            r = new.record
            fields: dict[str, Any] = {"id": r.id, "name": r.name, "hash": key_digest(new.secret), "hint": r.hint,
                                      "created": repr(float(r.created)), "rate_per_min": r.rate_per_min,
                                      "webhook_secret": r.webhook_secret}
            if expires is not None:
                fields["expires"] = repr(float(expires))
            if credits is not None:
                fields["credits"] = credits
            pairs = [str(v) for item in fields.items() for v in item]
            if self._create(args=[self.prefix, r.id, fields["hash"], fields["created"], *pairs]):
                return new

    @reachable("the key store")
    def lookup(self, presented: str) -> KeyRecord | None:
        """The record for a presented key (active or not), or None. Constant-time in the key's value."""
        digest = key_digest(presented)
        flat = self._lookup(args=[self.prefix, digest])
        if not flat:
            return None
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        if not hmac.compare_digest(fields.get("hash", ""), digest):
            return None
        return _record(fields)

    @reachable("the key store")
    def get(self, key_id: str) -> KeyRecord | None:
        fields = self._r.hgetall(f"{self.prefix}id:{key_id}")
        return _record(fields) if fields else None

    @reachable("the key store")
    def list(self) -> list[KeyRecord]:
        ids = self._r.zrange(f"{self.prefix}all", 0, -1)
        pipe = self._r.pipeline(transaction=False)
        for key_id in ids:
            pipe.hgetall(f"{self.prefix}id:{key_id}")
        return [_record(fields) for fields in pipe.execute() if fields]

    @reachable("the key store")
    def revoke(self, key_id: str) -> bool:
        return bool(self._revoke(args=[self.prefix, key_id, repr(float(self.clock()))]))

    @reachable("the key store")
    def spend(self, key_id: str, amount: int = 1) -> bool:
        """Take ``amount`` credits; False when the balance is short (unlimited keys always succeed)."""
        return bool(self._spend(args=[self.prefix, key_id, int(amount)]))

    @reachable("the key store")
    def refund(self, key_id: str, amount: int = 1) -> None:
        """Give back credits taken for work that did not happen (no-op for unlimited keys)."""
        self._refund(args=[self.prefix, key_id, int(amount)])

    @reachable("the key store")
    def count(self) -> int:
        return self._r.zcard(f"{self.prefix}all")


def _record(f: dict[str, str]) -> KeyRecord:
    return KeyRecord(
        id=f["id"],
        name=f["name"],
        hint=f["hint"],
        created=float(f["created"]),
        expires=float(f["expires"]) if "expires" in f else None,
        revoked=float(f["revoked"]) if "revoked" in f else None,
        rate_per_min=int(f["rate_per_min"]),
        credits=int(f["credits"]) if "credits" in f else None,
        webhook_secret=f["webhook_secret"],
    )
