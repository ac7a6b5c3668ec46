"""kiln.storage.s3: the asset store contract on S3-compatible storage (a moto server in this process),
and the CDN serving from a bucket exactly as it serves from the folder."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from datetime import UTC, datetime, timedelta

import pytest

from api_helpers import StalledWorker, running_server
from helpers import png
from kiln.errors import AssetNotFound, InvalidAssetName, StorageUnavailable, UnsupportedFormat
from kiln.server import build_store
from kiln.settings import Settings
from kiln.storage import WriteBehindStore, asset_name
from kiln.storage import s3 as s3_module
from kiln.storage.s3 import S3AssetStore
from s3_fixtures import REGION
from test_storage import HOSTILE_NAMES

WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 fake image bytes"
DIGEST = hashlib.sha256(WEBP).hexdigest()
NOW = datetime.now(UTC)
SECOND = timedelta(seconds=1)  # S3 keeps LastModified to the second


@pytest.fixture
def store(bucket):
    s = S3AssetStore(bucket.name, **bucket.store_kwargs(prefix="kiln"))
    yield s
    s.close()


def age(bucket, asset, hours: float) -> None:
    bucket.set_last_modified(f"kiln/{asset.key}", NOW - timedelta(hours=hours))


def count_requests(store, operation: str) -> list[str]:
    """Every ``operation`` request the store's client sends from now on (one entry each)."""
    seen: list[str] = []
    store._client.meta.events.register(f"before-call.s3.{operation}", lambda **kw: seen.append(operation))
    return seen


# --- put / stat / read ----------------------------------------------------------------------------


def test_round_trip(store, bucket):
    sent = []
    store._client.meta.events.register("before-send.s3.PutObject", lambda request, **kw: sent.append(request))
    asset = store.put(WEBP, "i", "image/webp")
    # the server checks the bytes it got against the digest the name is made of
    [request] = sent
    checksum = request.headers["x-amz-checksum-sha256"]
    assert (checksum if isinstance(checksum, bytes) else checksum.encode()) == base64.b64encode(bytes.fromhex(DIGEST))
    assert asset.name == f"{DIGEST}.webp"
    assert (asset.kind, asset.media_type, asset.size, asset.etag) == ("i", "image/webp", len(WEBP), f'"{DIGEST}"')
    assert abs(asset.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    stat = store.stat("i", asset.name)
    assert (stat.name, stat.kind, stat.media_type, stat.size, stat.etag) == (
        asset.name, "i", "image/webp", len(WEBP), asset.etag)
    assert abs(stat.created_at - asset.created_at) <= SECOND and stat.created_at.tzinfo is not None
    assert store.read("i", asset.name) == WEBP
    # the documented layout: {prefix}{kind}/{name}, typed and cacheable for a CDN in front of the bucket
    assert bucket.keys() == [f"kiln/i/{asset.name}"]
    head = bucket.client.head_object(Bucket=bucket.name, Key=f"kiln/i/{asset.name}")
    assert head["ContentType"] == "image/webp" and head["CacheControl"] == "public, max-age=31536000, immutable"


def test_put_is_idempotent_and_the_second_put_uploads_nothing(store, bucket):
    first = store.put(WEBP, "u", "image/webp")
    age(bucket, first, hours=2)
    assert store.stat("u", first.name).created_at < NOW - timedelta(hours=1)
    uploads = count_requests(store, "PutObject")
    second = store.put(WEBP, "u", "image/webp")
    assert uploads == []
    assert second.name == first.name and second.size == first.size
    assert second.created_at > NOW - timedelta(minutes=1)  # refreshed: retention counts from here
    assert abs(store.stat("u", first.name).created_at - second.created_at) <= SECOND
    assert bucket.keys() == [f"kiln/u/{first.name}"]
    assert store.expire("u", NOW - timedelta(hours=1)) == 0


def test_put_repairs_a_damaged_object(store, bucket):
    asset = store.put(WEBP, "u", "image/webp")
    bucket.client.put_object(Bucket=bucket.name, Key=f"kiln/u/{asset.name}", Body=WEBP[:5])
    store.put(WEBP, "u", "image/webp")
    assert store.read("u", asset.name) == WEBP


def test_put_uploads_again_when_a_sweep_took_the_object_meanwhile(store, monkeypatch):
    asset = store.put(WEBP, "u", "image/webp")
    real_head = store._head

    def head_then_sweep(key):
        found = real_head(key)
        store.delete("u", asset.name)  # between the put's HEAD and its refreshing copy
        return found

    monkeypatch.setattr(store, "_head", head_then_sweep)
    store.put(WEBP, "u", "image/webp")
    monkeypatch.undo()
    assert store.read("u", asset.name) == WEBP


def test_same_bytes_same_name_in_every_kind_but_separate_assets(store):
    image = store.put(WEBP, "i", "image/webp")
    upload = store.put(WEBP, "u", "image/webp")
    assert image.name == upload.name == asset_name(WEBP, "image/webp")
    store.delete("u", upload.name)
    assert store.stat("u", upload.name) is None
    assert store.read("i", image.name) == WEBP


@pytest.mark.parametrize("kind, media_type", [("i", "image/gif"), ("v", "image/webp"), ("u", "video/mp4")])
def test_unknown_media_types_are_refused_before_any_request(store, bucket, kind, media_type):
    with pytest.raises(UnsupportedFormat):
        store.put(b"x", kind, media_type)
    assert bucket.keys() == []


def test_stat_read_and_delete_of_a_missing_asset(store):
    name = f"{'0' * 64}.webp"
    assert store.stat("i", name) is None
    for call in (lambda: store.open_range("i", name), lambda: store.read("i", name),
                 lambda: store.open_range("i", name, 5, 5), lambda: store.open_range("i", name, 10)):
        with pytest.raises(AssetNotFound) as caught:
            call()
        assert caught.value.code == "not_found" and "kiln/" not in caught.value.message
    store.delete("i", name)  # deleting what is not stored is fine


def test_concurrent_puts_of_the_same_bytes_share_one_client(store, bucket):
    data = os.urandom(256 * 1024)
    barrier = threading.Barrier(8)
    results = []

    def put():
        barrier.wait()
        results.append(store.put(data, "v", "video/mp4"))

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and len({a.name for a in results}) == 1
    assert bucket.keys() == [f"kiln/v/{results[0].name}"]
    assert store.read("v", results[0].name) == data


# --- ranges ---------------------------------------------------------------------------------------


@pytest.fixture
def video(store):
    data = os.urandom(3 * s3_module.CHUNK_SIZE + 123)
    return data, store.put(data, "v", "video/mp4")


@pytest.mark.parametrize(
    "start, end",
    [(0, None), (0, 1), (5, 6), (10, 10), (1000, 200_000), (0, 196_731), (65535, 65537), (196_000, None)],
)
def test_range_reads_are_slices_streamed_in_chunks(store, video, start, end):
    data, asset = video
    with store.open_range("v", asset.name, start, end) as body:
        assert (body.asset.name, body.asset.size, body.asset.etag) == (asset.name, asset.size, asset.etag)
        assert (body.start, body.end) == (start, len(data) if end is None else min(end, len(data)))
        chunks = list(body)
    assert b"".join(chunks) == data[start:end]
    assert body.length == len(data[start:end])
    assert all(0 < len(c) <= s3_module.CHUNK_SIZE for c in chunks)


def test_a_range_is_one_ranged_get_read_as_it_is_consumed(store, video):
    data, asset = video
    gets = count_requests(store, "GetObject")
    body = store.open_range("v", asset.name, 100, 100 + 2 * s3_module.CHUNK_SIZE)
    assert gets == ["GetObject"]  # the record came with the GET: no HEAD first
    first = next(iter(body))
    assert first == data[100 : 100 + s3_module.CHUNK_SIZE]
    body.close()  # early: the connection goes back, nothing more is read
    assert list(body) == []


@pytest.mark.parametrize("start, end", [(0, 10**9), (10**9, None), (10**9, 10**9 + 5)])
def test_ranges_past_the_end_are_clamped(store, video, start, end):
    data, asset = video
    body = store.open_range("v", asset.name, start, end)
    assert body.asset.size == len(data)
    assert body.end == len(data) and body.start == min(start, len(data))
    assert body.read() == data[start:end]


def test_an_empty_asset(store):
    asset = store.put(b"", "i", "image/png")
    assert store.stat("i", asset.name).size == 0
    assert store.read("i", asset.name) == b""
    assert store.open_range("i", asset.name, 3).read() == b""


@pytest.mark.parametrize("start, end, error", [(-1, None, ValueError), (5, 4, ValueError), (0.5, None, TypeError)])
def test_invalid_ranges_are_a_callers_bug(store, video, start, end, error):
    with pytest.raises(error):
        store.open_range("v", video[1].name, start, end)


# --- delete / expire ------------------------------------------------------------------------------


def test_delete(store, bucket):
    asset = store.put(WEBP, "u", "image/webp")
    store.delete("u", asset.name)
    assert store.stat("u", asset.name) is None
    assert bucket.keys() == []


def test_expire_deletes_by_age_in_batches(store, bucket, monkeypatch):
    old = [store.put(bytes([n]), "u", "image/png") for n in range(5)]
    fresh = store.put(b"fresh", "u", "image/png")
    kept_image = store.put(b"image", "i", "image/png")
    for asset in [*old, kept_image]:
        age(bucket, asset, hours=25)  # another kind is another namespace
    # keys under the kind's prefix that are not assets, and assets outside this store's prefix
    for key in ("kiln/u/stray.webp", "kiln/u/README", f"kiln/u/{'b' * 64}.mp4", f"other/u/{'c' * 64}.png"):
        bucket.client.put_object(Bucket=bucket.name, Key=key, Body=b"x")
        bucket.set_last_modified(key, NOW - timedelta(days=30))
    monkeypatch.setattr(s3_module, "PAGE_SIZE", 2)
    batches = []
    store._client.meta.events.register("before-send.s3.DeleteObjects", lambda request, **kw: batches.append(request))
    assert store.expire("u", NOW - timedelta(hours=24)) == 5
    assert len(batches) >= 3  # 5 doomed keys, at most 2 per listed page
    assert all("Content-MD5" in r.headers for r in batches)  # what older S3-compatible servers insist on
    assert all(store.stat("u", a.name) is None for a in old)
    assert store.stat("u", fresh.name) is not None and store.stat("i", kept_image.name) is not None
    assert {"kiln/u/stray.webp", "kiln/u/README", f"kiln/u/{'b' * 64}.mp4", f"other/u/{'c' * 64}.png"} <= set(
        bucket.keys())
    assert store.expire("u", NOW - timedelta(hours=24)) == 0
    assert store.expire("v", NOW) == 0  # a kind never written


def test_expire_needs_an_aware_datetime(store):
    with pytest.raises(ValueError):
        store.expire("u", datetime.now())


# --- hostile names, secrets, failures -------------------------------------------------------------


class Untouchable:
    def __getattr__(self, name):
        pytest.fail(f"an S3 request ({name}) was made")


@pytest.fixture(scope="module")
def untouchable():
    """A store whose client fails the test if any request is ever made."""
    store = S3AssetStore("never", endpoint_url="http://127.0.0.1:9", region=REGION, access_key="a", secret_key="s")
    store._client = Untouchable()
    return store


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_hostile_names_are_refused_before_any_request(untouchable, name):
    for operation in ("stat", "open_range", "read", "delete"):
        with pytest.raises(InvalidAssetName):
            getattr(untouchable, operation)("i", name)
    with pytest.raises(InvalidAssetName):
        untouchable.expire(name, NOW)


def test_the_secret_is_never_shown(bucket):
    store = S3AssetStore(bucket.name, **bucket.store_kwargs())
    settings = Settings(**bucket.settings())
    for text in (repr(store), store.where, repr(settings), str(settings)):
        assert "kiln-test-secret" not in text
    assert bucket.name in store.where and bucket.endpoint_url in store.where


def test_an_unreachable_endpoint_is_storage_unavailable_naming_it(free_port_url):
    store = S3AssetStore("assets", endpoint_url=free_port_url, region=REGION, access_key="a", secret_key="s3cr3t")
    for call in (store.check, lambda: store.stat("i", f"{DIGEST}.webp"), lambda: store.put(WEBP, "i", "image/webp"),
                 lambda: store.expire("u", NOW)):
        with pytest.raises(StorageUnavailable) as caught:
            call()
        message = caught.value.message
        assert free_port_url in message and "assets" in message and "s3cr3t" not in message
        assert caught.value.code == "storage_unavailable"


def test_a_missing_bucket_stops_start_up(bucket, tmp_path):
    settings = Settings(data_dir=tmp_path, **bucket.settings(s3_bucket="no-such-bucket"))
    with pytest.raises(StorageUnavailable, match="bucket 'no-such-bucket' does not exist"):
        build_store(settings)


def test_missing_credentials_are_storage_unavailable(bucket, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3AssetStore(bucket.name, endpoint_url=bucket.endpoint_url, region=REGION)
    with pytest.raises(StorageUnavailable, match="no credentials"):
        store.check()


def test_the_aws_environment_is_used_when_settings_leave_it_out(bucket, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", bucket.endpoint_url)
    store = build_store(Settings(data_dir=tmp_path, s3_bucket=bucket.name))
    try:
        asset = store.put(WEBP, "i", "image/webp")
    finally:
        store.close()
    assert bucket.keys() == [f"i/{asset.name}"]


def test_write_behind_over_s3(store, bucket):
    behind = WriteBehindStore(store)
    asset = behind.put_soon(WEBP, "i", "image/webp")
    assert behind.read("i", asset.name) == WEBP  # readable at once
    assert behind.flush(timeout=30)
    assert bucket.keys() == [f"kiln/i/{asset.name}"]
    assert store.read("i", asset.name) == WEBP
    behind.close()


@pytest.fixture
def free_port_url():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now


# --- the API on S3 --------------------------------------------------------------------------------


def cdn_exchanges(client, path: str) -> list[tuple[int, dict, bytes]]:
    """What the CDN answers for the same questions, with the headers that matter to a client."""
    wanted = ("etag", "content-type", "content-length", "content-range", "accept-ranges", "cache-control")
    full = client.get(path)
    answers = [full]
    for headers in ({"Range": "bytes=10-19"}, {"Range": "bytes=-5"}, {"Range": "bytes=20-"},
                    {"Range": "bytes=999999-"}, {"If-None-Match": full.headers["etag"]}):
        answers.append(client.get(path, headers=headers))
    answers.append(client.head(path))
    return [(r.status_code, {k: r.headers.get(k) for k in wanted}, r.content) for r in answers]


@pytest.mark.slow
def test_the_cdn_serves_from_s3_exactly_as_from_the_folder(tmp_path, engine, bucket):
    body = {"prompt": "a red circle on a blue background", "steps": 15, "seed": 42}
    seen = {}
    for label, settings in (("folder", {}), ("s3", bucket.settings(s3_prefix="kiln/"))):
        with running_server(tmp_path / label, engine, **settings) as srv:
            r = srv.client.post("/image/flux/dev/t2i?format=toy-96x64", json=body, headers=srv.auth)
            assert r.status_code == 200, r.text
            location = r.headers["content-location"]
            assert location.startswith("http://127.0.0.1:8080/i/")  # the same permanent URL either way
            path = location.removeprefix("http://127.0.0.1:8080")
            up = srv.client.post("/uploads", files={"file": ("x.png", png(16, 16), "image/png")}, headers=srv.auth)
            assert up.status_code in (200, 201), up.text
            upload_path = "/u/" + up.json()["url"].rsplit("/u/", 1)[1]
            assert srv.services.store.flush(timeout=30)  # the write-behind has landed: served from the store
            exchanges = cdn_exchanges(srv.client, path)
            assert [status for status, _, _ in exchanges] == [200, 206, 206, 206, 416, 304, 200]
            assert exchanges[1][2] == r.content[10:20] and exchanges[0][2] == r.content
            seen[label] = (location, r.content, exchanges, srv.client.get(upload_path).content)
            if label == "s3":
                # a queued job's output is stored durably (no write-behind) before the job completes
                job = srv.client.post("/queue", json={**body, "seed": 7, "modality": "image", "family": "flux",
                                                      "model": "dev", "task": "t2i", "format": "toy-64"},
                                      headers=srv.auth).json()
                srv.wait_for(job["id"])
                done = srv.client.get(f"/jobs/{job['id']}", headers=srv.auth, follow_redirects=False)
                output = done.json()["output"]
                job_path = output.removeprefix("http://127.0.0.1:8080")
                assert job_path.startswith("/i/")
                assert bucket.keys() == sorted([f"kiln{path}", f"kiln{upload_path}", f"kiln{job_path}"])
                assert srv.client.get(job_path).status_code == 200
                assert not (tmp_path / label / "data" / "assets").exists()
    assert seen["s3"] == seen["folder"]


@pytest.mark.slow
def test_an_s3_outage_is_503_storage_unavailable(tmp_path, engine, bucket, free_port_url):
    with running_server(tmp_path, engine, worker=StalledWorker(), **bucket.settings()) as srv:
        name = srv.services.store.put(WEBP, "i", "image/webp").name
        assert srv.client.get(f"/i/{name}").status_code == 200
        dead = S3AssetStore(bucket.name, **bucket.store_kwargs(endpoint_url=free_port_url))
        srv.services.store.inner = dead  # the endpoint goes away under a running server
        for r in (srv.client.get(f"/i/{name}"),
                  srv.client.post("/uploads", files={"file": ("x.png", png(16, 16), "image/png")}, headers=srv.auth)):
            assert r.status_code == 503
            assert r.json()["error"] == "storage_unavailable" and free_port_url in r.json()["message"]
            assert "Traceback" not in r.text and "kiln-test-secret" not in r.text
