"""A render-API server in process for tests: real broker, store and keys; a real or fake worker."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi.testclient import TestClient

from kiln.api.app import create_app
from kiln.api.services import Services
from kiln.keys import KeyStore
from kiln.queue import SqliteBroker
from kiln.settings import Settings
from kiln.storage import LocalAssetStore
from kiln.worker import Worker


@dataclass
class Server:
    client: TestClient
    services: Services
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def wait_for(self, job_id: str, *, timeout: float = 60.0):
        """Poll the broker until the job is terminal (no fixed sleep: it returns as soon as it is)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.services.broker.get(job_id)
            if job.status.terminal:
                return job
            time.sleep(0.01)
        raise AssertionError(f"job {job_id} did not finish in {timeout}s")


@contextmanager
def running_server(tmp_path, engine, *, worker=None, start_worker=True, **settings):
    settings = Settings(data_dir=tmp_path / "data", **settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    broker = SqliteBroker(settings.database, aging_seconds=settings.aging_s)
    store = LocalAssetStore(settings.assets_dir)
    keys = KeyStore(settings.database)
    worker = worker or Worker(engine, broker, store)
    services = Services(settings=settings, catalog=engine.catalog, broker=broker, store=store, keys=keys,
                        worker=worker, validate=engine.plan)
    app = create_app(services, on_start=worker.start if start_worker else None,
                     on_stop=worker.stop if start_worker else None)
    key = keys.create("test").secret
    with TestClient(app, base_url="http://kiln.test") as client:
        yield Server(client, services, key)
