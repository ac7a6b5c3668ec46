"""API keys, credits and rate limits in Redis: the embedded store's contract, and several API nodes
(several stores and limiters on one server) agreeing on every key, balance, revocation and window."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import redis
from api_helpers import StalledWorker, running_server

from kiln.cli.main import main
from kiln.keys import KeyStore, RateLimiter, TaskSlots
from kiln.keys.redis_ratelimit import RedisRateLimiter
from kiln.keys.redis_slots import RedisTaskSlots
from kiln.keys.redis_store import RedisKeyStore


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_store(redis_url, tmp_path):
    """Stores of one kind; Redis ones on one server, SQLite ones on one file (two API nodes either way)."""
    made = []

    def make(kind: str, clock=None):
        kwargs = {} if clock is None else {"clock": clock}
        made.append(RedisKeyStore(redis_url, **kwargs) if kind == "redis" else KeyStore(tmp_path / "k.db", **kwargs))
        return made[-1]

    yield make
    for store in made:
        store.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_key_store_contract(make_store, kind):
    clock = Clock()
    store = make_store(kind, clock)
    assert store.count() == 0 and store.list() == [] and store.get("k_missing") is None
    new = store.create("a", rate_per_min=7, credits=2, expires=5000.0)
    r = new.record
    assert new.secret.startswith("kiln_sk_") and r.id.startswith("k_") and r.hint == new.secret[:12]
    assert (r.name, r.rate_per_min, r.credits, r.expires, r.revoked, r.created) == ("a", 7, 2, 5000.0, None, 1000.0)
    assert r.webhook_secret.startswith("whsec_")
    assert store.lookup(new.secret) == r == store.get(r.id)
    assert store.lookup(new.secret[:-1] + ("A" if new.secret[-1] != "A" else "B")) is None
    # credits: spent down to zero and no further; refunds give them back; unknown keys spend nothing
    assert store.spend(r.id) and store.spend(r.id) and not store.spend(r.id)
    assert store.get(r.id).credits == 0 and not store.spend("k_missing")
    store.refund(r.id, 3)
    assert not store.spend(r.id, 4) and store.spend(r.id, 3) and store.get(r.id).credits == 0
    store.refund("k_missing")
    # unlimited keys always spend and are never charged
    clock.now = 1001.0
    made = store.create("b")
    free = made.record
    assert free.credits is None and not free.metered and free.rate_per_min == 100 and free.expires is None
    assert all(store.spend(free.id) for _ in range(3))
    store.refund(free.id)
    assert store.get(free.id).credits is None
    # expiry and revocation
    assert r.active(4999.0) and not r.active(5000.0)
    assert store.revoke(free.id) and not store.revoke(free.id) and not store.revoke("k_missing")
    revoked = store.lookup(made.secret)  # still found, so the API can say it was revoked
    assert revoked.revoked == 1001.0 and not revoked.active(clock())
    assert [k.id for k in store.list()] == [r.id, free.id] and store.count() == 2


def test_secrets_are_stored_only_hashed(make_store, redis_url):
    new = make_store("redis").create("a", credits=1)
    client = redis.Redis.from_url(redis_url)
    try:
        dump = b"".join(client.dump(k) or b"" for k in client.keys("*")) + b"".join(client.keys("*"))
    finally:
        client.close()
    assert new.secret.encode() not in dump and new.secret[len("kiln_sk_"):].encode() not in dump


def test_two_nodes_share_keys_and_revocation(make_store):
    one, two = make_store("redis"), make_store("redis")
    new = one.create("shared", credits=5)
    assert two.lookup(new.secret) == new.record and two.count() == 1 and two.list() == [new.record]
    assert two.spend(new.record.id, 2) and one.get(new.record.id).credits == 3
    assert one.revoke(new.record.id)
    assert not two.lookup(new.secret).active(two.clock()) and not two.revoke(new.record.id)


def test_credits_spent_from_many_threads_never_overdraw(make_store):
    nodes = [make_store("redis") for _ in range(4)]
    key = nodes[0].create("metered", credits=100).record.id
    taken = [0] * 8
    start = threading.Barrier(len(taken))

    def spender(i: int) -> None:
        node = nodes[i % len(nodes)]
        start.wait()
        for _ in range(40):  # 320 attempts on 100 credits
            if node.spend(key):
                taken[i] += 1

    threads = [threading.Thread(target=spender, args=(i,)) for i in range(len(taken))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(taken) == 100 and nodes[1].get(key).credits == 0


def test_redis_down_answers_unavailable():
    from kiln.errors import QueueUnavailable

    store = RedisKeyStore("redis://127.0.0.1:1/0")
    limiter = RedisRateLimiter("redis://127.0.0.1:1/0")
    with pytest.raises(QueueUnavailable, match="key store .*127.0.0.1:1/0"):
        store.lookup("kiln_sk_" + "x" * 43)
    with pytest.raises(QueueUnavailable, match="rate limiter"):
        limiter.hit("k", 1)


# --- rate limits -------------------------------------------------------------------------------------


@pytest.fixture
def make_limiter(redis_url):
    made = []

    def make(kind: str, clock, prefix: str = "kiln:rate:test:"):
        made.append(RedisRateLimiter(redis_url, prefix=prefix, clock=clock) if kind == "redis" else RateLimiter(clock=clock))
        return made[-1]

    yield make
    for limiter in made:
        if hasattr(limiter, "close"):
            limiter.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_rate_window_slides(make_limiter, kind):
    """The same answers, state by state, from the in-process limiter and the Redis one."""
    clock = Clock(0.0)
    limiter = make_limiter(kind, clock)
    first = limiter.hit("k", 2)
    assert (first.allowed, first.limit, first.remaining, first.reset_s) == (True, 2, 1, 60)
    clock.now = 10.25
    assert limiter.hit("k", 2).remaining == 0
    clock.now = 30.0
    denied = limiter.hit("k", 2)
    assert (denied.allowed, denied.remaining, denied.reset_s) == (False, 0, 30)
    clock.now = 59.0
    assert not limiter.hit("k", 2).allowed and limiter.hit("other", 2).allowed
    clock.now = 60.0  # the first hit is exactly a minute old: out of the window
    state = limiter.hit("k", 2)
    assert (state.allowed, state.remaining, state.reset_s) == (True, 0, 11)
    clock.now = 70.0
    assert limiter.hit("k", 2).reset_s == 1 and not limiter.hit("k", 2).allowed  # the 10.25 hit has a quarter of a second left
    clock.now = 70.5
    assert limiter.hit("k", 2).allowed
    zero = limiter.hit("nobody", 0)
    assert (zero.allowed, zero.remaining, zero.reset_s) == (False, 0, 1)


def test_rate_limit_shared_by_api_nodes(make_limiter):
    """Two nodes, many threads: exactly ``limit`` hits allowed in the window, in total."""
    clock = Clock(0.0)
    nodes = [make_limiter("redis", clock) for _ in range(2)]
    allowed = []
    start = threading.Barrier(6)

    def caller(i: int) -> None:
        start.wait()
        allowed.extend(nodes[i % 2].hit("k", 25).allowed for _ in range(10))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 25 and len(allowed) == 60
    clock.now = 60.0
    assert nodes[1].hit("k", 25).allowed


def test_limiters_with_other_prefixes_count_apart(make_limiter):
    clock = Clock(0.0)
    requests, uploads = make_limiter("redis", clock, "kiln:rate:requests:"), make_limiter("redis", clock, "kiln:rate:uploads:")
    assert requests.hit("k", 1).allowed and not requests.hit("k", 1).allowed and uploads.hit("k", 1).allowed


def test_rate_buckets_expire_in_redis(make_limiter, redis_url):
    make_limiter("redis", None).hit("k", 5)  # the Redis server's clock
    client = redis.Redis.from_url(redis_url)
    try:
        assert 0 < client.pttl("kiln:rate:test:k") <= 60_000
    finally:
        client.close()


# --- unfinished tasks per key ------------------------------------------------------------------------


@pytest.fixture
def make_slots(redis_url):
    made = []

    def make(kind: str, **kwargs):
        made.append(RedisTaskSlots(redis_url, **kwargs) if kind == "redis" else TaskSlots())
        return made[-1]

    yield make
    for slots in made:
        if hasattr(slots, "close"):
            slots.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_task_slots(make_slots, kind):
    slots, done = make_slots(kind), set()

    def still_open(job_id: str) -> bool:
        return job_id not in done

    first = slots.take("k", 2, still_open)
    slots.fill("k", first, "j1")
    second = slots.take("k", 2, still_open)
    assert second is not None and slots.take("k", 2, still_open) is None  # a ticket holds its slot
    assert slots.take("other", 2, still_open) is not None
    slots.give_back("k", second)  # its job was never queued
    slots.fill("k", slots.take("k", 2, still_open), "j2")
    assert slots.take("k", 2, still_open) is None
    done.add("j1")
    assert slots.take("k", 2, still_open) is not None


def test_task_slots_shared_by_nodes_under_contention(make_slots):
    nodes_ = [make_slots("redis") for _ in range(2)]
    tickets = []
    start = threading.Barrier(6)

    def caller(i: int) -> None:
        start.wait()
        tickets.extend(nodes_[i % 2].take("k", 5, lambda _: True) for _ in range(5))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([t for t in tickets if t is not None]) == 5


def test_a_ticket_never_filled_lapses(make_slots):
    """A node that died between taking a slot and queuing its job does not hold the slot for ever."""
    slots = make_slots("redis", ticket_s=0.0)  # every ticket has already lapsed at the next take
    assert slots.take("k", 1, lambda _: True) is not None and slots.take("k", 1, lambda _: True) is not None


# --- through the API and the command line ------------------------------------------------------------

PROMPT = {"prompt": "a red circle on a blue background"}
QUEUE = {**PROMPT, "modality": "image", "family": "flux", "model": "dev", "task": "t2i", "format": "toy-64"}


@contextmanager
def nodes(tmp_path, engine, redis_url, **settings):
    """Two API nodes on one Redis, each with its own data directory (nothing shared but Redis)."""
    with (running_server(tmp_path / "a", engine, worker=StalledWorker(), redis_url=redis_url, **settings) as a,
          running_server(tmp_path / "b", engine, worker=StalledWorker(), redis_url=redis_url, **settings) as b):
        yield a, b


@pytest.fixture
def two_nodes(tmp_path, engine, redis_url):
    with nodes(tmp_path, engine, redis_url, wavespeed_rate_per_min=3) as both:
        yield both


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_a_key_made_on_one_node_works_on_the_other(two_nodes):
    a, b = two_nodes
    assert b.client.get("/models", headers=a.auth).status_code == 200
    limited = a.services.keys.create("limited", rate_per_min=3).secret
    codes = [node.client.get("/models", headers=bearer(limited)) for node in (a, b, a, b)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining"] for r in codes] == ["2", "1", "0", "0"]
    assert codes[-1].json()["error"] == "rate_limit_exceeded" and int(codes[-1].headers["retry-after"]) >= 1


def test_credits_and_revocation_across_nodes(two_nodes):
    a, b = two_nodes
    made = b.services.keys.create("one credit", credits=1)
    assert a.client.post("/queue", json=QUEUE, headers=bearer(made.secret)).status_code == 202
    r = b.client.post("/queue", json=QUEUE, headers=bearer(made.secret))
    assert (r.status_code, r.json()["error"]) == (402, "insufficient_credits")
    assert a.services.keys.revoke(made.record.id)
    r = b.client.get("/models", headers=bearer(made.secret))
    assert (r.status_code, r.json()["error"]) == (401, "token_expired")


def test_wavespeed_rate_is_shared_by_nodes(two_nodes):
    a, b = two_nodes
    body = {**PROMPT, "size": "512*512", "num_inference_steps": 4}
    codes = [node.client.post("/api/v3/kiln/flux-mini", json=body, headers=a.auth).status_code
             for node in (a, b, a, b)]
    assert codes == [200, 200, 200, 429]


def test_wavespeed_unfinished_tasks_are_counted_across_nodes(tmp_path, engine, redis_url):
    body = {**PROMPT, "size": "512*512", "num_inference_steps": 4}
    with nodes(tmp_path, engine, redis_url, wavespeed_max_concurrent=2) as (a, b):
        ids = [node.client.post("/api/v3/kiln/flux-mini", json=body, headers=a.auth).json()["data"]["id"]
               for node in (a, b)]
        r = b.client.post("/api/v3/kiln/flux-mini", json=body, headers=a.auth)
        assert r.status_code == 429 and "unfinished" in r.json()["message"]
        assert a.client.post("/api/v3/kiln/flux-mini", json=body, headers=a.auth).status_code == 429
        b.services.broker.cancel(ids[0])  # finished on any node frees the slot on every node
        assert a.client.post("/api/v3/kiln/flux-mini", json=body, headers=a.auth).status_code == 200
        assert b.client.post("/api/v3/kiln/flux-mini", json=body, headers=a.auth).status_code == 429


def test_a_task_refused_for_credits_gives_its_slot_back(tmp_path, engine, redis_url):
    body = {**PROMPT, "size": "512*512", "num_inference_steps": 4}
    with nodes(tmp_path, engine, redis_url, wavespeed_max_concurrent=1) as (a, b):
        broke = a.services.keys.create("broke", credits=0)
        r = a.client.post("/api/v3/kiln/flux-mini", json=body, headers=bearer(broke.secret))
        assert r.status_code == 402
        b.services.keys.refund(broke.record.id)
        assert b.client.post("/api/v3/kiln/flux-mini", json=body, headers=bearer(broke.secret)).status_code == 200


def test_keys_command_with_redis(tmp_path, engine, redis_url, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default data directory would be made
    assert main(["keys", "create", "--name", "ci", "--rate", "5", "--credits", "10", "--redis", redis_url]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    secret, key_id = out[-1], out[0].split()[1]
    assert main(["keys", "list", "--redis", redis_url]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and secret not in listing and "5/min" in listing and "credits 10" in listing
    with running_server(tmp_path, engine, worker=StalledWorker(), redis_url=redis_url) as node:
        assert node.client.get("/models", headers=bearer(secret)).status_code == 200
        assert main(["keys", "revoke", key_id, "--redis", redis_url]) == 0
        assert node.client.get("/models", headers=bearer(secret)).status_code == 401
    assert main(["keys", "revoke", key_id, "--redis", redis_url]) == 2
    assert not (tmp_path / "kiln-data").exists()


def test_serve_makes_the_first_key_in_redis_once(tmp_path, redis_url, capsys, monkeypatch):
    """`kiln serve --redis` on a fresh Redis makes one key there (a second node finds it and makes none)."""
    import uvicorn

    import kiln.cli.serve
    import kiln.server

    monkeypatch.setattr(kiln.cli.serve, "_build_default_toy", lambda settings: None)
    monkeypatch.setattr(kiln.server, "build_app", lambda settings: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)
    for node in ("a", "b"):
        assert main(["serve", "--redis", redis_url, "--data-dir", str(tmp_path / node)]) == 0
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kiln_sk_")]
    store = RedisKeyStore(redis_url)
    try:
        assert len(printed) == 1 and store.count() == 1 and store.lookup(printed[0]).name == "first key"
    finally:
        store.close()
