"""``kiln serve``: the render API in one process (API, in-process worker, SQLite, asset folder)."""

from __future__ import annotations

import sys

from kiln.settings import load_settings


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the render API server (embedded mode)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; KILN_HOST)")
    p.add_argument("--port", type=int, help="port (default 8080; KILN_PORT)")
    add_data_dir(p)
    p.add_argument("--catalog", dest="serve_catalog", metavar="FILE", help="model catalog TOML (as kiln --catalog)")
    p.add_argument("--public-url", help="base URL for Content-Location and job outputs (KILN_PUBLIC_URL)")
    p.add_argument("--config", help="settings file (TOML; KILN_CONFIG)")
    p.add_argument("--no-auth", action="store_true", help="serve without API keys (a private machine only)")
    p.add_argument("--redis", metavar="URL", help="queue jobs in Redis, e.g. redis://127.0.0.1:6379/0 (KILN_REDIS_URL)")
    p.add_argument("--no-worker", action="store_true",
                   help="run no worker here: jobs run on `kiln worker` processes (needs --redis; KILN_LOCAL_WORKER)")
    p.set_defaults(run=run)


def add_data_dir(p) -> None:
    p.add_argument("--data-dir", help="jobs, keys and assets (default KILN_DATA_DIR, else ./kiln-data)")


def run(args) -> int:
    import uvicorn

    from kiln.keys import open_key_store
    from kiln.server import build_app

    settings = load_settings(
        {
            "host": args.host,
            "port": args.port,
            "data_dir": args.data_dir,
            "catalog": args.serve_catalog or args.catalog,
            "public_url": args.public_url,
            "auth": False if args.no_auth else None,
            "redis_url": args.redis,
            "local_worker": False if args.no_worker else None,
        },
        config_file=args.config,
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.auth:
        keys = open_key_store(settings.database, settings.redis_url)
        if keys.count() == 0:
            new = keys.create("first key", rate_per_min=settings.default_rate_per_min)
            print("No API key existed, so one was created. It is shown once; keep it:", file=sys.stderr)
            print(new.secret, file=sys.stderr)
        keys.close()
    _build_default_toy(settings)
    app = build_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=30)
    return 0


def _build_default_toy(settings) -> None:
    """The default model is a toy until Kiln ships a trained one: build it before serving."""
    from kiln.catalog import load_catalog
    from kiln.engine import weights

    catalog = load_catalog(settings.catalog)
    spec = catalog.models[catalog.default_model]
    if spec.toy and weights.locate(spec) is None:
        print(f"{spec.key}: building the toy checkpoint (random weights) ...", file=sys.stderr)
        weights.pull(spec)
