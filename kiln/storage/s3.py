"""S3-compatible object storage: assets as objects ``{prefix}{kind}/{name}`` in one bucket.

Every API node and worker pointed at the same bucket serves the same permanent URLs; the CDN routes
stream from the bucket, so ``/i/…``, ``/v/…`` and ``/u/…`` stay the addresses clients see, whichever
store holds the bytes. Works with AWS S3 and with the S3 API of MinIO, Cloudflare R2, Ceph and the
like (an endpoint outside AWS gets path-style addressing, which all of them accept).

What a record holds: media type and ETag from the name, size from ``Content-Length``, ``created_at``
from the object's ``LastModified`` (whole seconds, the server's clock). A put that finds the object
already stored uploads nothing: a server-side copy of the object onto itself refreshes
``LastModified``, which is what expiry counts from. Uploads carry ``x-amz-checksum-sha256`` (the
digest the name is made of), so the server refuses bytes damaged on the way; a PUT is atomic, so a
failed put leaves no object.

Errors: a missing object is ``None`` from :meth:`stat` and :class:`~kiln.errors.AssetNotFound` from
:meth:`open_range`, as in the folder store; anything else the endpoint answers or fails with (no
connection, bad credentials, no bucket, throttling past boto3's retries) is
:class:`~kiln.errors.StorageUnavailable`, whose message names the endpoint and bucket, never a
credential. One boto3 client is shared by every thread (clients are thread-safe; sessions are not).

Expiry lists the kind's prefix and deletes each page's old objects with one ``DeleteObjects``. S3
has no portable compare-and-delete, so an asset put again in the instant between a page being listed
and its batch deleted can still go (the folder store closes that window; here it is milliseconds
per page instead of the whole sweep).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from kiln.errors import AssetNotFound, InvalidAssetName, StorageUnavailable
from kiln.storage.base import Asset, AssetRange, AssetStore, clamp_range
from kiln.storage.names import Kind, validate_name

log = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024
"""Bytes per chunk when streaming a range."""

PAGE_SIZE = 1000
"""Keys listed per page by :meth:`S3AssetStore.expire`, each page's old ones deleted in one request
(1000 is the most one ``DeleteObjects`` takes)."""

CACHE_CONTROL = "public, max-age=31536000, immutable"
"""Stored on every object, so a CDN put directly in front of the bucket caches as the routes do."""

_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
_UNSATISFIABLE = frozenset({"416", "InvalidRange"})


class S3AssetStore(AssetStore):
    """Assets in an S3-compatible bucket; safe to share between threads.

    ``access_key`` and ``secret_key`` go together; left out, boto3's default chain finds credentials
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance role), as it finds the
    region (``AWS_DEFAULT_REGION``) and an endpoint (``AWS_ENDPOINT_URL_S3``) when these are None.
    ``prefix`` puts every key under a folder of a shared bucket (``kiln/`` gives ``kiln/i/…``).
    Nothing is sent before the first operation; call :meth:`check` at start-up.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        prefix: str = "",
    ) -> None:
        if not bucket:
            raise ValueError("S3AssetStore needs a bucket name")
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither (boto3's default chain)")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        config = Config(
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=64,  # the CDN streams from a thread pool: one connection per stream
            # boto3 >= 1.36 adds CRC32 trailers to every upload by default, which several S3-compatible
            # servers refuse; uploads carry our own SHA-256 instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(  # a session of our own: the default one is not thread-safe
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region,
            botocore_session=_botocore_session(),
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        endpoint = self._client.meta.endpoint_url  # as given, or from the AWS environment
        if not _on_aws(endpoint):
            # MinIO, R2, Ceph: path-style addressing works on all of them; bucket host names need DNS
            self._client.close()
            path_style = config.merge(Config(s3={"addressing_style": "path"}))
            self._client = session.client("s3", endpoint_url=endpoint_url, config=path_style)
        # Several S3-compatible servers still require Content-MD5 on DeleteObjects, which boto3 stopped
        # sending in 1.36 (it sends a CRC32 instead); AWS accepts either.
        self._client.meta.events.register("before-sign.s3.DeleteObjects", _add_content_md5)
        self.where = f"s3://{bucket}/{self.prefix} at {endpoint}"

    def __repr__(self) -> str:
        return f"S3AssetStore({self.where!r})"

    def check(self) -> None:
        """Make sure the bucket exists and these credentials reach it (``HEAD`` bucket).

        Raises :class:`~kiln.errors.StorageUnavailable` saying what is wrong; for start-up.
        """
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise StorageUnavailable(f"asset storage {self.where}: bucket {self.bucket!r} does not exist") from exc
            if status == 403:
                raise StorageUnavailable(
                    f"asset storage {self.where}: access to bucket {self.bucket!r} denied "
                    "(check s3_access_key / s3_secret_key or the AWS credentials in the environment)"
                ) from exc
            raise self._unavailable(exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(exc) from exc

    def close(self) -> None:
        self._client.close()

    # --- the contract -------------------------------------------------------------------------------

    def _put(self, kind: Kind, name: str, data: bytes) -> Asset:
        key = self._key(kind, name)
        media_type = validate_name(kind, name)
        head = self._head(key)
        if head is not None and head["ContentLength"] == len(data):
            # Already stored: refresh LastModified without sending the bytes again. If an expire
            # sweep took the object away meanwhile, the copy finds no source and we upload below.
            try:
                copied = self._call(
                    "copy_object", Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                    MetadataDirective="REPLACE", ContentType=media_type, CacheControl=CACHE_CONTROL,
                )
            except AssetNotFound:
                pass
            else:
                created = copied.get("CopyObjectResult", {}).get("LastModified")
                return Asset.of(kind, name, size=len(data), created_at=_utc(created) or _server_time(copied))
        digest = bytes.fromhex(name.split(".", 1)[0])
        response = self._call(
            "put_object", Key=key, Body=data, ContentType=media_type, CacheControl=CACHE_CONTROL,
            ChecksumSHA256=base64.b64encode(digest).decode("ascii"),
        )
        # A PUT's answer has no LastModified; the server's Date is the same clock, to the second.
        return Asset.of(kind, name, size=len(data), created_at=_server_time(response))

    def _stat(self, kind: Kind, name: str) -> Asset | None:
        head = self._head(self._key(kind, name))
        if head is None:
            return None
        return Asset.of(kind, name, size=head["ContentLength"], created_at=_utc(head["LastModified"]))

    def _open_range(self, kind: Kind, name: str, start: int, end: int | None) -> AssetRange:
        key = self._key(kind, name)
        params: dict[str, Any] = {"Key": key}
        if end is not None and end <= start:
            return self._empty_range(kind, name, start, end)  # HTTP cannot ask for zero bytes
        if start > 0 or end is not None:
            params["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            response = self._call("get_object", **params)
        except _Unsatisfiable:  # start at or past the end (or an empty object): no bytes to send
            return self._empty_range(kind, name, start, end)
        # The record comes from the answer itself: it matches the bytes we will stream.
        content_range = response.get("ContentRange")  # "bytes first-last/size"
        size = int(content_range.rsplit("/", 1)[1]) if content_range else response["ContentLength"]
        skip = 0 if content_range else start  # a server that ignored the Range sends the whole object
        asset = Asset.of(kind, name, size=size, created_at=_utc(response["LastModified"]))
        start, end = clamp_range(size, start, end)
        body = response["Body"]
        return AssetRange(asset, start, end, self._chunks(body, skip, end - start), body.close)

    def _delete(self, kind: Kind, name: str) -> None:
        try:
            self._call("delete_object", Key=self._key(kind, name))
        except AssetNotFound:
            pass

    def _expire(self, kind: Kind, older_than: datetime) -> int:
        folder = f"{self.prefix}{kind}/"
        removed = 0
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=folder, PaginationConfig={"PageSize": PAGE_SIZE}
        )
        try:
            for page in pages:
                doomed = [
                    {"Key": obj["Key"]}
                    for obj in page.get("Contents", ())
                    if _is_asset(kind, obj["Key"][len(folder):]) and obj["LastModified"] < older_than
                ]
                if doomed:
                    removed += self._delete_batch(doomed)
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable(exc) from exc
        return removed

    # --- helpers ------------------------------------------------------------------------------------

    def _key(self, kind: Kind, name: str) -> str:
        return f"{self.prefix}{kind}/{name}"

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self._call("head_object", Key=key)
        except AssetNotFound:
            return None

    def _empty_range(self, kind: Kind, name: str, start: int, end: int | None) -> AssetRange:
        asset = self._stat(kind, name)
        if asset is None:
            raise AssetNotFound(f"no asset /{kind}/{name}")
        start, end = clamp_range(asset.size, start, end)
        return AssetRange(asset, start, max(start, end), [], lambda: None)

    def _delete_batch(self, doomed: list[dict[str, str]]) -> int:
        response = self._call("delete_objects", Delete={"Objects": doomed, "Quiet": True})
        errors = response.get("Errors", [])
        for error in errors:
            log.warning("expire: could not delete %s from %s: %s %s", error.get("Key"), self.where,
                        error.get("Code"), error.get("Message"))
        return len(doomed) - len(errors)

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        """One S3 request on this bucket, its failures in Kiln's vocabulary."""
        try:
            return getattr(self._client, operation)(Bucket=self.bucket, **params)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                raise AssetNotFound(f"no asset /{params.get('Key', '').removeprefix(self.prefix)}") from None
            if code in _UNSATISFIABLE:
                raise _Unsatisfiable from None
            raise self._unavailable(exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable(exc) from exc

    def _chunks(self, body: Any, skip: int, length: int) -> Iterator[bytes]:
        try:
            while skip > 0:
                dropped = body.read(min(CHUNK_SIZE, skip))
                if not dropped:
                    return
                skip -= len(dropped)
            while length > 0:
                chunk = body.read(min(CHUNK_SIZE, length))
                if not chunk:  # the object is immutable, so this is a cut connection: never spin on it
                    raise StorageUnavailable(f"asset storage {self.where}: the object ended early")
                length -= len(chunk)
                yield chunk
        except BotoCoreError as exc:  # a read timeout or a broken connection mid-stream
            raise self._unavailable(exc) from exc
        finally:
            body.close()

    def _unavailable(self, exc: Exception) -> StorageUnavailable:
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            reason = f"{error.get('Code') or status}: {error.get('Message') or 'no message'}"
        elif isinstance(exc, NoCredentialsError):
            reason = "no credentials (set s3_access_key and s3_secret_key, or AWS credentials in the environment)"
        else:
            reason = str(exc)
        return StorageUnavailable(f"asset storage {self.where} is unavailable: {reason}")


_LOADER = botocore.loaders.create_loader()


def _botocore_session() -> botocore.session.Session:
    """A new botocore session over one shared loader: the service model and endpoint rules are parsed
    once per process instead of once per store (~0.1 s each)."""
    session = botocore.session.get_session()
    session.register_component("data_loader", _LOADER)
    return session


class _Unsatisfiable(Exception):
    """A ranged GET whose start is at or past the object's end (HTTP 416)."""


def _add_content_md5(request: Any, **_: Any) -> None:
    body = request.body if isinstance(request.body, bytes) else (request.body or b"")
    if "Content-MD5" not in request.headers and isinstance(body, bytes):
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        request.headers["Content-MD5"] = base64.b64encode(digest).decode("ascii")


def _on_aws(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _is_asset(kind: Kind, name: str) -> bool:
    try:
        validate_name(kind, name)
    except InvalidAssetName:
        return False
    return True


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _server_time(response: dict[str, Any]) -> datetime:
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return parsedate_to_datetime(date).astimezone(UTC)
    except (TypeError, ValueError):
        return datetime.now(UTC)
