"""Content-addressed asset storage: the :class:`AssetStore` contract and its embedded implementation.

``LocalAssetStore`` keeps assets in a folder (the embedded default); ``kiln.storage.s3.S3AssetStore``
keeps them in an S3-compatible bucket for scale-out (imported from its module, so that only servers
that use it load boto3). ``WriteBehindStore`` wraps either so that a sync response
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
