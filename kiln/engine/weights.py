"""Where a model's weights are on this machine, and how they get there (``kiln pull``).

Generation never downloads: :func:`require` answers with the local directory or raises
:class:`ModelNotInstalled` naming the command that installs the model. Only :func:`pull` talks to
the Hugging Face hub, and it stores into the standard cache (``HF_HOME`` / ``HF_HUB_CACHE``), so
weights pulled by other tools are found too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kiln.catalog import ModelSpec
from kiln.errors import KilnError, ModelNotInstalled


log = logging.getLogger(__name__)


class PullError(KilnError):
    code = "pull_failed"


def locate(spec: ModelSpec) -> Path | None:
    """The complete checkpoint directory for ``spec`` on this machine, or None."""
    if spec.toy is not None:
        from kiln.testing.toys import is_complete

        # a toy built by an older Kiln is stale: it reads as not installed and is rebuilt
        return spec.local_path if spec.local_path and is_complete(spec.local_path, spec.toy) else None
    path = spec.local_path
    if path is None:
        path = _cached_snapshot(spec)
    return path if path is not None and _complete(path) else None


def install_hint(spec: ModelSpec) -> str:
    """How an operator installs ``spec``: the one wording shared by errors and ``kiln models``."""
    if spec.local_path is None or spec.toy:
        return f"kiln pull {spec.key}"
    return "place its diffusers checkpoint at the catalog's source path"


def require(spec: ModelSpec) -> Path:
    """The checkpoint directory, or :class:`ModelNotInstalled` naming how to install it.

    The message holds no server paths: it may reach API clients. Operators see the path in the
    log and in ``kiln models``.
    """
    path = locate(spec)
    if path is None:
        hint = install_hint(spec)
        if spec.local_path is not None:
            log.warning("%s: no complete checkpoint at %s", spec.key, spec.local_path)
        verb = "run: " if hint.startswith("kiln ") else ""
        raise ModelNotInstalled(f"{spec.key} is not installed on this server; {verb}{hint}", details={"install": hint})
    return path


def pull(spec: ModelSpec, *, token: str | None = None) -> Path:
    """Download ``spec`` into the Hugging Face cache (resuming a partial download) and return its path.

    A toy model (``toy`` in the catalog) is built locally at its ``source`` instead.
    """
    if spec.toy is not None:
        from kiln.testing.toys import build_toy

        assert spec.local_path is not None  # the catalog guarantees a toy has a local path
        return build_toy(spec.toy, spec.local_path.parent)
    if spec.local_path is not None:
        if _complete(spec.local_path):
            return spec.local_path
        raise PullError(f"{spec.key} is a local checkpoint ({spec.local_path}); there is nothing to download")
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import HfHubHTTPError

    try:
        # diffusers' own download fetches only what from_pretrained loads (no single-file
        # checkpoints beside the diffusers layout), resumes, and falls back to the cache offline.
        path = Path(DiffusionPipeline.download(spec.source, revision=spec.revision, token=token))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise PullError(f"cannot download {spec.source}: the hub is unreachable, offline mode is on, or the repo is gated ({type(exc).__name__})") from exc
    if not _complete(path):
        raise PullError(f"{spec.source} was downloaded but is not a complete diffusers checkpoint (see {path})")
    return path


def _cached_snapshot(spec: ModelSpec) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec.source, revision=spec.revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _complete(path: Path) -> bool:
    """A diffusers checkpoint whose model_index.json names components that all exist."""
    index = path / "model_index.json"
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    for name, value in components.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        if not (path / name).is_dir():
            return False
    return True
