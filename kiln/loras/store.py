"""LoRA files on disk, named by the SHA-256 of their bytes, least recently used evicted first.

``<root>/<sha256>.safetensors`` holds each adapter once, however many URLs name it;
``<root>/by-url/<sha256 of the URL>`` remembers which adapter a URL delivered, so a URL is
downloaded once (to change an adapter, publish it under a new URL), and ``<root>/by-name/<sha256
of the name>`` which URL a Hugging Face repo id resolved to, so it is looked up once. Files are
written to a temporary name and renamed into place, so a reader never sees half a file, and several
processes sharing a data directory (an API node and a worker on one machine) share the cache.

The total size is kept under ``max_bytes`` by deleting the files used longest ago, except those
used within ``keep_s`` (an adapter a queued job still needs); an adapter that was evicted before
its job ran fails that job with a message saying to send the request again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path

from kiln.loras.safetensors import read_header

log = logging.getLogger(__name__)

SHA256 = re.compile(r"^[0-9a-f]{64}$")


class LoraStore:
    def __init__(self, root: Path, *, max_bytes: int = 20 * 2**30, keep_s: float = 3600.0) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.keep_s = keep_s
        self._lock = threading.Lock()
        (self.root / "by-url").mkdir(parents=True, exist_ok=True)
        self._sweep_partials()

    def _sweep_partials(self, older_than_s: float = 24 * 3600.0) -> None:
        """Delete downloads a dead process left half done (``.fetch-*``, ``.add-*``)."""
        cutoff = time.time() - older_than_s
        for p in [*self.root.glob(".fetch-*"), *self.root.glob(".add-*")]:
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
            except FileNotFoundError:
                pass

    def path(self, sha256: str) -> Path | None:
        """The adapter's file, marked as just used; None when the store does not hold it."""
        if not SHA256.match(sha256):
            return None
        path = self.root / f"{sha256}.safetensors"
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def for_url(self, url: str) -> str | None:
        """The SHA-256 of the adapter ``url`` delivered before, when the store still holds it."""
        try:
            sha = (self.root / "by-url" / _url_key(url)).read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        return sha if self.path(sha) is not None else None

    def url_for(self, name: str) -> str | None:
        """The download URL a name that is no URL (a Hugging Face repo id, ``hf:…``) resolved to before."""
        try:
            return (self.root / "by-name" / _url_key(name)).read_text(encoding="utf-8").strip() or None
        except (FileNotFoundError, UnicodeDecodeError):
            return None

    def remember_url(self, name: str, url: str) -> None:
        """Remember that ``name`` resolved to ``url``, so that naming it again needs no look-up (like a
        URL, a name keeps what it first resolved to: publish a changed adapter under a new name)."""
        index = self.root / "by-name" / _url_key(name)
        index.parent.mkdir(exist_ok=True)
        scratch = index.with_name(index.name + f".{os.getpid()}.{threading.get_ident()}")
        scratch.write_text(url, encoding="utf-8")
        os.replace(scratch, index)

    def add(self, temp: Path, sha256: str, *, url: str | None = None, field: str = "lora") -> str:
        """Check the downloaded file ``temp`` (whose bytes hash to ``sha256``) and move it into the
        store; raises :class:`~kiln.errors.InvalidLora` (deleting ``temp``) if it is no safetensors."""
        try:
            read_header(temp, field=field)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        final = self.root / f"{sha256}.safetensors"
        os.replace(temp, final)
        os.utime(final)
        if url is not None:
            index = self.root / "by-url" / _url_key(url)
            scratch = index.with_name(index.name + f".{os.getpid()}.{threading.get_ident()}")
            scratch.write_text(sha256)
            os.replace(scratch, index)
        self.evict(keep=sha256)
        return sha256

    def add_bytes(self, data: bytes, *, field: str = "lora") -> str:
        """Add an adapter held in memory (tests, the CLI); returns its SHA-256."""
        sha = hashlib.sha256(data).hexdigest()
        temp = self.root / f".add-{sha}.{os.getpid()}.{threading.get_ident()}"
        temp.write_bytes(data)
        return self.add(temp, sha, field=field)

    def cached(self, limit: int) -> list[str]:
        """The SHA-256s of up to ``limit`` adapters held, most recently used first (what a worker
        advertises for routing)."""
        files = []
        for p in self._files():
            try:
                files.append((p.stat().st_mtime, p.stem))
            except FileNotFoundError:
                continue
        return [sha for _, sha in sorted(files, reverse=True)[:limit]]

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files())

    def evict(self, *, keep: str | None = None) -> list[str]:
        """Delete the least recently used adapters until the store fits ``max_bytes``."""
        removed: list[str] = []
        with self._lock:
            files = []
            for p in self._files():
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
            total = sum(size for _, size, _ in files)
            recent = time.time() - self.keep_s
            for mtime, size, p in sorted(files):
                if total <= self.max_bytes:
                    break
                if p.stem == keep or mtime > recent:
                    continue
                p.unlink(missing_ok=True)
                total -= size
                removed.append(p.stem)
        if removed:
            log.info("LoRA cache: evicted %d adapters to stay under %d bytes", len(removed), self.max_bytes)
        return removed

    def _files(self) -> list[Path]:
        return [p for p in self.root.glob("*.safetensors") if SHA256.match(p.stem)]


def _url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()
