"""The composition root: settings in, a running render API out (embedded mode)."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from kiln.api.app import create_app
from kiln.api.finished import FinishedWatch, node_name
from kiln.api.services import Services
from kiln.api.webhooks import address_check, notify_terminal
from kiln.catalog import load_catalog
from kiln.engine import Engine
from kiln.engine.safety import load_safety_checker
from kiln.keys import open_key_store, open_limiter, open_slots
from kiln.loras import LoraStore
from kiln.loras.shared import SharedLoras
from kiln.maintenance import Janitor
from kiln.queue import Broker, SqliteBroker
from kiln.settings import Settings, SettingsError
from kiln.storage import AssetStore, LocalAssetStore, WriteBehindStore
from kiln.webhooks import DEFAULT_SCHEDULE, GIVE_UP_AFTER, Dispatcher, Outbox
from kiln.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Everything one embedded server runs, with the order it starts and stops in."""

    services: Services
    worker: Any  # kiln.worker.Worker, or a stand-in with start/stop in tests
    dispatcher: Dispatcher
    janitor: Janitor
    watch: Any = None  # kiln.api.finished.FinishedWatch with Redis: webhooks of jobs finished anywhere
    listener: Any = None  # kiln.queue.changes.RedisChangeListener with Redis: job changes for SSE

    def start(self) -> None:
        self.resend_missed_webhooks()
        if self.listener is not None:
            self.listener.start()
        if self.watch is not None:
            self.watch.start()
        self.worker.start()
        self.dispatcher.start()
        self.janitor.start()

    def resend_missed_webhooks(self) -> int:
        """A process killed between finishing a job and queueing its webhook would lose it: queue
        every recent terminal job's webhook again (the outbox ignores ones it already has)."""
        svc = self.services
        if svc.outbox is None or not hasattr(svc.broker, "finished_since") or self.watch is not None:
            return 0  # with Redis the watch's first sweep does it, once across nodes
        jobs = [j for j in svc.broker.finished_since(time.time() - GIVE_UP_AFTER) if j.payload.get("webhook")]
        for job in jobs:
            notify_terminal(svc, job)
        return len(jobs)

    def stop(self) -> None:
        self.worker.stop()  # finishes or hands back the job in hand
        if self.watch is not None:
            self.watch.stop()
        if self.listener is not None:
            self.listener.stop()
        self.dispatcher.stop(timeout=10)  # pending deliveries resume from the outbox at next start
        self.janitor.stop()
        self.services.store.close()  # the sync outputs still being written land before exit


def build_runtime(
    settings: Settings,
    *,
    engine: Engine | None = None,
    worker: Any | None = None,
    webhook_schedule: Sequence[float] = DEFAULT_SCHEDULE,
) -> Runtime:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    catalog = engine.catalog if engine is not None else load_catalog(settings.catalog)
    engine = engine or Engine(catalog, optimize=settings.optimize, compile_cache_dir=settings.compile_cache)
    # loaded first, so a bad safety_checker stops start-up (before any file is opened), never a request
    safety = None
    if worker is None and settings.safety_checker and settings.local_worker:
        safety = load_safety_checker(settings.safety_checker, device=engine.device)
    broker = make_broker(settings)
    store = build_store(settings)
    keys = open_key_store(settings.database, settings.redis_url)  # with Redis: shared by every API node
    outbox = Outbox(settings.database, schedule=webhook_schedule)
    if hasattr(broker, "record_webhook"):
        outbox.mirror = lambda d: broker.record_webhook(d.job_id, d.record())  # every node shows it
    if worker is None and not settings.local_worker:
        from kiln.queue.redis_sync import RedisSyncChannel
        from kiln.worker.remote import RemoteWorkers

        # jobs and sync requests run on `kiln worker` processes
        worker = RemoteWorkers(RedisSyncChannel(settings.redis_url, lease_s=settings.lease_s), store,
                               wait_s=settings.sync_wait_s, retry_after=settings.retry_after_s)
    if worker is None:
        worker = Worker(engine, broker, store, preload=(catalog.default_model,), warmup=settings.warmup,
                        worker_id=f"{socket.gethostname()}:{os.getpid()}" if settings.redis_url else "local",
                        safety=safety, safety_default=settings.safety_checker_default)
    loras = LoraStore(settings.loras_dir, max_bytes=settings.lora_cache_bytes)
    # with Redis a job may run on any node's worker or a kiln worker elsewhere: adapters go through the
    # shared asset store too (kiln.loras.shared)
    share = SharedLoras(loras, store) if settings.redis_url else None
    if hasattr(worker, "loras"):
        worker.loras = share or loras  # the worker's engine loads the adapters the API side cached
    services = Services(
        settings=settings, catalog=catalog, broker=broker, store=store, keys=keys, worker=worker,
        validate=engine.plan, offers=engine.offers, outbox=outbox, loras=loras, lora_share=share,
        limiter=open_limiter("requests", settings.redis_url), upload_limiter=open_limiter("uploads", settings.redis_url),
        task_slots=open_slots("tasks", settings.redis_url),
    )

    def secret_for(key_id: str) -> str | None:
        # the job was accepted under this key: its webhook is signed even if the key is revoked since
        record = keys.get(key_id) if key_id else None
        return record.webhook_secret if record else None

    dispatcher = Dispatcher(outbox, secret_for=secret_for, check_url=address_check(services.fetch_policy))
    watch = FinishedWatch(services, node_name(settings)) if hasattr(broker, "claim_notice") else None
    listener = None
    if settings.redis_url:
        from kiln.queue.changes import RedisChangeListener

        listener = RedisChangeListener(settings.redis_url, services.changes)

    def on_terminal(job) -> None:
        services.metrics.observe_job(job)
        if watch is not None:
            watch.notify(job)  # sent by one API node, whichever worker ran it
        else:
            notify_terminal(services, job)

    worker.on_terminal = on_terminal
    broker.on_lost = on_terminal  # jobs failed as worker_lost by recovery or a takeover
    def inputs_in_use() -> list[str]:
        return [
            name
            for payload in broker.active_payloads()
            for key, name in payload.get("request", {}).items()
            if key.endswith("_asset")
        ]

    janitor = Janitor(store, upload_ttl_s=settings.upload_ttl_s, in_use=inputs_in_use)
    return Runtime(services, worker, dispatcher, janitor, watch, listener)


def build_store(settings: Settings) -> AssetStore:
    """The asset store the settings name: the S3-compatible bucket ``s3_bucket`` if set, else the folder
    ``data_dir/assets``; either behind write-behind, so sync outputs land after the response.

    An S3 bucket is checked first (HEAD bucket): one that cannot be reached stops start-up with
    :class:`~kiln.errors.StorageUnavailable` naming the endpoint, the bucket and the reason.
    """
    if not settings.s3_bucket:
        return WriteBehindStore(LocalAssetStore(settings.assets_dir))
    from kiln.storage.s3 import S3AssetStore  # boto3 is imported only by servers that use it

    secret = settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None
    inner = S3AssetStore(
        settings.s3_bucket, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
        access_key=settings.s3_access_key, secret_key=secret, prefix=settings.s3_prefix,
    )
    try:
        inner.check()
    except BaseException:
        inner.close()
        raise
    log.info("assets in %s", inner.where)
    return WriteBehindStore(inner)


def make_broker(settings: Settings) -> Broker:
    """The embedded SQLite broker, or the Redis one when ``redis_url`` is set."""
    if settings.redis_url:
        from kiln.queue.redis import RedisBroker

        broker = RedisBroker(settings.redis_url, aging_seconds=settings.aging_s, lease_s=settings.lease_s,
                             max_attempts=settings.job_max_attempts)
        try:
            broker.check()  # a wrong URL stops start-up, not the first request
        except RuntimeError as exc:
            raise SettingsError(f"redis_url (Redis at {broker.where}): {exc}") from exc
        return broker
    return SqliteBroker(settings.database, aging_seconds=settings.aging_s, max_attempts=settings.job_max_attempts)


def build_app(settings: Settings, *, engine: Engine | None = None) -> FastAPI:
    runtime = build_runtime(settings, engine=engine)
    return create_app(runtime.services, on_start=runtime.start, on_stop=runtime.stop)
