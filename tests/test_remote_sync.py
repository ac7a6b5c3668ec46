"""The sync tier across machines: an API node with no worker of its own (``local_worker`` off) hands
sync requests to an idle ``kiln worker`` process over Redis and answers with the bytes, as one process
does; with no worker free it answers 503 within ``sync_wait_s``, and a request withdrawn then never
runs; a worker that goes silent mid-request ends it with a 500 after ``lease_s``."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import signal
import time

import httpx
import pytest
from api_helpers import running_server
from PIL import Image
from test_worker_process import WorkerProcess

pytestmark = pytest.mark.slow

SYNC = "/image/flux/dev/t2i?format=toy-96x64"
WS = {"type": "generate", "modality": "image", "family": "flux", "model": "dev", "task": "t2i",
      "format": "toy-96x64", "prompt": "a red circle"}


def outputs(data_dir) -> set[str]:
    return {p.name for p in (data_dir / "assets").rglob("*.webp")}


def test_a_sync_request_runs_on_a_kiln_worker_with_the_same_bytes_and_headers(
        tmp_path, engine, catalog_file, redis_url):
    body = {"prompt": "a red circle", "seed": 7, "steps": 15}
    local_dir = tmp_path / "local"
    local_dir.mkdir()
    with running_server(local_dir, engine) as local:
        expected = local.client.post(SYNC, json=body, headers=local.auth)
    assert expected.status_code == 200, expected.text

    with running_server(tmp_path, engine, redis_url=redis_url, local_worker=False, sync_wait_s=30.0) as srv:
        worker = WorkerProcess(catalog_file, tmp_path / "data", redis_url)
        try:
            got = srv.client.post(SYNC, json=body, headers=srv.auth)
            assert got.status_code == 200, got.text
            assert got.content == expected.content  # same seed, same pixels, same encoder
            assert got.headers["content-type"] == expected.headers["content-type"] == "image/webp"
            assert got.headers["x-seed"] == expected.headers["x-seed"] == "7"
            assert got.headers["content-location"] == expected.headers["content-location"]
            assert {"x-generation-time", "server-timing"} <= set(got.headers)
            assert "generate;dur=" in got.headers["server-timing"]
            # written durably by the worker before it replied: the CDN has it at once
            cdn = srv.client.get(got.headers["content-location"])
            assert cdn.status_code == 200 and cdn.content == got.content

            # WebSocket: the worker's step previews and the client's cancel cross Redis too
            with srv.client.websocket_connect("/ws", headers=srv.auth) as ws:
                ws.send_json({**WS, "id": "a", "stream_frames": True, "seed": 3, "steps": 15})
                frames = []
                while (message := ws.receive_json())["type"] == "frame":
                    frames.append(message)
                assert (message["type"], message["id"], message["seed"]) == ("complete", "a", 3), message
                assert [f["step"] for f in frames] == list(range(1, 16)) and {f["total_steps"] for f in frames} == {15}
                with Image.open(io.BytesIO(base64.b64decode(frames[0]["data"]))) as preview:
                    assert preview.format == "WEBP"
                ws.send_json({**WS, "id": "c", "stream_frames": True, "steps": 50})
                assert ws.receive_json()["type"] == "frame"
                ws.send_json({"type": "cancel", "id": "c"})
                while (message := ws.receive_json())["type"] == "frame":
                    pass
                assert (message["type"], message["id"], message["error"]) == ("error", "c", "cancelled"), message
        finally:
            assert worker.stop() == 0, worker.log


def test_sync_without_a_free_worker_is_503_and_the_withdrawn_request_never_runs(
        tmp_path, engine, catalog_file, redis_url):
    data_dir = tmp_path / "data"
    with running_server(tmp_path, engine, redis_url=redis_url, local_worker=False, sync_wait_s=1.0) as srv:
        # no worker process at all: refused at once
        started = time.monotonic()
        none = srv.client.post(SYNC, json={"prompt": "a red circle"}, headers=srv.auth)
        assert none.status_code == 503 and none.json()["error"] == "capacity_exhausted", none.text
        assert int(none.headers["retry-after"]) >= 1 and time.monotonic() - started < 1.0

        worker = WorkerProcess(catalog_file, data_dir, redis_url)
        try:
            before = outputs(data_dir)
            worker.proc.send_signal(signal.SIGSTOP)  # present (within its lease) but takes nothing
            try:
                started = time.monotonic()
                busy = srv.client.post(SYNC, json={"prompt": "a blue square", "seed": 11}, headers=srv.auth)
                waited = time.monotonic() - started
            finally:
                worker.proc.send_signal(signal.SIGCONT)
            assert busy.status_code == 503 and busy.json()["error"] == "capacity_exhausted", busy.text
            assert int(busy.headers["retry-after"]) >= 1
            assert 1.0 <= waited < 10.0

            # the worker, running again, takes the next request; the withdrawn one (which it may have
            # popped before it stopped) was never run: only the new output was written
            ok = srv.client.post(SYNC, json={"prompt": "a green circle", "seed": 12}, headers=srv.auth)
            assert ok.status_code == 200, ok.text
            new = outputs(data_dir) - before
            assert new == {ok.headers["content-location"].rsplit("/", 1)[1]}
        finally:
            assert worker.stop() == 0, worker.log


def test_a_worker_that_goes_silent_mid_request_ends_it_with_a_500(tmp_path, engine, catalog_file, redis_url):
    with running_server(tmp_path, engine, redis_url=redis_url, local_worker=False, sync_wait_s=30.0,
                        lease_s=1.5) as srv:
        worker = WorkerProcess(catalog_file, tmp_path / "data", redis_url, KILN_LEASE_S="1.5")
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(srv.client.post, SYNC, json={"prompt": "a red circle", "steps": 50},
                                      headers=srv.auth)
                deadline = time.monotonic() + 60
                while not (httpx.get(f"{worker.base}/readyz").json()["job"] or "").startswith("s_"):
                    assert time.monotonic() < deadline and not pending.done(), "the worker never took it"
                os.kill(worker.proc.pid, signal.SIGKILL)  # dies holding the request
                answer = pending.result(timeout=30)
            assert answer.status_code == 500, answer.text
            assert "went silent" in answer.json()["message"]
        finally:
            worker.stop()
