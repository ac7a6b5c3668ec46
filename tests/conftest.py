"""Shared fixtures: toy checkpoints built once per session, a catalog over them, one engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln.engine import Engine
from kiln.testing.catalog import toy_catalog, write_toy_catalog
from kiln.testing.toys import build_toys
from redis_fixtures import durable_redis, redis_server, redis_url  # noqa: F401  (fixtures)
from s3_fixtures import bucket, s3_client, s3_endpoint  # noqa: F401  (fixtures)


@pytest.fixture(scope="session")
def toys_dir(tmp_path_factory) -> Path:
    """Every toy checkpoint, built offline. KILN_TEST_TOYS keeps them between local runs."""
    cached = os.environ.get("KILN_TEST_TOYS")
    directory = Path(cached) if cached else tmp_path_factory.mktemp("toys")
    build_toys(directory)
    return directory


@pytest.fixture(scope="session")
def catalog(toys_dir):
    return toy_catalog(toys_dir, small_formats=True)


@pytest.fixture(scope="session")
def catalog_file(toys_dir, tmp_path_factory) -> Path:
    return write_toy_catalog(toys_dir, tmp_path_factory.mktemp("catalog") / "catalog.toml", small_formats=True)


@pytest.fixture(scope="session")
def engine(catalog) -> Engine:
    return Engine(catalog, device="cpu")
