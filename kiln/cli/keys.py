"""``kiln keys create|list|revoke``: manage API keys in the server's data directory, or in Redis with
``--redis URL`` (``KILN_REDIS_URL``), where every API node of a scale-out deployment reads them."""

from __future__ import annotations

import time

from kiln.cli.serve import add_data_dir
from kiln.errors import InvalidParameters
from kiln.settings import load_settings


def add_parser(sub) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys")
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys.add_parser("create", help="make a key; it is printed once, alone on the last line")
    create.add_argument("--name", default="", help="a label for the key")
    create.add_argument("--rate", type=int, help="requests per minute (default: the server's default, 100)")
    create.add_argument("--credits", type=int, help="a credit balance (one per generation); default unlimited")
    create.add_argument("--expires-days", type=float, help="the key stops working after this many days")
    _add_where(create)
    create.set_defaults(run=run_create)
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    _add_where(listing)
    listing.set_defaults(run=run_list)
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    _add_where(revoke)
    revoke.set_defaults(run=run_revoke)


def _add_where(p) -> None:
    add_data_dir(p)
    p.add_argument("--redis", metavar="URL", help="the keys of API nodes that use this Redis (KILN_REDIS_URL)")


def _store(args):
    from kiln.keys import open_key_store

    settings = load_settings({"data_dir": args.data_dir, "redis_url": args.redis})
    if not settings.redis_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return open_key_store(settings.database, settings.redis_url), settings


def run_create(args) -> int:
    store, settings = _store(args)
    if args.rate is not None and not 1 <= args.rate <= 10**9:
        raise InvalidParameters("--rate must be between 1 and 1000000000 requests per minute")
    if args.credits is not None and not 0 <= args.credits <= 2**62:
        raise InvalidParameters("--credits must be between 0 and 2**62")
    expires = time.time() + args.expires_days * 86400 if args.expires_days else None
    new = store.create(args.name, rate_per_min=args.rate or settings.default_rate_per_min, credits=args.credits,
                       expires=expires)
    credits = "unlimited" if new.record.credits is None else new.record.credits
    print(f"id {new.record.id}  rate {new.record.rate_per_min}/min  credits {credits}")
    print(f"webhook secret {new.record.webhook_secret}")
    print(new.secret)
    return 0


def run_list(args) -> int:
    store, _ = _store(args)
    now = time.time()
    for r in store.list():
        state = "active" if r.active(now) else ("revoked" if r.revoked else "expired")
        credits = "unlimited" if r.credits is None else str(r.credits)
        print(f"{r.id}  {r.hint}…  {state:8}  {r.rate_per_min}/min  credits {credits}  {r.name}")
    return 0


def run_revoke(args) -> int:
    store, _ = _store(args)
    if not store.revoke(args.key_id):
        raise InvalidParameters(f"no active key {args.key_id}")
    print(f"revoked {args.key_id}")
    return 0
