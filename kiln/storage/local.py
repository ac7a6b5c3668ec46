"""The embedded store: assets as files in a folder, ``root/{kind}/{name[:2]}/{name}``.

The two-digit fan-out keeps every folder small (256 per kind). Everything a record holds comes from
the name and the file's own ``stat``: media type and ETag from the name, size from ``st_size``,
``created_at`` from the modification time — no index to keep consistent with the files.

Writes are atomic: the bytes go to a hidden temp file (``.{name}.<random>.tmp``) in the final folder,
are fsynced and renamed over the final name with ``os.replace``, and the folder is fsynced. A crash
leaves at most a hidden temp file, never a partial asset under a final name; hidden files are never
valid names, so no read sees them, and :meth:`expire` removes old ones. Concurrent writers of the same
content each rename identical bytes into place. The store holds no mutable state, so every
operation is as thread-safe (and process-safe, on one filesystem) as the renames it is built on.
"""

from __future__ import annotations

import os
import stat as stat_mode
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from kiln.errors import AssetNotFound, InvalidAssetName
from kiln.storage.base import Asset, AssetRange, AssetStore, clamp_range
from kiln.storage.names import Kind, validate_name

CHUNK_SIZE = 64 * 1024
"""Bytes per chunk when streaming a range."""

LEFTOVER_AGE_S = 3600
"""Hidden temp files younger than this are never swept: a put may still be writing them."""

_SHARD_DIGITS = frozenset("0123456789abcdef")


class LocalAssetStore(AssetStore):
    """Assets in a folder on this machine. ``root`` is created on the first put."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalAssetStore({str(self.root)!r})"

    def _path(self, kind: Kind, name: str) -> Path:
        return self.root / kind / name[:2] / name

    def _put(self, kind: Kind, name: str, data: bytes) -> Asset:
        path = self._path(kind, name)
        now_ns = time.time_ns()
        try:
            if os.stat(path).st_size == len(data):
                # Already stored: refresh the time expiry counts from. If an expire sweep took the
                # file away meanwhile, utime fails and we write it again below.
                os.utime(path, ns=(now_ns, now_ns))
                return Asset.of(kind, name, size=len(data), created_at=_utc(now_ns))
        except FileNotFoundError:
            pass
        # Missing, or damaged (a content address fixes the size): write it whole.
        st = _write_atomically(path, data)
        return Asset.of(kind, name, size=st.st_size, created_at=_utc(st.st_mtime_ns))

    def _stat(self, kind: Kind, name: str) -> Asset | None:
        try:
            st = os.stat(self._path(kind, name))
        except FileNotFoundError:
            return None
        if not stat_mode.S_ISREG(st.st_mode):
            return None
        return Asset.of(kind, name, size=st.st_size, created_at=_utc(st.st_mtime_ns))

    def _open_range(self, kind: Kind, name: str, start: int, end: int | None) -> AssetRange:
        try:
            f = open(self._path(kind, name), "rb", buffering=0)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise AssetNotFound(f"no asset /{kind}/{name}") from None
        try:
            # The record comes from the open file itself: it matches the bytes we will stream.
            st = os.fstat(f.fileno())
            if not stat_mode.S_ISREG(st.st_mode):
                raise AssetNotFound(f"no asset /{kind}/{name}")
            asset = Asset.of(kind, name, size=st.st_size, created_at=_utc(st.st_mtime_ns))
            start, end = clamp_range(asset.size, start, end)
            f.seek(start)
        except BaseException:
            f.close()
            raise
        return AssetRange(asset, start, end, _chunks(f, end - start), f.close)

    def _delete(self, kind: Kind, name: str) -> None:
        try:
            os.unlink(self._path(kind, name))
        except FileNotFoundError:
            pass

    def _expire(self, kind: Kind, older_than: datetime) -> int:
        cutoff_ns = int(older_than.timestamp() * 1_000_000_000)
        leftover_cutoff_ns = min(cutoff_ns, time.time_ns() - LEFTOVER_AGE_S * 1_000_000_000)
        removed = 0
        for shard in _shards(self.root / kind):
            with os.scandir(shard) as entries:
                for entry in entries:
                    try:
                        mtime_ns = entry.stat(follow_symlinks=False).st_mtime_ns
                    except FileNotFoundError:
                        continue
                    if _is_asset(kind, shard.name, entry.name):
                        if mtime_ns < cutoff_ns and _expire_one(Path(entry.path), cutoff_ns):
                            removed += 1
                    elif entry.name.startswith(".") and mtime_ns < leftover_cutoff_ns:
                        _unlink_quietly(entry.path)  # a crashed put's temp file or an interrupted expire
        return removed


def _write_atomically(path: Path, data: bytes) -> os.stat_result:
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; assets are public by nature
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            st = os.fstat(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_folder(folder)
    return st


def _expire_one(path: Path, cutoff_ns: int) -> bool:
    """Delete ``path`` unless a put refreshed it after the sweep looked at it.

    The file is first renamed aside, so a concurrent put either refreshed it before the rename (we
    see the new time and put it back) or finds it gone and writes it again; never a put that returns
    an asset the sweep then deletes.
    """
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.expiring")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if os.stat(aside).st_mtime_ns >= cutoff_ns:
        os.replace(aside, path)
        return False
    os.unlink(aside)
    return True


def _chunks(f: BinaryIO, length: int) -> Iterator[bytes]:
    try:
        while length > 0:
            chunk = f.read(min(CHUNK_SIZE, length))
            if not chunk:  # cannot happen to an atomically written file; never spin on it
                return
            length -= len(chunk)
            yield chunk
    finally:
        f.close()


def _is_asset(kind: Kind, shard: str, name: str) -> bool:
    try:
        validate_name(kind, name)
    except InvalidAssetName:
        return False
    return name.startswith(shard)


def _shards(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return [
                e
                for e in entries
                if len(e.name) == 2 and set(e.name) <= _SHARD_DIGITS and e.is_dir(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return []


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; platforms that cannot open a folder (Windows) skip it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _utc(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1_000_000_000, UTC)
