"""LoRA adapters for workers on other machines, through the shared asset store.

An API node fetches and checks every adapter a request names into its own
:class:`~kiln.loras.LoraStore`. With Redis (scale-out), the job may run on a ``kiln worker`` elsewhere
that has no such file, so the node also publishes the adapter into the asset store both sides use
(the S3 bucket or a shared data directory) as an ``l`` asset, named by its SHA-256 — an asset kind no
CDN route serves. A worker that lacks an adapter copies it from there into its own LoraStore (streamed
to a temporary file, its SHA-256 checked, parsed as safetensors again) and keeps it cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from kiln.errors import AssetNotFound
from kiln.loras.store import SHA256, LoraStore
from kiln.storage import AssetStore
from kiln.storage.names import SAFETENSORS

log = logging.getLogger(__name__)


def asset_name(sha256: str) -> str:
    return f"{sha256}.safetensors"


class SharedLoras:
    """A :class:`LoraStore` (``local``) that publishes to and fills itself from ``store``.

    Workers use it as their :class:`~kiln.engine.lora.LoraFiles`; API nodes call :meth:`publish`."""

    def __init__(self, local: LoraStore, store: AssetStore) -> None:
        self.local, self.store = local, store
        self._published: set[str] = set()
        self._lock = threading.Lock()

    # --- API node ------------------------------------------------------------------------------------

    def publish(self, sha256: str) -> None:
        """Make the local adapter ``sha256`` readable by every worker (once per process and adapter)."""
        if sha256 in self._published:
            return
        path = self.local.path(sha256)
        if path is None:
            return  # evicted meanwhile: the job fails on the worker saying to send the request again
        if self.store.stat("l", asset_name(sha256)) is None:
            self.store.put(path.read_bytes(), "l", SAFETENSORS)
            log.info("LoRA %s published for workers on other machines", sha256[:12])
        with self._lock:
            self._published.add(sha256)

    # --- worker (LoraFiles) ---------------------------------------------------------------------------

    def path(self, sha256: str) -> Path | None:
        """The adapter's local file, copied from the shared store first if this machine lacks it."""
        local = self.local.path(sha256)
        if local is not None or not SHA256.match(sha256):
            return local
        temp = self.local.root / f".fetch-{sha256}.{os.getpid()}.{threading.get_ident()}"
        digest = hashlib.sha256()
        try:
            with self.store.open_range("l", asset_name(sha256)) as source, open(temp, "wb") as out:
                for chunk in source:
                    digest.update(chunk)
                    out.write(chunk)
        except AssetNotFound:
            temp.unlink(missing_ok=True)
            return None
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != sha256:
            temp.unlink(missing_ok=True)
            log.error("shared LoRA %s is damaged (its bytes hash to %s); not used", sha256[:12], digest.hexdigest()[:12])
            return None
        self.local.add(temp, sha256)
        log.info("LoRA %s copied from the shared store", sha256[:12])
        return self.local.path(sha256)

    def cached(self, limit: int) -> list[str]:
        return self.local.cached(limit)
