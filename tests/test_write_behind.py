"""WriteBehindStore: the asset is readable at once, lands on the inner store later, and nothing is lost
to a failing disk until every retry is spent."""

from __future__ import annotations

import logging
import threading

import pytest

from kiln.errors import AssetNotFound
from kiln.storage import LocalAssetStore, WriteBehindStore

WAIT_S = 10.0


class GatedStore(LocalAssetStore):
    """A folder store whose writes wait for ``gate`` and can be made to fail ``failures`` times."""

    def __init__(self, root, *, failures: int = 0) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.failures = failures
        self.attempts = 0
        self.writing = threading.Event()

    def _put(self, kind, name, data):
        self.attempts += 1
        self.writing.set()
        assert self.gate.wait(WAIT_S), "test never opened the gate"
        if self.failures > 0:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        return super()._put(kind, name, data)


@pytest.fixture
def inner(tmp_path):
    return GatedStore(tmp_path / "assets")


@pytest.fixture
def store(inner):
    s = WriteBehindStore(inner, retry_delays_s=(0.0, 0.0))
    yield s
    inner.gate.set()
    s.close(timeout=WAIT_S)


DATA = b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(range(256)) * 40


def test_put_soon_answers_before_the_write_and_serves_from_memory(store, inner):
    asset = store.put_soon(DATA, "i", "image/webp")
    assert inner.writing.wait(WAIT_S)
    assert inner._stat("i", asset.name) is None  # not on disk yet
    assert store.pending() == 1
    assert store.stat("i", asset.name) == asset
    assert store.read("i", asset.name) == DATA
    with store.open_range("i", asset.name, 10, 20) as part:
        assert (part.start, part.end, part.read()) == (10, 20, DATA[10:20])
    assert store.open_range("i", asset.name, 10**6).read() == b""

    inner.gate.set()
    assert store.flush(WAIT_S)
    assert store.pending() == 0
    assert inner.read("i", asset.name) == DATA
    assert store.read("i", asset.name) == DATA  # now from the inner store


def test_the_name_is_the_same_as_a_durable_put(store, inner, tmp_path):
    inner.gate.set()
    soon = store.put_soon(DATA, "i", "image/webp")
    assert soon.name == LocalAssetStore(tmp_path / "other").put(DATA, "i", "image/webp").name
    assert (soon.etag, soon.size, soon.media_type) == (f'"{soon.name[:64]}"', len(DATA), "image/webp")


def test_a_durable_put_waits_for_the_write(store, inner):
    inner.gate.set()
    asset = store.put(DATA, "i", "image/webp")
    assert store.pending() == 0
    assert inner.read("i", asset.name) == DATA


def test_a_failing_write_is_retried_and_stays_readable_meanwhile(tmp_path):
    inner = GatedStore(tmp_path, failures=2)
    store = WriteBehindStore(inner, retry_delays_s=(0.0, 0.0, 0.0))
    asset = store.put_soon(DATA, "i", "image/webp")
    assert store.read("i", asset.name) == DATA
    inner.gate.set()
    assert store.flush(WAIT_S)
    assert inner.attempts == 3
    assert inner.read("i", asset.name) == DATA
    assert store.dropped == 0
    store.close()


def test_a_write_that_fails_every_retry_is_logged_and_dropped(tmp_path, caplog):
    inner = GatedStore(tmp_path, failures=10)
    store = WriteBehindStore(inner, retry_delays_s=(0.0, 0.0))
    inner.gate.set()
    with caplog.at_level(logging.WARNING, logger="kiln.storage.write_behind"):
        asset = store.put_soon(DATA, "i", "image/webp")
        assert store.flush(WAIT_S)
    assert inner.attempts == 3
    assert store.dropped == 1
    assert store.stat("i", asset.name) is None
    assert any("gave up writing asset" in r.getMessage() for r in caplog.records)
    store.close()


def test_past_the_memory_bound_put_soon_writes_synchronously(tmp_path):
    inner = GatedStore(tmp_path)
    store = WriteBehindStore(inner, max_pending_bytes=len(DATA) + 10)
    first = store.put_soon(DATA, "i", "image/webp")  # queued; the writer blocks on the gate
    assert inner.writing.wait(WAIT_S)
    done = threading.Event()

    def second_put():
        store.put_soon(DATA + b"x", "i", "image/webp")
        done.set()

    threading.Thread(target=second_put, daemon=True).start()
    assert not done.wait(0.05)  # the second put is writing itself, behind the same gate
    inner.gate.set()
    assert done.wait(WAIT_S)
    assert store.flush(WAIT_S)
    assert inner.read("i", first.name) == DATA
    store.close()


def test_a_delete_while_pending_wins(store, inner):
    asset = store.put_soon(DATA, "i", "image/webp")
    assert inner.writing.wait(WAIT_S)
    store.delete("i", asset.name)
    assert store.stat("i", asset.name) is None
    with pytest.raises(AssetNotFound):
        store.read("i", asset.name)
    inner.gate.set()
    assert store.flush(WAIT_S)
    store.close(timeout=WAIT_S)
    assert inner.stat("i", asset.name) is None


def test_close_lands_every_pending_write_and_later_puts_are_synchronous(tmp_path):
    inner = GatedStore(tmp_path)
    store = WriteBehindStore(inner)
    names = [store.put_soon(DATA + bytes([n]), "i", "image/webp").name for n in range(5)]
    inner.gate.set()
    store.close(timeout=WAIT_S)
    assert [inner.read("i", n)[: len(DATA)] for n in names] == [DATA] * 5
    late = store.put_soon(b"late" + DATA, "i", "image/webp")
    assert inner.stat("i", late.name) is not None


def test_flush_times_out_while_a_write_hangs(store, inner):
    store.put_soon(DATA, "i", "image/webp")
    assert inner.writing.wait(WAIT_S)
    assert store.flush(0.01) is False
