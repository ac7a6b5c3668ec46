"""``kiln worker``: a GPU machine's process. It claims queued jobs from Redis and runs them, and takes
API nodes' sync requests when idle; no API.

API nodes (``kiln serve --redis URL``, with or without ``--no-worker``) take the requests; this
process needs the same Redis and the same asset storage (S3, or on one machine the API node's data
directory), and answers ``/healthz``, ``/readyz`` and ``/metrics`` on its own port.
"""

from __future__ import annotations

import os
import socket
import sys

from kiln.settings import load_settings

NO_REDIS = ("kiln worker needs the Redis the API nodes queue jobs in: pass --redis redis://HOST:6379/0 "
            "(or set KILN_REDIS_URL, or redis_url in the settings file); a plain `kiln serve` runs its own worker")


def add_parser(sub) -> None:
    from kiln.cli.serve import add_data_dir

    p = sub.add_parser("worker", help="run a GPU worker that takes queued jobs from Redis (no API)")
    p.add_argument("--redis", metavar="URL", help="the API nodes' Redis, e.g. redis://10.0.0.1:6379/0 (KILN_REDIS_URL)")
    add_data_dir(p)
    p.add_argument("--catalog", dest="worker_catalog", metavar="FILE", help="model catalog TOML (as kiln --catalog)")
    p.add_argument("--host", help="address of /healthz, /readyz and /metrics (default 127.0.0.1; KILN_HOST)")
    p.add_argument("--port", type=int, help="their port (default 8081, 0: none; KILN_WORKER_PORT)")
    p.add_argument("--grace", type=float, metavar="SECONDS",
                   help="on SIGTERM, time the job in hand may take to finish before it is handed back "
                        "(default 30; KILN_SHUTDOWN_GRACE_S)")
    p.add_argument("--config", help="settings file (TOML; KILN_CONFIG)")
    p.set_defaults(run=run)


def run(args) -> int:
    from kiln.catalog import load_catalog
    from kiln.cli.serve import _build_default_toy
    from kiln.engine import Engine
    from kiln.engine.safety import load_safety_checker
    from kiln.loras import LoraStore
    from kiln.loras.shared import SharedLoras
    from kiln.queue.redis_sync import RedisSyncChannel
    from kiln.server import build_store, make_broker
    from kiln.worker import Worker
    from kiln.worker.process import WorkerProcess
    from kiln.worker.remote import RemoteSync

    settings = load_settings(
        {
            "redis_url": args.redis,
            "data_dir": args.data_dir,
            "catalog": args.worker_catalog or args.catalog,
            "host": args.host,
            "worker_port": args.port,
            "shutdown_grace_s": args.grace,
        },
        config_file=args.config,
    )
    if not settings.redis_url:
        print(f"error: {NO_REDIS}", file=sys.stderr)
        return 2
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _build_default_toy(settings)
    catalog = load_catalog(settings.catalog)
    engine = Engine(catalog, optimize=settings.optimize, compile_cache_dir=settings.compile_cache)
    safety = None
    if settings.safety_checker:  # before anything connects: a bad classifier stops start-up
        safety = load_safety_checker(settings.safety_checker, device=engine.device)
    broker = make_broker(settings)
    store = build_store(settings)
    worker = Worker(engine, broker, store, preload=(catalog.default_model,), warmup=settings.warmup,
                    worker_id=f"{socket.gethostname()}:{os.getpid()}", safety=safety,
                    safety_default=settings.safety_checker_default)
    # when idle, it takes the sync requests API nodes offer (kiln.worker.remote)
    worker.remote = RemoteSync(RedisSyncChannel(settings.redis_url, lease_s=settings.lease_s))
    # LoRAs are fetched by API nodes, which publish them in the shared asset store: copied from there
    # into this worker's own cache when a job needs one it lacks
    worker.loras = SharedLoras(LoraStore(settings.loras_dir, max_bytes=settings.lora_cache_bytes), store)
    process = WorkerProcess(worker, host=settings.host, port=settings.worker_port or None,
                            grace_s=settings.shutdown_grace_s)
    where = f", health on http://{settings.host}:{process.health.port}" if process.health else ""
    print(f"kiln worker {worker.worker_id}: jobs from Redis at {broker.where}{where}", file=sys.stderr, flush=True)
    return process.run()
