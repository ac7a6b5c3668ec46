"""The render API reference's curl examples, sent as curl sends them (``-d`` without a JSON
Content-Type unless the example sets one), against this server's origin with the toy models.

Deviations, each for a reason: image URLs on example.com cannot be fetched here (no network), so
i2i and i2v use an upload URL instead (the reference's upload-then-use flow); the video example
runs 0.5 s at 10 steps on the toy WAN instead of 3 s at the default steps, to keep CI fast.
"""

from __future__ import annotations

import pytest

from api_helpers import running_server
from helpers import png

pytestmark = pytest.mark.slow

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, engine):
    with running_server(tmp_path_factory.mktemp("ref"), engine) as server:
        yield server


def post(srv, path, data: str, json_type: bool = True):
    headers = {**srv.auth, **(JSON if json_type else {})}
    return srv.client.post(path, content=data.encode(), headers=headers)


def test_quick_example_and_sync_t2i(srv):
    r = post(srv, "/image/flux/schnell/t2i?format=1024", '{"prompt":"cyberpunk street at night, neon rain"}')
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp" and r.headers["content-location"]
    r = post(srv, "/image/flux/schnell/t2i?format=1024", '{ "prompt": "cyberpunk street at night", "guidance": 3.5, "seed": 42 }')
    assert r.status_code == 200 and r.headers["x-seed"] == "42"


def test_alias_examples_without_content_type(srv):
    r = post(srv, "/image/flux/latest/t2i?format=512", '{"prompt": "portrait", "steps": 15}', json_type=False)
    assert r.status_code == 200, r.text
    r = post(srv, "/image/flux/dev2/t2i?format=512", '{"prompt": "portrait", "steps": 15}', json_type=False)
    assert r.status_code == 200, r.text


def test_upload_then_i2i(srv):
    up = srv.client.post("/uploads", files={"file": ("portrait.jpg", png(120, 90), "image/png")}, headers=srv.auth)
    url = up.json()["url"]
    r = post(srv, "/image/flux/dev/i2i?format=512",
             '{ "prompt": "watercolor style", "image": "%s", "steps": 15 }' % url, json_type=False)
    assert r.status_code == 200, r.text
    r = post(srv, "/image/flux/dev/i2i?format=512",
             '{ "prompt": "convert to watercolor style", "image": "%s", "strength": 0.7, "steps": 15 }' % url)
    assert r.status_code == 200, r.text


def test_zimage_and_sampler_scheduler_examples(srv):
    assert post(srv, "/image/zimage/turbo/t2i?format=512", '{"prompt": "portrait"}').status_code == 200
    assert post(srv, "/image/flux/dev/t2i?format=512", '{ "prompt": "portrait", "sampler": "dpmpp_2m", "steps": 25 }').status_code == 200
    assert post(srv, "/image/flux/dev/t2i?format=512", '{ "prompt": "portrait", "scheduler": "simple", "steps": 25 }').status_code == 200


def test_video_example(srv):
    up = srv.client.post("/uploads", files={"file": ("portrait.png", png(64, 64), "image/png")}, headers=srv.auth)
    body = '{ "prompt": "she turns to face camera", "image": "%s", "duration": 0.5, "cfg": 7.0, "steps": 10 }' % up.json()["url"]
    r = post(srv, "/video/wan/default/i2v?format=480p", body)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert "/v/" in r.headers["content-location"]


def test_async_examples(srv):
    r = post(srv, "/queue", '{ "modality": "image", "family": "flux", "model": "schnell", "task": "t2i", "format": "1024", '
                            '"prompt": "cyberpunk cityscape" }')
    assert r.status_code == 202
    job = r.json()
    srv.wait_for(job["id"])
    done = srv.client.get(f"/jobs/{job['id']}", headers=srv.auth, follow_redirects=False)
    assert done.status_code == 303
    queued = post(srv, "/queue", '{ "modality": "image", "family": "flux", "model": "schnell", "task": "t2i", "format": "1024", '
                                 '"prompt": "portrait in natural lighting", "priority": "normal", "idempotency_key": "unique_key_123" }')
    assert queued.status_code == 202
    cancelled = srv.client.delete(f"/jobs/{queued.json()['id']}", headers=srv.auth)
    assert cancelled.status_code == 200


def test_discovery_examples(srv):
    for path in ("/models", "/models?family=flux", "/models?modality=video", "/models/aliases"):
        assert srv.client.get(path, headers=srv.auth).status_code == 200, path
