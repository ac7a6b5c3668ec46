"""API keys: stored hashed, compared in constant time, with a rate and an optional credit balance.

A key is ``kiln_sk_`` followed by 43 random URL-safe characters (256 bits). Only its SHA-256 is
stored: keys are random, so a slow password hash would add nothing. Each key also gets a webhook
signing secret (``whsec_…``), shown once with the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.sqlite import SqliteStore

KEY_PREFIX = "kiln_sk_"

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL,
    rate_per_min INTEGER NOT NULL,
    credits INTEGER,
    webhook_secret TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    hint: str  # the first characters, to tell keys apart in listings
    created: float
    expires: float | None
    revoked: float | None
    rate_per_min: int
    credits: int | None  # None: unlimited
    webhook_secret: str

    def active(self, now: float) -> bool:
        return self.revoked is None and (self.expires is None or self.expires > now)

    @property
    def metered(self) -> bool:
        """Whether requests under this key spend credits (a balance is set); unlimited keys never
        touch the database to be charged."""
        return self.credits is not None


@dataclass(frozen=True)
class NewKey:
    record: KeyRecord
    secret: str  # shown once; never stored


def key_digest(key: str) -> str:
    """What is stored of a key: its SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key(name: str, *, rate_per_min: int, credits: int | None, expires: float | None, created: float) -> NewKey:
    """A fresh key and its record (every store makes keys here, so they all look alike)."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    record = KeyRecord(
        id="k_" + secrets.token_hex(8),
        name=name,
        hint=secret[: len(KEY_PREFIX) + 4],
        created=created,
        expires=expires,
        revoked=None,
        rate_per_min=rate_per_min,
        credits=credits,
        webhook_secret="whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
    )
    return NewKey(record, secret)


def looks_like_a_key(value: str) -> bool:
    return value.startswith(KEY_PREFIX) and 40 <= len(value) <= 128 and value.isascii()


class KeyStore(SqliteStore):
    """Keys in the server's SQLite file (shared with the job broker; WAL, safe across processes)."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(path, SCHEMA)
        self.clock = clock

    def create(
        self, name: str = "", *, rate_per_min: int = 100, credits: int | None = None, expires: float | None = None
    ) -> NewKey:
        new = new_key(name, rate_per_min=rate_per_min, credits=credits, expires=expires, created=self.clock())
        record = new.record
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (id, name, hash, hint, created, expires, revoked, rate_per_min, credits, webhook_secret)"
                " VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)",
                (record.id, name, key_digest(new.secret), record.hint, record.created, expires, rate_per_min, credits,
                 record.webhook_secret),
            )
        return new

    def lookup(self, presented: str) -> KeyRecord | None:
        """The record for a presented key (active or not), or None. Constant-time in the key's value."""
        digest = key_digest(presented)
        with self._lock:
            row = self._db.execute("SELECT * FROM api_keys WHERE hash = ?", (digest,)).fetchone()
        if row is None or not hmac.compare_digest(row["hash"], digest):
            return None
        return _record(row)

    def get(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else _record(row)

    def list(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM api_keys ORDER BY created").fetchall()
        return [_record(r) for r in rows]

    def revoke(self, key_id: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (self.clock(), key_id)
            )
        return cur.rowcount == 1

    def spend(self, key_id: str, amount: int = 1) -> bool:
        """Take ``amount`` credits; False when the balance is short (unlimited keys always succeed)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE api_keys SET credits = credits - ? WHERE id = ? AND (credits IS NULL OR credits >= ?)",
                (amount, key_id, amount),
            )
        return cur.rowcount == 1

    def refund(self, key_id: str, amount: int = 1) -> None:
        """Give back credits taken for work that did not happen (no-op for unlimited keys)."""
        with self._lock:
            self._db.execute(
                "UPDATE api_keys SET credits = credits + ? WHERE id = ? AND credits IS NOT NULL", (amount, key_id)
            )

    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM api_keys").fetchone()
        return n


def _record(row: sqlite3.Row) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        name=row["name"],
        hint=row["hint"],
        created=row["created"],
        expires=row["expires"],
        revoked=row["revoked"],
        rate_per_min=row["rate_per_min"],
        credits=row["credits"],
        webhook_secret=row["webhook_secret"],
    )
