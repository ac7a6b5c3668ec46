"""A local S3-compatible server for tests: moto's server mode on a free port, a fresh bucket per test."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import boto3
import pytest

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "kiln-test", "aws_secret_access_key": "kiln-test-secret"}


@dataclass
class Bucket:
    """One empty bucket on the test server, and a plain boto3 client to look inside it."""

    name: str
    endpoint_url: str
    client: object

    def store_kwargs(self, **extra) -> dict:
        """Arguments for :class:`~kiln.storage.s3.S3AssetStore` pointing at this bucket."""
        return {
            "endpoint_url": self.endpoint_url, "region": REGION, "access_key": CREDENTIALS["aws_access_key_id"],
            "secret_key": CREDENTIALS["aws_secret_access_key"], **extra,
        }

    def settings(self, **extra) -> dict:
        """Kiln settings (``s3_*``) pointing at this bucket."""
        return {
            "s3_bucket": self.name, "s3_endpoint_url": self.endpoint_url, "s3_region": REGION,
            "s3_access_key": CREDENTIALS["aws_access_key_id"], "s3_secret_key": CREDENTIALS["aws_secret_access_key"],
            **extra,
        }

    def keys(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", ()))

    def set_last_modified(self, key: str, when: datetime) -> None:
        """Backdate an object (S3 has no utime: this reaches into the in-process server's state)."""
        from moto.s3.models import s3_backends

        partition, account = s3_backends.bucket_accounts[self.name]
        stored = s3_backends[account][partition].get_object(self.name, key)
        assert stored is not None, key
        stored.last_modified = when.astimezone(UTC).replace(tzinfo=None)  # moto keeps naive UTC


@pytest.fixture(scope="session")
def s3_endpoint():
    """``http://127.0.0.1:PORT`` of a moto S3 server running in this process for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION, **CREDENTIALS)


@pytest.fixture
def bucket(s3_endpoint, s3_client) -> Bucket:
    client = s3_client
    name = f"kiln-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return Bucket(name, s3_endpoint, client)
