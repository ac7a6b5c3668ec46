"""kiln.storage: the content-addressed asset store contract, on the embedded LocalAssetStore."""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kiln.errors import AssetNotFound, InvalidAssetName, UnsupportedFormat, UserError
from kiln.storage import Asset, LocalAssetStore, asset_name, validate_name
from kiln.storage import local as local_module

WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 fake image bytes"
DIGEST = hashlib.sha256(WEBP).hexdigest()
NOW = datetime.now(UTC)


@pytest.fixture
def store(tmp_path) -> LocalAssetStore:
    return LocalAssetStore(tmp_path / "assets")


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def asset_dir(store: LocalAssetStore, asset: Asset) -> Path:
    return store.root / asset.kind / asset.name[:2]


def age(store: LocalAssetStore, asset: Asset, hours: float) -> None:
    path = asset_dir(store, asset) / asset.name
    ts = (NOW - timedelta(hours=hours)).timestamp()
    os.utime(path, (ts, ts))


# --- put / stat / read ----------------------------------------------------------------------------


def test_round_trip(store):
    asset = store.put(WEBP, "i", "image/webp")
    assert asset.name == f"{DIGEST}.webp"
    assert (asset.kind, asset.media_type, asset.size) == ("i", "image/webp", len(WEBP))
    assert asset.etag == f'"{DIGEST}"'
    assert asset.key == f"i/{DIGEST}.webp"
    assert asset.created_at.tzinfo is not None
    assert abs(asset.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert store.stat("i", asset.name) == asset
    assert store.read("i", asset.name) == WEBP
    # the documented layout: root/{kind}/{name[:2]}/{name}, readable by others
    path = store.root / "i" / DIGEST[:2] / asset.name
    assert files_under(store.root) == [path]
    assert path.stat().st_mode & 0o777 == 0o644


def test_put_is_idempotent_and_the_second_put_writes_nothing(store, monkeypatch):
    first = store.put(WEBP, "i", "image/webp")
    age(store, first, hours=2)

    def no_write(*args, **kwargs):
        raise AssertionError("an existing asset was written again")

    monkeypatch.setattr(local_module.tempfile, "mkstemp", no_write)
    monkeypatch.setattr(local_module.os, "replace", no_write)
    second = store.put(WEBP, "i", "image/webp")
    assert second.name == first.name
    assert second.created_at > NOW - timedelta(minutes=1)  # refreshed: retention counts from here
    assert store.stat("i", first.name) == second
    assert len(files_under(store.root)) == 1


def test_put_repairs_a_damaged_file(store):
    asset = store.put(WEBP, "u", "image/webp")
    (store.root / "u" / DIGEST[:2] / asset.name).write_bytes(WEBP[:5])
    store.put(WEBP, "u", "image/webp")
    assert store.read("u", asset.name) == WEBP


def test_same_bytes_same_name_in_every_kind_but_separate_assets(store):
    image = store.put(WEBP, "i", "image/webp")
    upload = store.put(WEBP, "u", "image/webp")
    assert image.name == upload.name == asset_name(WEBP, "image/webp")
    store.delete("u", upload.name)
    assert store.stat("u", upload.name) is None
    assert store.read("i", image.name) == WEBP


def test_different_bytes_or_media_types_give_different_names(store):
    a = store.put(b"one", "i", "image/png")
    b = store.put(b"two", "i", "image/png")
    c = store.put(b"one", "i", "image/jpeg")
    assert len({a.name, b.name, c.name}) == 3
    assert a.name.split(".")[0] == c.name.split(".")[0]  # the digest is of the bytes alone


@pytest.mark.parametrize(
    "kind, media_type, extension, canonical",
    [
        ("i", "image/webp", "webp", "image/webp"),
        ("i", "image/png", "png", "image/png"),
        ("i", "image/jpeg", "jpg", "image/jpeg"),
        ("v", "video/mp4", "mp4", "video/mp4"),
        ("u", "image/jpeg", "jpg", "image/jpeg"),
        ("u", " IMAGE/PNG; charset=binary", "png", "image/png"),
    ],
)
def test_media_type_gives_the_extension(store, kind, media_type, extension, canonical):
    asset = store.put(b"x", kind, media_type)
    assert asset.name.endswith("." + extension)
    assert asset.media_type == canonical
    assert validate_name(kind, asset.name) == canonical


@pytest.mark.parametrize(
    "kind, media_type",
    [
        ("i", "image/gif"),
        ("i", "image/jpg"),
        ("i", "text/html"),
        ("i", ""),
        ("i", None),
        ("i", "video/mp4"),  # a kind holds only its own media
        ("v", "image/webp"),
        ("u", "video/mp4"),
        ("v", "video/webm"),
    ],
)
def test_unknown_media_types_are_refused(store, kind, media_type):
    with pytest.raises(UnsupportedFormat) as caught:
        store.put(b"x", kind, media_type)
    assert caught.value.code == "unsupported_format"
    assert caught.value.details["allowed"]
    assert not store.root.exists()


def test_stat_and_read_of_a_missing_asset(store):
    name = f"{'0' * 64}.webp"
    assert store.stat("i", name) is None
    with pytest.raises(AssetNotFound) as caught:
        store.open_range("i", name)
    assert caught.value.code == "not_found"
    with pytest.raises(AssetNotFound):
        store.read("i", name)


# --- ranges ---------------------------------------------------------------------------------------


@pytest.fixture
def video(store):
    data = os.urandom(3 * local_module.CHUNK_SIZE + 123)
    return data, store.put(data, "v", "video/mp4")


@pytest.mark.parametrize(
    "start, end",
    [(0, None), (0, 1), (5, 6), (10, 10), (1000, 200_000), (0, 196_731), (65535, 65537), (196_000, None)],
)
def test_range_reads_are_slices(store, video, start, end):
    data, asset = video
    with store.open_range("v", asset.name, start, end) as body:
        assert body.asset == asset
        assert (body.start, body.end) == (start, len(data) if end is None else min(end, len(data)))
        chunks = list(body)
    assert b"".join(chunks) == data[start:end]
    assert body.length == len(data[start:end])
    assert all(0 < len(c) <= local_module.CHUNK_SIZE for c in chunks)


@pytest.mark.parametrize("start, end", [(0, 10**9), (10**9, None), (10**9, 10**9 + 5)])
def test_ranges_past_the_end_are_clamped(store, video, start, end):
    data, asset = video
    body = store.open_range("v", asset.name, start, end)
    assert body.asset.size == len(data)  # what an HTTP layer checks for 416 and Content-Range
    assert body.end == len(data) and body.start == min(start, len(data))
    assert body.read() == data[start:end]


@pytest.mark.parametrize(
    "start, end, error", [(-1, None, ValueError), (5, 4, ValueError), (0.5, None, TypeError)]
)
def test_invalid_ranges_are_a_callers_bug(store, video, start, end, error):
    with pytest.raises(error):
        store.open_range("v", video[1].name, start, end)


def test_an_open_range_outlives_a_delete_and_closes_early(store, video):
    data, asset = video
    body = store.open_range("v", asset.name, 10, None)
    store.delete("v", asset.name)  # the asset is gone for new readers; this one keeps its bytes
    assert next(iter(body)) == data[10 : 10 + local_module.CHUNK_SIZE]
    body.close()
    assert list(body) == []


# --- delete / expire ------------------------------------------------------------------------------


def test_delete(store):
    asset = store.put(WEBP, "u", "image/webp")
    store.delete("u", asset.name)
    assert store.stat("u", asset.name) is None
    assert files_under(store.root) == []
    store.delete("u", asset.name)  # deleting what is not stored is fine


def test_expire_deletes_by_age(store):
    old = [store.put(bytes([n]), "u", "image/png") for n in range(3)]
    fresh = store.put(b"fresh", "u", "image/png")
    kept_image = store.put(b"image", "i", "image/png")
    for asset in old:
        age(store, asset, hours=25)
    age(store, kept_image, hours=25)  # another kind is another namespace
    assert store.expire("u", NOW - timedelta(hours=24)) == 3
    assert all(store.stat("u", a.name) is None for a in old)
    assert store.stat("u", fresh.name) == fresh
    assert store.stat("i", kept_image.name) is not None
    assert store.expire("u", NOW - timedelta(hours=24)) == 0
    assert store.expire("v", NOW) == 0  # a kind never written


def test_expire_needs_an_aware_datetime(store):
    with pytest.raises(ValueError):
        store.expire("u", datetime.now())


def test_expire_keeps_an_asset_put_again_during_the_sweep(store, monkeypatch):
    asset = store.put(WEBP, "u", "image/webp")
    age(store, asset, hours=25)
    real_rename = os.rename

    def put_then_rename(src, dst):
        store.put(WEBP, "u", "image/webp")  # lands after the sweep read the old time
        real_rename(src, dst)

    monkeypatch.setattr(local_module.os, "rename", put_then_rename)
    assert store.expire("u", NOW - timedelta(hours=24)) == 0
    assert store.read("u", asset.name) == WEBP
    assert [p.name for p in files_under(store.root)] == [asset.name]


def test_put_rewrites_an_asset_that_a_sweep_took_meanwhile(store, monkeypatch):
    asset = store.put(WEBP, "u", "image/webp")
    real_utime = os.utime

    def sweep_then_utime(path, *args, **kwargs):
        os.unlink(path)
        real_utime(path, *args, **kwargs)

    monkeypatch.setattr(local_module.os, "utime", sweep_then_utime)
    store.put(WEBP, "u", "image/webp")
    assert store.read("u", asset.name) == WEBP


# --- atomicity and concurrency --------------------------------------------------------------------


def test_concurrent_puts_of_the_same_bytes(store):
    data = os.urandom(256 * 1024)
    barrier = threading.Barrier(8)
    results: list[Asset] = []

    def put():
        barrier.wait()
        results.append(store.put(data, "v", "video/mp4"))

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len({a.name for a in results}) == 1
    assert [p.name for p in files_under(store.root)] == [results[0].name]  # no temp files left
    assert store.read("v", results[0].name) == data


def test_a_failed_write_leaves_nothing(store, monkeypatch):
    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local_module.os, "replace", crash)
    with pytest.raises(OSError):
        store.put(WEBP, "i", "image/webp")
    assert store.stat("i", f"{DIGEST}.webp") is None
    assert files_under(store.root) == []


def test_a_crash_mid_write_leaves_only_a_hidden_temp_file_that_expire_sweeps(store, monkeypatch):
    def crash(*args):
        raise OSError(5, "I/O error")

    # The process dies between write and rename: the cleanup never runs either.
    with monkeypatch.context() as m:
        m.setattr(local_module.os, "replace", crash)
        m.setattr(local_module.os, "unlink", crash)
        with pytest.raises(OSError):
            store.put(WEBP, "i", "image/webp")
    [leftover] = files_under(store.root)
    assert leftover.name.startswith(".") and leftover.name != f"{DIGEST}.webp"
    assert store.stat("i", f"{DIGEST}.webp") is None

    asset = store.put(WEBP, "i", "image/webp")  # a retry succeeds beside it
    assert store.read("i", asset.name) == WEBP
    assert store.expire("i", NOW - timedelta(days=1)) == 0
    assert leftover.exists()  # too young to be sure no put is still writing it
    ts = (NOW - timedelta(days=2)).timestamp()
    os.utime(leftover, (ts, ts))
    assert store.expire("i", NOW - timedelta(days=1)) == 0  # temp files are not counted as assets
    assert [p.name for p in files_under(store.root)] == [asset.name]


# --- hostile names --------------------------------------------------------------------------------

HEX = "a" * 64
HOSTILE_NAMES = [
    "../x.webp",
    f"../{HEX}.webp",
    f"..%2f{HEX}.webp",
    f"{HEX[:2]}/{HEX}.webp",
    "/etc/passwd",
    f"/{HEX}.webp",
    "a/b.webp",
    f"{HEX}.webp/..",
    f"{HEX}\\..\\x.webp",
    "A" * 64 + ".webp",
    f"{HEX}.WEBP",
    f"{HEX}.webp\x00.png",
    f"{HEX}\x00.webp",
    f"{HEX}.webp\n",
    f"\n{HEX}.webp",
    f" {HEX}.webp",
    f"{HEX}.jpeg",
    f"{HEX}.gif",
    f"{HEX}.webp.webp",
    f"{HEX}",
    f"{HEX}.",
    ".webp",
    "",
    ".",
    "..",
    "a" * 63 + ".webp",
    "a" * 65 + ".webp",
    "a" * 32 + ".webp",  # a truncated digest is not a name this store writes
    "a" * 10_000 + ".webp",
    "\u0430" * 64 + ".webp",  # Cyrillic а
    "\uff41" * 64 + ".webp",  # fullwidth ａ
    "\u0661" * 64 + ".webp",  # Arabic-Indic digit one (a \d would take it)
    f"{HEX}\uff0ewebp",  # fullwidth full stop
    f"{HEX}\u2024webp",  # one dot leader
    f"{HEX}.we\u200bbp",  # zero-width space
    b"a" * 64 + b".webp",
    None,
    42,
]


@pytest.fixture
def untouchable(store, monkeypatch) -> LocalAssetStore:
    """A store whose I/O hooks fail the test if a call ever reaches them."""
    for hook in ("_put", "_stat", "_open_range", "_delete", "_expire"):
        monkeypatch.setattr(store, hook, lambda *a, hook=hook: pytest.fail(f"{hook} reached with {a!r}"))
    return store


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
@pytest.mark.parametrize("operation", ["stat", "open_range", "read", "delete"])
def test_hostile_names_are_refused_before_any_io(untouchable, name, operation):
    with pytest.raises(InvalidAssetName) as caught:
        getattr(untouchable, operation)("i", name)
    assert isinstance(caught.value, AssetNotFound) and isinstance(caught.value, UserError)
    assert caught.value.code == "not_found"
    assert len(caught.value.message) < 200  # a huge name is not echoed back
    assert not untouchable.root.exists()


@pytest.mark.parametrize("kind", ["", "I", "x", "../i", "i/..", "/i", "i\x00", "\u0456", None, b"i"])
def test_hostile_kinds_are_refused_before_any_io(untouchable, kind):
    for call in (
        lambda: untouchable.stat(kind, f"{HEX}.webp"),
        lambda: untouchable.put(WEBP, kind, "image/webp"),
        lambda: untouchable.expire(kind, NOW),
    ):
        with pytest.raises(InvalidAssetName):
            call()
    assert not untouchable.root.exists()


@pytest.mark.parametrize("kind, name", [("v", f"{HEX}.webp"), ("i", f"{HEX}.mp4"), ("u", f"{HEX}.mp4")])
def test_a_name_from_another_kind_is_refused(untouchable, kind, name):
    with pytest.raises(InvalidAssetName):
        untouchable.stat(kind, name)


def test_valid_names_pass(store):
    for kind, ext in [("i", "webp"), ("i", "png"), ("i", "jpg"), ("v", "mp4"), ("u", "jpg")]:
        assert store.stat(kind, f"{HEX}.{ext}") is None


def test_files_that_are_not_assets_are_left_alone_by_expire(store):
    asset = store.put(WEBP, "u", "image/webp")
    stray = [
        store.root / "u" / "stray.webp",
        store.root / "u" / "zz" / f"{HEX}.webp",
        store.root / "u" / "aa" / f"{'b' * 64}.webp",  # a name in the wrong fan-out folder
        asset_dir(store, asset) / "README",
    ]
    for path in stray:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (0, 0))
    age(store, asset, hours=25)
    assert store.expire("u", NOW) == 1
    assert all(p.exists() for p in stray)
