"""Content-addressed asset storage: the :class:`AssetStore` contract and its embedded implementation.

``LocalAssetStore`` keeps assets in a folder (the embedded default); an S3-compatible store for
scale-out implements the same contract. ``WriteBehindStore`` wraps either so that a sync response
need not wait for its output's write. See :mod:`kiln.storage.base` for the contract and
:mod:`kiln.storage.names` for kinds, media types and names.
"""

from kiln.storage.base import Asset, AssetRange, AssetStore
from kiln.storage.local import LocalAssetStore
from kiln.storage.write_behind import WriteBehindStore
from kiln.storage.names import (
    EXTENSIONS,
    KIND_MEDIA_TYPES,
    KINDS,
    MEDIA_TYPES,
    Kind,
    asset_name,
    validate_kind,
    validate_media_type,
    validate_name,
)

__all__ = [
    "EXTENSIONS",
    "KINDS",
    "KIND_MEDIA_TYPES",
    "MEDIA_TYPES",
    "Asset",
    "AssetRange",
    "AssetStore",
    "Kind",
    "LocalAssetStore",
    "WriteBehindStore",
    "asset_name",
    "validate_kind",
    "validate_media_type",
    "validate_name",
]
