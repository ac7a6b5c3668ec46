"""The storage contract: :class:`AssetStore`, the :class:`Asset` record and :class:`AssetRange`.

A store keeps immutable, content-addressed assets in three namespaces (kinds ``i``, ``v``, ``u``; see
:mod:`kiln.storage.names`). It knows nothing of HTTP, jobs or the engine, and promises no local path
for an asset, so an S3-compatible store fits the same contract.

Serving an asset over HTTP with this contract::

    asset = store.stat(kind, name)                 # HEAD, ETag / If-None-Match: no body is read
    start, end = <Range header resolved against asset.size>      # 416 decided here
    with store.open_range(kind, name, start, end) as body:       # raises AssetNotFound before any byte
        ...                                                      # stream `body` chunk by chunk

Errors: a malformed kind or name raises :class:`~kiln.errors.InvalidAssetName` (a subclass of
:class:`~kiln.errors.AssetNotFound`, so a CDN route answers both with 404) before the store does
any I/O; an unknown media type raises :class:`~kiln.errors.UnsupportedFormat`; I/O failures of the
backend propagate as ``OSError`` (a folder: disk full, permissions) or
:class:`~kiln.errors.StorageUnavailable` (an S3 endpoint down, credentials refused).
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Self

from kiln.storage.names import (
    Kind,
    asset_name,
    validate_kind,
    validate_media_type,
    validate_name,
)


@dataclass(frozen=True, slots=True)
class Asset:
    """What a store knows about one stored asset.

    ``etag`` is the strong HTTP validator, quoted and ready for the header (``"<sha256 hex>"``): it
    is derived from the name, so every store and every replica gives the same one. ``created_at``
    (timezone-aware, UTC) is when the content was last put; expiry counts from it.
    """

    name: str
    kind: Kind
    media_type: str
    size: int
    etag: str
    created_at: datetime

    @classmethod
    def of(cls, kind: Kind, name: str, *, size: int, created_at: datetime) -> Asset:
        """The record for a validated ``kind`` / ``name``; media type and ETag follow from the name."""
        media_type = validate_name(kind, name)
        return cls(name, kind, media_type, size, f'"{name.split(".", 1)[0]}"', created_at)

    @property
    def key(self) -> str:
        """``{kind}/{name}``: the CDN path without its leading slash, and the object key suffix."""
        return f"{self.kind}/{self.name}"


class AssetRange:
    """An open byte range ``[start, end)`` of one asset; iterating it yields the bytes in chunks.

    ``asset`` describes the whole asset (``asset.size`` is the complete length for a
    ``Content-Range`` header); ``start`` and ``end`` are the requested bounds clamped to it. Opening
    happens when the range is created, so a missing asset is reported before the first byte; the
    chunks are read as they are consumed. Iterating to the end releases the underlying handle;
    :meth:`close` (or ``with``) releases it early. Not for sharing between threads.
    """

    __slots__ = ("_chunks", "_close", "asset", "end", "start")

    def __init__(
        self, asset: Asset, start: int, end: int, chunks: Iterable[bytes], close: Callable[[], None]
    ) -> None:
        self.asset = asset
        self.start = start
        self.end = end
        self._chunks = iter(chunks)
        self._close = close

    @property
    def length(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def read(self) -> bytes:
        """All remaining bytes of the range, at once; then closes it."""
        with self:
            return b"".join(self._chunks)

    def close(self) -> None:
        """Release the underlying handle; iterating afterwards yields nothing."""
        stop = getattr(self._chunks, "close", None)  # a generator: stop it where it is
        if stop is not None:
            stop()
        self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def clamp_range(size: int, start: int, end: int | None) -> tuple[int, int]:
    """Bounds of ``data[start:end]`` for ``len(data) == size``, given ``0 <= start <= end``."""
    return min(start, size), size if end is None else min(end, size)


class AssetStore(ABC):
    """Content-addressed storage of immutable assets; safe to share between threads.

    The public methods check their arguments — every kind and name through
    :func:`~kiln.storage.names.validate_name` — and only then call the underscore hooks an
    implementation provides, so no implementation sees an unchecked name.
    """

    def put(self, data: bytes, kind: Kind, media_type: str) -> Asset:
        """Store ``data`` under its content address and return its record.

        Idempotent: the same bytes and media type give the same name in every kind and store.
        Putting content that is already stored rewrites nothing (its ``created_at`` is refreshed,
        so an upload's retention counts from its latest put). A failed put leaves no asset behind.
        """
        media_type = validate_media_type(kind, media_type)
        return self._put(kind, asset_name(data, media_type), data)

    def put_soon(self, data: bytes, kind: Kind, media_type: str) -> Asset:
        """Like :meth:`put`, for a caller that need not wait until the asset is durable.

        The returned asset is readable at once either way. Stores that can defer the write
        (:class:`~kiln.storage.write_behind.WriteBehindStore`) return before it lands; this default
        is :meth:`put` itself.
        """
        return self.put(data, kind, media_type)

    def close(self) -> None:
        """Release what the store holds (writer threads, connections); finishes pending writes."""

    def stat(self, kind: Kind, name: str) -> Asset | None:
        """The record of a stored asset, or ``None`` if there is none; reads no content."""
        validate_name(kind, name)
        return self._stat(kind, name)

    def open_range(self, kind: Kind, name: str, start: int = 0, end: int | None = None) -> AssetRange:
        """Open bytes ``[start, end)`` of an asset (``end=None``: to the end) for streaming.

        Python slice semantics past the end: ``end`` is clamped to the size and a ``start`` at or
        beyond it gives an empty range — an HTTP layer decides 416 from ``asset.size`` beforehand.
        A negative ``start`` or an ``end`` before ``start`` is a caller's bug (``ValueError``).
        Raises :class:`~kiln.errors.AssetNotFound` if the asset is not stored.
        """
        validate_name(kind, name)
        start = operator.index(start)
        end = None if end is None else operator.index(end)
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"invalid byte range [{start}, {end})")
        return self._open_range(kind, name, start, end)

    def read(self, kind: Kind, name: str) -> bytes:
        """The whole content of an asset (for inputs such as uploads; stream large ones instead)."""
        return self.open_range(kind, name).read()

    def delete(self, kind: Kind, name: str) -> None:
        """Remove an asset; deleting one that is not stored is not an error."""
        validate_name(kind, name)
        self._delete(kind, name)

    def expire(self, kind: Kind, older_than: datetime) -> int:
        """Delete every asset of ``kind`` whose ``created_at`` is before ``older_than``; return how many.

        ``older_than`` must be timezone-aware. An asset put again while the sweep runs is kept.
        """
        validate_kind(kind)
        if older_than.tzinfo is None or older_than.utcoffset() is None:
            raise ValueError("expire() needs a timezone-aware datetime")
        return self._expire(kind, older_than.astimezone(UTC))

    # --- what an implementation provides; arguments arrive checked --------------------------------

    @abstractmethod
    def _put(self, kind: Kind, name: str, data: bytes) -> Asset: ...

    @abstractmethod
    def _stat(self, kind: Kind, name: str) -> Asset | None: ...

    @abstractmethod
    def _open_range(self, kind: Kind, name: str, start: int, end: int | None) -> AssetRange: ...

    @abstractmethod
    def _delete(self, kind: Kind, name: str) -> None: ...

    @abstractmethod
    def _expire(self, kind: Kind, older_than: datetime) -> int: ...
