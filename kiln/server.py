"""The composition root: settings in, a running render API out (embedded mode)."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from kiln.api.app import create_app
from kiln.api.services import Services
from kiln.catalog import load_catalog
from kiln.engine import Engine
from kiln.keys import KeyStore
from kiln.queue import SqliteBroker
from kiln.settings import Settings
from kiln.storage import LocalAssetStore
from kiln.worker import Worker

log = logging.getLogger(__name__)


def build_services(settings: Settings, *, engine: Engine | None = None) -> tuple[Services, Worker]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(settings.catalog)
    engine = engine or Engine(catalog)
    broker = SqliteBroker(settings.database, aging_seconds=settings.aging_s)
    store = LocalAssetStore(settings.assets_dir)
    keys = KeyStore(settings.database)
    worker = Worker(engine, broker, store, preload=(catalog.default_model,))
    services = Services(
        settings=settings, catalog=catalog, broker=broker, store=store, keys=keys, worker=worker,
        validate=engine.plan,
    )
    return services, worker


def build_app(settings: Settings, *, engine: Engine | None = None) -> FastAPI:
    services, worker = build_services(settings, engine=engine)
    return create_app(services, on_start=worker.start, on_stop=worker.stop)
