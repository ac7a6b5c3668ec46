"""The render API in process, on the toy engine and on fakes for failure modes."""

from __future__ import annotations

import base64
import io
import json
import re
import time

import pytest
from PIL import Image

from api_helpers import Receiver, StalledWorker, running_server
from helpers import png
from kiln.queue import JobStatus, Priority

pytestmark = pytest.mark.slow

PROMPT = {"prompt": "a red circle on a blue background"}


@pytest.fixture
def server(tmp_path, engine):
    with running_server(tmp_path, engine) as srv:
        yield srv


def test_sync_image_returns_bytes_and_a_permanent_url(server):
    r = server.client.post("/image/flux/dev/t2i?format=toy-96x64", json={**PROMPT, "steps": 15, "seed": 42},
                           headers=server.auth)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/webp" and r.headers["x-seed"] == "42"
    assert int(r.headers["x-generation-time"]) >= 0
    timing = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert set(timing) == {"generate", "encode", "store"} and all(float(v) >= 0 for v in timing.values())
    assert float(timing["generate"]) >= int(r.headers["x-generation-time"]) - 1
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.size == (96, 64)
    location = r.headers["content-location"]
    assert location.startswith("http://127.0.0.1:8080/i/") and location.endswith(".webp")
    cdn = server.client.get(location.removeprefix("http://127.0.0.1:8080"))
    assert cdn.status_code == 200 and cdn.content == r.content
    assert cdn.headers["cache-control"] == "public, max-age=31536000, immutable" and cdn.headers["etag"]
    assert "x-ratelimit-limit" in r.headers and "x-ratelimit-remaining" in r.headers


def test_aliases_resolve_in_the_path(server):
    r = server.client.post("/image/flux/default/t2i?format=toy-64", json={**PROMPT, "steps": 15}, headers=server.auth)
    assert r.status_code == 200, r.text


def test_sync_video(server):
    r = server.client.post("/video/wan/default/t2v?format=toy-64", json={**PROMPT, "duration": 0.5, "steps": 10, "cfg": 7},
                           headers=server.auth)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4" and r.headers["content-location"].split("/")[-2] == "v"


@pytest.mark.parametrize(("path", "body", "status", "code"), [
    ("/image/flux/dev9/t2i", PROMPT, 404, "model_not_found"),
    ("/image/flux/dev/t2i?format=2048", PROMPT, 400, "unsupported_format"),
    ("/image/flux/dev/t2i?format=toy-64", {**PROMPT, "steps": 99}, 400, "invalid_parameters"),
    ("/image/flux/dev/t2i?format=toy-64", {"prompt": "ab"}, 400, "invalid_prompt"),
    ("/image/flux/dev/t2i?format=toy-64", {"prompt": "x" * 5001}, 400, "invalid_prompt"),
    ("/image/flux/dev/t2i?format=toy-64", {**PROMPT, "seed": 2**32}, 400, "invalid_parameters"),
    ("/image/flux/dev/t2i?format=toy-64", {**PROMPT, "colour": "red"}, 400, "invalid_parameters"),
    ("/image/flux/dev/t2i?format=toy-64", {**PROMPT, "sampler": "ddim"}, 400, "invalid_parameters"),
    ("/image/flux/dev/t2i?format=toy-64", {**PROMPT, "loras": [{"url": "https://x/y.safetensors", "weight": 1}]}, 400,
     "invalid_parameters"),
    ("/image/flux/schnell/t2i?format=toy-64", {**PROMPT, "guidance": 2.0}, 400, "invalid_parameters"),
    ("/video/flux/dev/t2i?format=toy-64", PROMPT, 400, "invalid_parameters"),
    ("/image/flux/dev/i2i?format=toy-64", {**PROMPT, "image": "data:image/png;base64,!!!"}, 400, "invalid_image"),
])
def test_bad_requests_get_the_reference_error_schema(server, path, body, status, code):
    r = server.client.post(path, json=body, headers=server.auth)
    assert r.status_code == status, r.text
    data = r.json()
    assert data["error"] == code and isinstance(data["message"], str) and "Traceback" not in r.text


def test_i2i_from_a_data_uri_and_from_an_upload(server):
    data_uri = "data:image/png;base64," + base64.b64encode(png(80, 64)).decode()
    r = server.client.post("/image/flux/dev/i2i?format=toy-64", json={**PROMPT, "image": data_uri, "steps": 15},
                           headers=server.auth)
    assert r.status_code == 200, r.text
    up = server.client.post("/uploads", files={"file": ("in.png", png(80, 64), "image/png")}, headers=server.auth)
    assert up.status_code == 200, up.text
    url = up.json()["url"]
    assert "/u/" in url and url.endswith(".png")
    r = server.client.post("/image/flux/dev/i2i?format=toy-64", json={**PROMPT, "image": url, "steps": 15},
                           headers=server.auth)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("content", "message"), [
    (b"not an image", "not a readable"),
    (b"GIF89a" + b"\x00" * 100, "not a readable"),
])
def test_bad_uploads(server, content, message):
    r = server.client.post("/uploads", files={"file": ("x.png", content, "image/png")}, headers=server.auth)
    assert r.status_code == 400 and r.json()["error"] == "invalid_image" and message in r.json()["message"]


def test_queue_job_runs_to_a_303(server):
    r = server.client.post("/queue", json={**PROMPT, "modality": "image", "family": "flux", "model": "dev", "task": "t2i",
                                           "format": "toy-64", "steps": 15}, headers=server.auth)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["id"].startswith("j_") and job["position"] >= 1 and job["created_at"]
    server.wait_for(job["id"])
    done = server.client.get(f"/jobs/{job['id']}", headers=server.auth, follow_redirects=False)
    assert done.status_code == 303
    assert done.headers["location"] == done.json()["output"] and done.json()["status"] == "complete"
    assert done.json()["duration_ms"] >= 0 and done.json()["completed_at"]


def test_unknown_and_foreign_jobs_are_404(server):
    assert server.client.get("/jobs/j_nope", headers=server.auth).json()["error"] == "not_found"
    other = server.services.keys.create("other").secret
    r = server.client.post("/queue", json={**PROMPT, "modality": "image", "family": "flux", "model": "dev", "task": "t2i",
                                           "format": "toy-64", "steps": 15}, headers={"Authorization": f"Bearer {other}"})
    assert server.client.get(f"/jobs/{r.json()['id']}", headers=server.auth).status_code == 404


@pytest.mark.parametrize(("headers", "status", "code"), [
    ({}, 401, "invalid_token"),
    ({"Authorization": "Bearer nonsense"}, 401, "invalid_token"),
    ({"Authorization": "Basic abc"}, 401, "invalid_token"),
    ({"Authorization": "Bearer kiln_sk_" + "a" * 43}, 401, "invalid_token"),
])
def test_auth_failures(server, headers, status, code):
    r = server.client.get("/models", headers=headers)
    assert (r.status_code, r.json()["error"]) == (status, code)


def test_revoked_key_credits_and_rate(server):
    keys = server.services.keys
    revoked = keys.create("gone")
    keys.revoke(revoked.record.id)
    r = server.client.get("/models", headers={"Authorization": f"Bearer {revoked.secret}"})
    assert (r.status_code, r.json()["error"]) == (401, "token_expired")
    broke = keys.create("broke", credits=0).secret
    r = server.client.post("/image/flux/dev/t2i?format=toy-64", json={**PROMPT, "steps": 15},
                           headers={"Authorization": f"Bearer {broke}"})
    assert (r.status_code, r.json()["error"]) == (402, "insufficient_credits")
    slow = keys.create("slow", rate_per_min=2).secret
    hdr = {"Authorization": f"Bearer {slow}"}
    assert [server.client.get("/models", headers=hdr).status_code for _ in range(2)] == [200, 200]
    r = server.client.get("/models", headers=hdr)
    assert r.status_code == 429 and r.json()["error"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1 and r.json()["retry_after"] >= 1
    assert r.headers["x-ratelimit-remaining"] == "0"


def test_credits_are_charged_only_to_metered_keys(server, monkeypatch):
    keys = server.services.keys
    metered = keys.create("metered", credits=2)
    calls = []
    real_spend = keys.spend
    monkeypatch.setattr(keys, "spend", lambda key_id, amount=1: calls.append(key_id) or real_spend(key_id, amount))
    body = {**PROMPT, "steps": 15}
    assert server.client.post("/image/flux/dev/t2i?format=toy-64", json=body, headers=server.auth).status_code == 200
    assert calls == []  # the unlimited key: no database write to charge it
    hdr = {"Authorization": f"Bearer {metered.secret}"}
    assert server.client.post("/image/flux/dev/t2i?format=toy-64", json=body, headers=hdr).status_code == 200
    assert calls == [metered.record.id] and keys.get(metered.record.id).credits == 1


def test_models_and_aliases(server):
    models = server.client.get("/models", headers=server.auth).json()["models"]
    schnell = next(m for m in models if m["model"] == "schnell")
    assert schnell["info"]["fixed_steps"] == 4 and schnell["backends"] == ["torch"] and schnell["status"] == "active"
    assert (schnell["info"]["loras"], schnell["info"]["negative_prompt"]) == (False, False)
    assert "distilled" in schnell["info"]["lora_refusal"] and schnell["info"]["size_range"] == [256, 2048]
    dev = next(m for m in models if m["model"] == "dev")
    assert (dev["info"]["loras"], dev["info"]["negative_prompt"]) == (True, True) and "lora_refusal" not in dev["info"]
    assert {m["modality"] for m in server.client.get("/models?modality=video", headers=server.auth).json()["models"]} == {"video"}
    assert {m["family"] for m in server.client.get("/models?family=zimage", headers=server.auth).json()["models"]} == {"zimage"}
    aliases = server.client.get("/models/aliases", headers=server.auth).json()
    assert aliases["aliases"] == {"latest": "dev2", "default": "dev", "fast": "schnell", "turbo": "turbo"}
    assert aliases["updated_at"].endswith("Z")


def test_health_docs_and_unknown_routes(server):
    assert server.client.get("/healthz").json() == {"status": "ok"}
    deadline = time.monotonic() + 60  # the worker warms the default model up before it says ready
    while (ready := server.client.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ready.status_code == 200
    assert server.client.get("/openapi.json").status_code == 200
    r = server.client.get("/nope", headers=server.auth)
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_openapi_documents_the_sync_routes_and_every_reference_resolves(server):
    doc = server.client.get("/openapi.json").json()
    for path, media_type in (("/image/{family}/{model}/{task}", "image/webp"), ("/video/{family}/{model}/{task}", "video/mp4")):
        op = doc["paths"][path]["post"]
        assert [p["name"] for p in op["parameters"]] == ["family", "model", "task", "format"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert {"prompt", "steps", "seed", "image", "loras"} <= set(schema["properties"])
        assert media_type in op["responses"]["200"]["content"]
    text = json.dumps(doc)
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text))
    assert refs and refs <= set(doc["components"]["schemas"])


@pytest.mark.parametrize(("body", "field"), [
    (b"", "body"), (b"not json", "body"), (b"[]", "body"), (b'{"prompt": "a red circle", "steps": "x"}', "steps"),
    (b'{"prompt": "a red circle", "colour": "red"}', "colour"),
])
def test_sync_bodies_that_are_not_a_generate_body(server, body, field):
    r = server.client.post("/image/flux/dev/t2i?format=toy-64", content=body,
                           headers={**server.auth, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_parameters"
    assert r.json()["details"]["errors"][0]["field"] == field


def test_sync_format_too_long(server):
    r = server.client.post("/image/flux/dev/t2i?format=" + "x" * 33, json=PROMPT, headers=server.auth)
    assert r.status_code == 400 and r.json()["error"] == "invalid_parameters" and "format" in r.json()["message"]


# --- fakes for failure modes --------------------------------------------------------------------


@pytest.fixture
def busy(tmp_path, engine):
    with running_server(tmp_path, engine, worker=StalledWorker(), queue_max_depth=2, sync_wait_s=0.05) as srv:
        yield srv


def test_capacity_exhausted_is_503_with_retry_after(busy):
    r = busy.client.post("/image/flux/dev/t2i?format=toy-64", json=PROMPT, headers=busy.auth)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json() == {"error": "capacity_exhausted", "message": "sync tier at capacity, retry in 5s or use async",
                        "retry_after": 5}


def test_prefer_respond_async_turns_503_into_a_job(busy):
    r = busy.client.post("/image/flux/dev/t2i?format=toy-64", json=PROMPT,
                         headers={**busy.auth, "Prefer": "respond-async"})
    assert r.status_code == 202 and r.json()["status"] == "queued" and r.headers["location"].endswith(r.json()["id"])
    assert r.json()["eta_seconds"] == 4  # one job ahead of nothing, at the measured 4 s per job


def queue_body(**extra):
    return {**PROMPT, "modality": "image", "family": "flux", "model": "dev", "task": "t2i", "format": "toy-64", **extra}


def test_idempotency_cancel_and_queue_full(busy):
    first = busy.client.post("/queue", json=queue_body(idempotency_key="k1"), headers=busy.auth).json()
    again = busy.client.post("/queue", json=queue_body(idempotency_key="k1"), headers=busy.auth).json()
    assert again["id"] == first["id"]
    conflict = busy.client.post("/queue", json=queue_body(idempotency_key="k1", steps=20), headers=busy.auth)
    assert conflict.status_code == 409 and conflict.json()["error"] == "idempotency_conflict"
    second = busy.client.post("/queue", json=queue_body(priority="high"), headers=busy.auth).json()
    assert second["position"] == 1  # high goes first
    full = busy.client.post("/queue", json=queue_body(), headers=busy.auth)
    assert full.status_code == 429 and full.json()["error"] == "queue_full"
    cancelled = busy.client.delete(f"/jobs/{first['id']}", headers=busy.auth).json()
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"]
    assert busy.services.broker.get(first["id"]).status is JobStatus.CANCELLED


def test_failed_job_shows_its_error(busy):
    job = busy.client.post("/queue", json=queue_body(), headers=busy.auth).json()
    broker = busy.services.broker
    broker.claim("w")
    broker.fail(job["id"], "out_of_memory", "flux/dev ran out of memory at 1024x1024")
    body = busy.client.get(f"/jobs/{job['id']}", headers=busy.auth).json()
    assert body["status"] == "failed" and body["error"] == {"code": "out_of_memory",
                                                            "message": "flux/dev ran out of memory at 1024x1024"}


def test_running_job_shows_progress(busy):
    job = busy.client.post("/queue", json=queue_body(), headers=busy.auth).json()
    busy.services.broker.claim("w")
    busy.services.broker.report_progress(job["id"], 5, 20)
    body = busy.client.get(f"/jobs/{job['id']}", headers=busy.auth).json()
    assert (body["status"], body["step"], body["total_steps"], body["progress"]) == ("running", 5, 20, 0.25)


def test_cdn_etag_ranges_and_names(busy):
    asset = busy.services.store.put(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4, "v", "video/mp4")
    path = f"/v/{asset.name}"
    full = busy.client.get(path)
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
    assert busy.client.get(path, headers={"If-None-Match": full.headers["etag"]}).status_code == 304
    part = busy.client.get(path, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == full.content[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(full.content)}"
    assert busy.client.get(path, headers={"Range": "bytes=-5"}).content == full.content[-5:]
    assert busy.client.get(path, headers={"Range": "bytes=99999-"}).status_code == 416
    head = busy.client.head(path)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(full.content))
    for bad in ("/v/..%2f..%2fetc%2fpasswd", "/i/" + "a" * 64 + ".exe", "/u/xyz.png"):
        r = busy.client.get(bad)
        assert r.status_code == 404 and r.json()["error"] == "not_found"


def read_events(response) -> list[tuple[str, str, dict]]:
    import json

    events, current = [], {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if current:
                events.append((current.get("id"), current.get("event"), json.loads(current.get("data", "{}"))))
                current = {}
            continue
        field, _, value = line.partition(": ")
        current[field] = value
    return events


def test_sse_follows_a_job_to_the_end_and_resumes(server):
    job = server.client.post("/queue", json=queue_body(steps=15), headers=server.auth).json()
    with server.client.stream("GET", f"/jobs/{job['id']}/events", headers=server.auth) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r)
    names = [name for _, name, _ in events]
    assert names[-1] == "complete" and "started" in names
    assert events[-1][2]["output"].startswith("http://127.0.0.1:8080/i/")
    ids = [int(i) for i, name, _ in events if name != "position"]
    assert ids == sorted(ids)
    # a finished job replays its terminal event; Last-Event-ID skips what was seen
    with server.client.stream("GET", f"/jobs/{job['id']}/events", headers={**server.auth, "Last-Event-ID": "1"}) as r:
        assert [name for _, name, _ in read_events(r)] == ["complete"]
    with server.client.stream("GET", f"/jobs/{job['id']}/events",
                              headers={**server.auth, "Last-Event-ID": "1000000"}) as r:
        assert read_events(r) == []


def test_sse_for_unknown_job_is_404_before_streaming(server):
    r = server.client.get("/jobs/j_missing/events", headers=server.auth)
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_sse_reports_position_then_cancellation(busy):
    job = busy.client.post("/queue", json=queue_body(), headers=busy.auth).json()
    busy.services.broker.cancel(job["id"])
    with busy.client.stream("GET", f"/jobs/{job['id']}/events", headers=busy.auth) as r:
        assert [name for _, name, _ in read_events(r)] == ["cancelled"]


def ws_generate(**extra):
    return {"type": "generate", "modality": "image", "family": "flux", "model": "dev", "task": "t2i",
            "format": "toy-64", "prompt": "a red circle", "steps": 15, **extra}


def test_websocket_streams_frames_then_completes(server):
    with server.client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "auth", "token": server.key})
        ws.send_json(ws_generate(id="a", stream_frames=True, seed=3))
        frames = []
        while True:
            message = ws.receive_json()
            if message["type"] != "frame":
                break
            frames.append(message)
        assert message["type"] == "complete" and message["id"] == "a", message
        assert message["output"].startswith("http://127.0.0.1:8080/i/") and message["latency_ms"] >= 0
        assert [f["step"] for f in frames] == list(range(1, 16)) and {f["total_steps"] for f in frames} == {15}
        with Image.open(io.BytesIO(base64.b64decode(frames[0]["data"]))) as preview:
            assert preview.format == "WEBP"
        # a second generation on the same connection, without frames
        ws.send_json(ws_generate(id="b"))
        assert ws.receive_json()["type"] == "complete"


def test_websocket_errors_and_auth(server):
    with server.client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "generate"})
        message = ws.receive_json()
        assert message["type"] == "error" and message["error"] == "invalid_token"
    with server.client.websocket_connect("/ws", headers=server.auth) as ws:
        ws.send_json(ws_generate(id="x", steps=99))
        message = ws.receive_json()
        assert (message["type"], message["id"], message["error"]) == ("error", "x", "invalid_parameters")
        ws.send_json(ws_generate(id="y", family="nope"))
        assert ws.receive_json()["error"] == "model_not_found"
        ws.send_json({"type": "dance"})
        assert ws.receive_json()["error"] == "invalid_parameters"
        ws.send_json({"type": "cancel", "id": "zzz"})
        assert ws.receive_json()["error"] == "not_found"


def test_websocket_cancel_stops_a_generation(server):
    with server.client.websocket_connect("/ws", headers=server.auth) as ws:
        ws.send_json(ws_generate(id="c", stream_frames=True, steps=50))
        first = ws.receive_json()
        assert first["type"] == "frame"
        ws.send_json({"type": "cancel", "id": "c"})
        while (message := ws.receive_json())["type"] == "frame":
            pass
        assert (message["type"], message["id"], message["error"]) == ("error", "c", "cancelled")


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_webhook_is_signed_retried_and_shown_on_the_job(tmp_path, engine, receiver):
    import hashlib
    import hmac
    import json

    with running_server(tmp_path, engine, allow_private_fetch=True) as srv:
        job = srv.client.post("/queue", json=queue_body(steps=15, webhook=receiver.url), headers=srv.auth).json()
        assert receiver.done.wait(60), receiver.calls
        secret = srv.services.keys.lookup(srv.key).webhook_secret
        (first_headers, _, first_status), (headers, body, status) = receiver.calls
        assert (first_status, status) == (500, 204) and first_headers["webhook-id"] == headers["webhook-id"]
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        expected = base64.b64encode(hmac.new(base64.b64decode(secret.removeprefix("whsec_")), signed, hashlib.sha256).digest())
        assert f"v1,{expected.decode()}" in headers["webhook-signature"].split()
        sent = json.loads(body)
        assert sent["id"] == job["id"] and sent["status"] == "complete" and sent["output"].startswith("http")
        outbox = srv.services.outbox
        srv.wait_for(job["id"], until=lambda j: outbox.state_for_job(j.id)[-1].state.value == "delivered")
        shown = srv.client.get(f"/jobs/{job['id']}", headers=srv.auth, follow_redirects=False).json()["webhook"]
        assert (shown["state"], shown["attempts"], shown["last_status"]) == ("delivered", 2, "204")


def test_webhook_to_a_private_address_is_refused_by_default(server):
    r = server.client.post("/queue", json=queue_body(webhook="http://127.0.0.1:9/hook"), headers=server.auth)
    job = r.json()
    assert r.status_code == 202  # the address is checked when sending, after every DNS answer
    server.client.delete(f"/jobs/{job['id']}", headers=server.auth)
    failed = server.wait_for(job["id"], until=lambda j: server.services.outbox.state_for_job(j.id)
                             and server.services.outbox.state_for_job(j.id)[-1].state.value == "failed")
    shown = server.client.get(f"/jobs/{failed.id}", headers=server.auth).json()["webhook"]
    assert shown["state"] == "failed" and "private" in shown["last_error"]


@pytest.mark.parametrize("url", ["ftp://example.com/x", "not a url", "http://user:pw@example.com/x"])
def test_bad_webhook_urls_are_400(server, url):
    r = server.client.post("/queue", json=queue_body(webhook=url), headers=server.auth)
    assert r.status_code == 400 and r.json()["error"] == "invalid_parameters" and "webhook" in r.json()["message"]


def test_prompt_filter_answers_403(tmp_path, engine):
    rules = tmp_path / "filter.txt"
    rules.write_text("# refused words\n\\bforbidden\\b\n")
    with running_server(tmp_path, engine, prompt_filter_file=rules) as srv:
        r = srv.client.post("/image/flux/dev/t2i?format=toy-64", json={"prompt": "a FORBIDDEN thing", "steps": 15},
                            headers=srv.auth)
        assert (r.status_code, r.json()["error"]) == (403, "prompt_filtered")
        ok = srv.client.post("/image/flux/dev/t2i?format=toy-64", json={"prompt": "a forbiddenly nice thing", "steps": 15},
                             headers=srv.auth)
        assert ok.status_code == 200


def test_a_bad_prompt_filter_stops_start_up(tmp_path, engine):
    from kiln.settings import SettingsError

    rules = tmp_path / "filter.txt"
    rules.write_text("(unclosed\n")
    with pytest.raises(SettingsError, match="pattern 1"):
        with running_server(tmp_path, engine, prompt_filter_file=rules):
            pass


def test_uploads_expire(tmp_path):
    import os
    import time as _time

    from kiln.maintenance import Janitor
    from kiln.storage import LocalAssetStore

    store = LocalAssetStore(tmp_path / "assets")
    old = store.put(png(8, 8), "u", "image/png")
    new = store.put(png(9, 9), "u", "image/png")
    kept = store.put(png(10, 10), "i", "image/png")
    path = next((tmp_path / "assets").rglob(old.name))
    day_ago = _time.time() - 25 * 3600
    os.utime(path, (day_ago, day_ago))
    janitor = Janitor(store, upload_ttl_s=24 * 3600)
    assert janitor.run_once() == 1
    assert store.stat("u", old.name) is None and store.stat("u", new.name) and store.stat("i", kept.name)
    needed = store.put(png(11, 11), "u", "image/png")  # the input of a job still queued
    path = next((tmp_path / "assets").rglob(needed.name))
    os.utime(path, (day_ago, day_ago))
    assert Janitor(store, upload_ttl_s=24 * 3600, in_use=lambda: [needed.name]).run_once() == 0
    assert store.stat("u", needed.name) is not None


def test_metrics(server):
    server.client.post("/image/flux/dev/t2i?format=toy-64", json={**PROMPT, "steps": 15}, headers=server.auth)
    job = server.client.post("/queue", json=queue_body(steps=15), headers=server.auth).json()
    server.wait_for(job["id"])
    assert server.client.get("/metrics").status_code == 401
    import time as _time

    deadline = _time.monotonic() + 30  # the worker records a job just after the broker marks it done
    while 'stage="running"} 1.0' not in (text := server.client.get("/metrics", headers=server.auth).text):
        assert _time.monotonic() < deadline, text
        _time.sleep(0.01)
    assert 'kiln_http_requests_total{method="POST",route="/image/{family}/{model}/{task}",status="200"} 1.0' in text
    assert 'kiln_http_request_duration_seconds_bucket{le="0.005",route="/queue"}' in text
    assert 'kiln_queue_depth{priority="high"} 0.0' in text
    assert 'kiln_job_seconds_count{model="flux/dev",stage="sync"} 1.0' in text
    assert 'kiln_job_seconds_count{model="flux/dev",stage="running"} 1.0' in text


def test_curl_style_form_content_type_is_read_as_json(server):
    r = server.client.post("/image/flux/dev/t2i?format=toy-64", content=b'{"prompt": "portrait", "steps": 15}',
                           headers={**server.auth, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text


def test_bodies_are_capped_while_read(server):
    from kiln.api.guard import JSON_LIMIT

    big = b'{"prompt": "' + b"x" * (JSON_LIMIT + 10) + b'"}'
    r = server.client.post("/image/flux/dev/t2i", content=big, headers=server.auth)
    assert r.status_code == 413 and r.json()["error"] == "invalid_parameters"

    def chunks():  # no Content-Length: the cap holds while streaming
        yield b'{"prompt": "'
        for _ in range(70):
            yield b"x" * 2**20
        yield b'"}'

    r = server.client.post("/queue", content=chunks(), headers=server.auth)
    assert r.status_code == 413
    r = server.client.post("/uploads", files={"file": ("x.png", b"\x89PNG" + b"\x00" * (21 * 2**20), "image/png")},
                           headers=server.auth)
    assert r.status_code in (400, 413) and r.json()["error"] in ("invalid_parameters", "invalid_image")


def test_not_json_at_all_is_invalid_parameters(server):
    r = server.client.post("/image/flux/dev/t2i", content=b"\xff\xfe not json", headers=server.auth)
    assert r.status_code == 400 and r.json()["error"] == "invalid_parameters"


def test_range_edge_cases(busy):
    asset = busy.services.store.put(b"\x00\x00\x00\x18ftypmp42" + bytes(100), "v", "video/mp4")
    path = f"/v/{asset.name}"
    for header in ("bytes=5-2", "bytes=0-1,4-5", "items=0-1", "bytes=" + "9" * 5000 + "-"):
        r = busy.client.get(path, headers={"Range": header})
        assert r.status_code == 200 and len(r.content) == asset.size, header


def test_broken_png_upload_is_400(server):
    data = bytearray(png(16, 16))
    data[-20] ^= 0xFF  # corrupt the IDAT checksum region
    r = server.client.post("/uploads", files={"file": ("x.png", bytes(data), "image/png")}, headers=server.auth)
    assert r.status_code == 400 and r.json()["error"] == "invalid_image"


def test_websocket_survives_garbage_and_counts_every_generation(server):
    slow = server.services.keys.create("ws-slow", rate_per_min=2).secret
    with server.client.websocket_connect("/ws", headers={"Authorization": f"Bearer {slow}"}) as ws:
        ws.send_bytes(b"\x00\x01binary")
        assert ws.receive_json()["error"] == "invalid_parameters"
        ws.send_text("not json")
        assert ws.receive_json()["error"] == "invalid_parameters"
        ws.send_json(ws_generate(id="one"))  # the connection counted 1 of 2
        assert ws.receive_json()["type"] == "complete"
        ws.send_json(ws_generate(id="two"))
        message = ws.receive_json()
        assert (message["id"], message["error"]) == ("two", "rate_limit_exceeded") and message["retry_after"] >= 1


def test_credits_are_refunded_when_nothing_is_made_and_idempotent_repeats_are_free(busy):
    keys = busy.services.keys
    two = keys.create("two", credits=2)
    hdr = {"Authorization": f"Bearer {two.secret}"}
    r = busy.client.post("/image/flux/dev/t2i?format=toy-64", json=PROMPT, headers=hdr)
    assert r.status_code == 503 and keys.get(two.record.id).credits == 2  # a 503 costs nothing
    first = busy.client.post("/queue", json=queue_body(idempotency_key="same"), headers=hdr).json()
    assert keys.get(two.record.id).credits == 1
    keys.spend(two.record.id)  # now empty
    again = busy.client.post("/queue", json=queue_body(idempotency_key="same"), headers=hdr)
    assert again.status_code == 202 and again.json()["id"] == first["id"]
    broke = busy.client.post("/queue", json=queue_body(), headers=hdr)
    assert broke.status_code == 402 and busy.services.broker.depth()[Priority.NORMAL] == 1


def test_a_webhook_lost_to_a_crash_is_queued_at_the_next_start(tmp_path, engine):
    from kiln.server import build_runtime
    from kiln.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    runtime = build_runtime(settings, engine=engine, worker=StalledWorker())
    broker, outbox = runtime.services.broker, runtime.services.outbox
    job, _ = broker.submit({"request": {}, "webhook": "https://hooks.example/x"})
    broker.claim("w")
    broker.complete(job.id, "/i/" + "a" * 64 + ".webp", {})  # ...and the process dies before the outbox insert
    assert outbox.state_for_job(job.id) == []
    assert runtime.resend_missed_webhooks() == 1
    assert len(outbox.state_for_job(job.id)) == 1
    assert runtime.resend_missed_webhooks() == 1 and len(outbox.state_for_job(job.id)) == 1  # idempotent


def test_sigterm_hands_a_long_job_back_to_the_queue(tmp_path, engine):
    import threading as _threading

    from kiln.queue import SqliteBroker
    from kiln.storage import LocalAssetStore
    from kiln.worker import Worker, to_payload
    from kiln.engine import GenerationRequest

    broker = SqliteBroker(tmp_path / "jobs.db")
    store = LocalAssetStore(tmp_path / "assets")
    worker = Worker(engine, broker, store)
    request = GenerationRequest.create(family="flux", model="dev", task="t2i", format="toy-64", prompt="a red circle",
                                       steps=50)
    started = _threading.Event()
    original = broker.report_progress

    def report(job_id, step, total, **kwargs):
        started.set()
        return original(job_id, step, total, **kwargs)

    broker.report_progress = report
    job, _ = broker.submit(to_payload(request, store))
    worker.start()
    assert started.wait(60)
    worker.stop(timeout=0.0)  # no time to finish: it must go back, not be lost or marked cancelled
    assert broker.get(job.id).status is JobStatus.QUEUED


@pytest.mark.parametrize("warmup", [True, False])
def test_warm_up_measures_the_default_model_before_ready(tmp_path, engine, warmup):
    from kiln.queue import SqliteBroker
    from kiln.storage import LocalAssetStore
    from kiln.worker import Worker

    default = engine.catalog.default_model
    worker = Worker(engine, SqliteBroker(tmp_path / "jobs.db"), LocalAssetStore(tmp_path / "assets"),
                    preload=(default,), warmup=warmup)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not worker.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.alive and worker.ready
        estimate = worker.estimate(default, 10, 1.0)
        if warmup:  # measured: positive, and linear in steps and megapixels
            assert estimate > 0 and worker.estimate(default, 20, 0.5) == pytest.approx(estimate)
        else:
            assert estimate is None and worker.seconds_per_job is None
        assert worker.estimate("flux/schnell", 10, 1.0) is None  # never ran here
    finally:
        worker.stop()


def test_a_sync_request_sent_while_the_worker_starts_waits_for_it(tmp_path, engine, monkeypatch):
    """Right after ``kiln serve`` the worker is still loading and warming up its default model: a sync
    request then waits for it (slow, not 503), even with no sync wait at all."""
    import threading

    from helpers import until
    from kiln.worker import Worker

    release = threading.Event()
    warm_up = Worker._warm_up
    monkeypatch.setattr(Worker, "_warm_up", lambda self, spec: release.wait(60) and warm_up(self, spec))
    with running_server(tmp_path, engine, sync_wait_s=0.0) as srv:
        worker = srv.services.worker
        assert worker.starting and not worker.alive
        threading.Thread(target=lambda: until(lambda: worker._sync, what="the sync request") and release.set(),
                         daemon=True).start()
        r = srv.client.post("/image/flux/dev/t2i?format=toy-64", json={**PROMPT, "steps": 15}, headers=srv.auth)
        assert r.status_code == 200, r.text
        assert worker.alive and not worker.starting


def test_a_sync_request_waits_for_a_start_up_only_so_long(monkeypatch):
    import asyncio

    from kiln.api import handoff
    from kiln.engine import GenerationRequest
    from kiln.errors import CapacityExhausted
    from kiln.worker import runner

    class Starting(StalledWorker):
        starting = True  # forever: a preload that hangs
        still_starting = runner.Worker.still_starting

    monkeypatch.setattr(runner, "STARTUP_WAIT_S", 0.3)
    request = GenerationRequest.create(family="flux", model="dev", task="t2i", format="toy-64", prompt="a red circle")
    with pytest.raises(CapacityExhausted):
        asyncio.run(handoff.run_sync(Starting(), request, wait_s=0.0, retry_after=5))


def test_a_real_worker_busy_with_a_job_answers_sync_with_503(tmp_path, engine):
    with running_server(tmp_path, engine, sync_wait_s=0.05) as srv:
        job = srv.client.post("/queue", json=queue_body(steps=50, format="512"), headers=srv.auth).json()
        srv.wait_for(job["id"], until=lambda j: j.status is JobStatus.RUNNING and j.step >= 1)
        r = srv.client.post("/image/flux/dev/t2i?format=toy-64", json={**PROMPT, "steps": 15}, headers=srv.auth)
        assert r.status_code == 503 and r.json()["error"] == "capacity_exhausted"
        srv.services.broker.cancel(job["id"])
        srv.wait_for(job["id"])
        # the worker is free again: sync requests go through
        r = srv.client.post("/image/flux/dev/t2i?format=toy-64", json={**PROMPT, "steps": 15}, headers=srv.auth)
        assert r.status_code == 200


class MeasuredBusyWorker(StalledWorker):
    """Busy, with measured step times: flux/dev takes 0.5 s a step per toy-64 image, other models unmeasured."""

    def estimate(self, model, steps, megapixels):
        return 0.5 * steps * megapixels / (64 * 64 / 1e6) if model == "flux/dev" else None


def test_queued_eta_sums_measured_step_times_of_the_jobs_ahead(tmp_path, engine):
    with running_server(tmp_path, engine, worker=MeasuredBusyWorker(), sync_wait_s=0.05) as srv:
        first = srv.client.post("/queue", json=queue_body(steps=20), headers=srv.auth).json()
        second = srv.client.post("/queue", json=queue_body(steps=40), headers=srv.auth).json()
        other = srv.client.post("/queue", json=queue_body(model="schnell"), headers=srv.auth).json()
        assert (first["eta_seconds"], second["eta_seconds"]) == (10, 30)
        assert other["eta_seconds"] == 34  # 10 + 20 + schnell unmeasured: the average job time (4 s)
        # toy-96x64 has 1.5 times the pixels of toy-64: 20 steps take 15 s instead of 10
        bigger = srv.client.post("/queue", json=queue_body(steps=20, format="toy-96x64"), headers=srv.auth).json()
        assert bigger["eta_seconds"] == 34 + 15


def test_a_job_whose_every_output_was_withheld_answers_200_without_output(busy):
    """What the worker stores when the safety checker withheld every output (WaveSpeed's
    ``enable_safety_checker``): no output path. The job is complete, and there is nothing to redirect to."""
    job = busy.client.post("/queue", json=queue_body(), headers=busy.auth).json()
    broker = busy.services.broker
    claimed = broker.claim("w")
    assert claimed is not None and claimed.id == job["id"]
    broker.complete(job["id"], "", {"outputs": [], "seed": 7, "duration_ms": 3, "width": 64, "height": 64,
                                    "nsfw": [True]}, lease=claimed.lease)
    r = busy.client.get(f"/jobs/{job['id']}", headers=busy.auth, follow_redirects=False)
    assert r.status_code == 200 and "location" not in r.headers, r.text
    body = r.json()
    assert body["status"] == "complete" and "output" not in body and body["outputs"] == [] and body["seed"] == 7
    with busy.client.stream("GET", f"/jobs/{job['id']}/events", headers=busy.auth) as events:
        ((_, name, data),) = [e for e in read_events(events) if e[1] != "started"]
    assert name == "complete" and "output" not in data and data["outputs"] == []


@pytest.mark.parametrize(("model", "status"), [("dev", 200), ("mini", 200), ("schnell", 400), ("dev2", 400)])
def test_negative_prompt_on_the_models_that_take_one(server, model, status):
    steps = {"dev": 15, "mini": 4, "schnell": 4, "dev2": None}[model]
    body = {**PROMPT, "negative_prompt": "blurry, text", "seed": 1, **({"steps": steps} if steps else {})}
    r = server.client.post(f"/image/flux/{model}/t2i?format=toy-64", json=body, headers=server.auth)
    assert r.status_code == status, r.text
    if status == 400:
        error = r.json()
        assert error["error"] == "invalid_parameters" and "negative prompt" in error["message"]
        assert "flux/dev" in error["message"] and "flux/mini" in error["message"]
        assert error["details"]["field"] == "negative_prompt"
    else:
        plain = server.client.post(f"/image/flux/{model}/t2i?format=toy-64", json={**body, "negative_prompt": None},
                                   headers=server.auth)
        assert plain.status_code == 200 and plain.content != r.content  # it changed the picture
