"""Job change notices (kiln.queue.changes): the feed's contract, both brokers announcing every change,
Redis pub/sub reaching another node's feed (across a Redis restart), and SSE driven by them."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from kiln.queue import Priority, SqliteBroker
from kiln.queue.changes import ANY, ChangeFeed, RedisChangeListener


def test_a_notice_between_read_and_wait_is_not_missed():
    async def go():
        feed = ChangeFeed()
        with feed.subscribe("j_a") as sub:
            feed.changed("j_a")  # after the follower read the job, before it waits
            assert await sub.next(5.0) is True
            assert sub._event.is_set() is False  # taken: the next wait needs a new notice
            feed.changed("j_b")  # another job's notice does not wake this follower
            assert sub._event.is_set() is False
            feed.changed(ANY)
            assert await sub.next(5.0) is True
        assert feed.followers() == 0

    asyncio.run(go())


def test_notices_from_other_threads_wake_every_follower_of_the_job():
    async def go():
        feed = ChangeFeed()
        subs = [feed.subscribe("j_a") for _ in range(3)]
        threading.Thread(target=feed.changed, args=("j_a",)).start()
        assert all(await asyncio.gather(*(s.next(5.0) for s in subs)))
        for s in subs:
            s.close()
        assert feed.followers() == 0

    asyncio.run(go())


def test_a_follower_without_notices_times_out():
    async def go():
        with ChangeFeed().subscribe("j_a") as sub:
            assert await sub.next(0.01) is False

    asyncio.run(go())


def test_a_notice_to_a_closed_loop_is_dropped():
    feed = ChangeFeed()

    async def subscribe():
        return feed.subscribe("j_a")

    sub = asyncio.run(subscribe())  # its loop is closed now
    feed.changed("j_a")  # must not raise
    sub.close()


def heard(feed: ChangeFeed, job_id: str, action) -> bool:
    """Whether a notice for ``job_id`` arrives within 10 s of running ``action`` (in a thread)."""

    async def go():
        with feed.subscribe(job_id) as sub:
            await asyncio.to_thread(action)
            return await sub.next(10.0)

    return asyncio.run(go())


@pytest.fixture(params=["sqlite", "redis"])
def announced(request, tmp_path):
    """(broker, feed): the broker's changes reach the feed, directly or through Redis pub/sub."""
    feed = ChangeFeed()
    if request.param == "sqlite":
        broker = SqliteBroker(tmp_path / "jobs.db")
        broker.changes = feed
        yield broker, feed
    else:
        from kiln.queue.redis import RedisBroker

        url = request.getfixturevalue("redis_url")
        broker, listener = RedisBroker(url), RedisChangeListener(url, feed)
        listener.start()
        assert listener.subscribed.wait(10)
        yield broker, feed
        listener.stop()
    broker.close()


def test_every_change_is_announced(announced):
    broker, feed = announced
    first = broker.submit({"n": 1})[0]
    second = broker.submit({"n": 2})[0]
    assert heard(feed, second.id, lambda: broker.submit({"n": 3}, priority=Priority.HIGH))  # the order moved
    running = {}
    assert heard(feed, second.id, lambda: running.setdefault("job", broker.claim("w")))  # a claim moves the rest
    job = running["job"]
    assert heard(feed, job.id, lambda: broker.report_progress(job.id, 1, 4, lease=job.lease))
    assert heard(feed, job.id, lambda: broker.complete(job.id, "/i/x.webp", {}, lease=job.lease))
    assert heard(feed, first.id, lambda: broker.cancel(first.id))
    job = broker.claim("w")
    assert heard(feed, job.id, lambda: broker.requeue(job.id, lease=job.lease))
    job = broker.claim("w")
    assert heard(feed, job.id, lambda: broker.fail(job.id, "generation_failed", "no", lease=job.lease))


def test_a_listener_reconnects_after_redis_restarts_and_wakes_every_follower(durable_redis):
    from kiln.queue.redis import RedisBroker

    feed = ChangeFeed()
    listener = RedisChangeListener(durable_redis.url, feed)
    listener.start()
    try:
        assert listener.subscribed.wait(10)

        async def go():
            with feed.subscribe("j_x") as sub:
                await asyncio.to_thread(durable_redis.kill)
                durable_redis.start()
                # notices sent while it was away are lost: the reconnected listener wakes everyone
                assert await sub.next(15.0)

        asyncio.run(go())
        assert listener.subscribed.wait(10)
        broker = RedisBroker(durable_redis.url)
        job = broker.submit({"n": 1})[0]
        assert heard(feed, job.id, lambda: broker.cancel(job.id))
        broker.close()
    finally:
        listener.stop()


def test_sse_follows_on_notices_not_polls(tmp_path, engine, monkeypatch):
    """With the fallback poll pushed past the test's deadline, a job's whole stream still arrives:
    every event came from a notice."""
    from api_helpers import running_server
    from test_api import queue_body, read_events

    from kiln.api.routes import events

    monkeypatch.setattr(events, "POLL_S", 60.0)
    with running_server(tmp_path, engine) as server:
        job = server.client.post("/queue", json=queue_body(steps=15), headers=server.auth).json()
        started = time.monotonic()
        with server.client.stream("GET", f"/jobs/{job['id']}/events", headers=server.auth) as r:
            names = [name for _, name, _ in read_events(r)]
        assert names[-1] == "complete" and "started" in names
        assert time.monotonic() - started < 30.0
        assert server.services.changes.followers() == 0  # the stream let go of its subscription
