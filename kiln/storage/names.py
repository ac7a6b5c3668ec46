"""Asset kinds, media types and content-addressed names: the one place a name is checked.

A name is the lowercase hex SHA-256 of the asset's bytes (all 64 digits) plus the extension of its
media type: ``3f2a…c9.webp``. Names are the last segment of the CDN routes ``/i/{name}``,
``/v/{name}`` and ``/u/{name}``, the file name of the local store and the tail of the S3 key, so
every name that reaches a store is checked by :func:`validate_name` first, before any I/O.

Why all 64 digits: user uploads are attacker-chosen bytes and names are permanent public URLs; at
128 bits (32 digits) a birthday collision costs ~2^64 hashes, which is within reach of a determined
attacker, while the full digest has no known collision. The 32 extra characters cost nothing, and the
full digest is what S3's ``x-amz-checksum-sha256`` integrity check takes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Literal

from kiln.errors import InvalidAssetName, UnsupportedFormat

Kind = Literal["i", "v", "u", "l"]
"""``i`` generated images, ``v`` generated videos, ``u`` user uploads (the CDN route prefixes), ``l``
LoRA adapters shared with workers on other machines (:mod:`kiln.loras.shared`; no CDN route)."""

KINDS: tuple[Kind, ...] = ("i", "v", "u", "l")

SAFETENSORS = "application/vnd.kiln.safetensors"
"""The media type LoRA adapters are stored under (safetensors has no registered one)."""

EXTENSIONS: Mapping[str, str] = {
    "image/webp": "webp",
    "image/png": "png",
    "image/jpeg": "jpg",
    "video/mp4": "mp4",
    SAFETENSORS: "safetensors",
}
"""Media type -> file extension; the only media types a store accepts."""

MEDIA_TYPES: Mapping[str, str] = {ext: media for media, ext in EXTENSIONS.items()}
"""File extension -> media type."""

_IMAGES = frozenset({"image/webp", "image/png", "image/jpeg"})

KIND_MEDIA_TYPES: Mapping[Kind, frozenset[str]] = {
    "i": _IMAGES,
    "v": frozenset({"video/mp4"}),
    "u": _IMAGES,  # uploads are input images for i2i / i2v
    "l": frozenset({SAFETENSORS}),
}

# fullmatch and re.ASCII: no trailing-newline leniency of `$`, no Unicode digits or letters.
_NAME = re.compile(r"[0-9a-f]{64}\.(webp|png|jpg|mp4|safetensors)", re.ASCII)


def validate_kind(kind: object) -> Kind:
    """Return ``kind`` if it is one of :data:`KINDS`; otherwise raise :class:`InvalidAssetName`."""
    if type(kind) is not str or kind not in KINDS:
        raise InvalidAssetName(f"unknown asset kind {_shown(kind)}; kinds are i, v, u and l")
    return kind  # type: ignore[return-value]


def validate_name(kind: object, name: object) -> str:
    """Check that ``name`` is exactly a name this store writes for ``kind``; return its media type.

    Anything else — path separators, ``..``, NUL, uppercase, Unicode lookalikes, a truncated or
    padded digest, an extension the kind does not hold — raises :class:`InvalidAssetName`.
    """
    kind = validate_kind(kind)
    if type(name) is not str or not _NAME.fullmatch(name):
        raise InvalidAssetName(
            f"{_shown(name)} is not an asset name (64 lowercase hex digits and .webp, .png, .jpg, .mp4 or .safetensors)"
        )
    media_type = MEDIA_TYPES[name.rsplit(".", 1)[1]]
    if media_type not in KIND_MEDIA_TYPES[kind]:
        raise InvalidAssetName(f"/{kind}/ holds no {media_type} assets")
    return media_type


def validate_media_type(kind: object, media_type: object) -> str:
    """Return the canonical media type for storing under ``kind``, or raise :class:`UnsupportedFormat`.

    Case and parameters are ignored (``IMAGE/PNG; q=1`` is ``image/png``); nothing else is guessed
    (``image/jpg`` is refused).
    """
    kind = validate_kind(kind)
    canonical = media_type.split(";", 1)[0].strip().lower() if isinstance(media_type, str) else None
    allowed = sorted(KIND_MEDIA_TYPES[kind])
    if canonical not in allowed:
        raise UnsupportedFormat(
            f"cannot store {_shown(media_type)} as /{kind}/; use one of {', '.join(allowed)}",
            details={"allowed": allowed},
        )
    return canonical


def asset_name(data: bytes, media_type: str) -> str:
    """The content-addressed name of ``data``: SHA-256 hex digest plus the media type's extension."""
    if media_type not in EXTENSIONS:
        raise UnsupportedFormat(f"no asset name for media type {_shown(media_type)}")
    return f"{hashlib.sha256(data).hexdigest()}.{EXTENSIONS[media_type]}"


def _shown(value: object) -> str:
    """A short, escaped rendering of a hostile value for a message (never the whole of it)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
