"""The WaveSpeed-style door (v2 and v3): envelopes, parameters, limits, sync mode and webhooks."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from api_helpers import FileServer, Receiver, StalledWorker, running_server
from helpers import mask_png, png

pytestmark = pytest.mark.slow

MINI = "kiln/flux-mini"  # the catalog maps this path to flux/mini
VERSIONS = ("v3", "v2")
FAST = {"prompt": "a red circle on a blue background", "size": "512*512", "num_inference_steps": 4}
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine):
    with running_server(tmp_path_factory.mktemp("wavespeed"), engine) as srv:
        yield srv


@pytest.fixture
def idle(tmp_path, engine):
    with running_server(tmp_path, engine, worker=StalledWorker(), wavespeed_max_concurrent=2,
                        wavespeed_sync_wait_s=0.05) as srv:
        yield srv


def submit(srv, path=MINI, version="v3", headers=None, **body):
    return srv.client.post(f"/api/{version}/{path}", json=body, headers=srv.auth if headers is None else headers)


def image_of(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def check_task(data: dict, version: str, *, status: str, model: str = MINI) -> None:
    """Every documented field, with its type."""
    timing = {"v3": "timings", "v2": "executionTime"}[version]
    assert set(data) == {"id", "model", "outputs", "urls", "has_nsfw_contents", "status", "created_at", "error", timing}
    assert data["model"] == model and data["status"] == status and ISO_MS.fullmatch(data["created_at"])
    assert data["urls"] == {"get": f"http://127.0.0.1:8080/api/{version}/predictions/{data['id']}/result"}
    assert data["has_nsfw_contents"] == [False] * len(data["outputs"]) and isinstance(data["error"], str)
    elapsed = data["timings"]["inference"] if version == "v3" else data["executionTime"]
    assert isinstance(elapsed, int) and elapsed >= 0
    if status != "completed":
        assert data["outputs"] == []


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_submit_then_query_the_result(server, version):
    r = submit(server, version=version, **FAST, seed=4)
    assert r.status_code == 200, r.text
    envelope = r.json()
    assert (envelope["code"], envelope["message"]) == (200, "success")
    check_task(envelope["data"], version, status=envelope["data"]["status"])
    assert envelope["data"]["status"] in ("created", "processing", "completed")
    server.wait_for(envelope["data"]["id"])
    r = server.client.get(f"/api/{version}/predictions/{envelope['data']['id']}/result", headers=server.auth)
    assert r.status_code == 200 and r.json()["code"] == 200
    done = r.json()["data"]
    check_task(done, version, status="completed")
    assert done["error"] == "" and len(done["outputs"]) == 1 and done["outputs"][0].endswith(".jpg")
    cdn = server.client.get(done["outputs"][0].removeprefix("http://127.0.0.1:8080"))
    assert cdn.headers["content-type"] == "image/jpeg" and image_of(cdn.content).size == (512, 512)
    other = {"v3": "v2", "v2": "v3"}[version]  # the same task through the other version's route
    check_task(server.client.get(f"/api/{other}/predictions/{done['id']}/result", headers=server.auth).json()["data"],
               other, status="completed")


def test_sync_mode_base64_png_and_num_images(server):
    r = submit(server, **FAST, seed=9, num_images=2, output_format="png", enable_base64_output=True,
               enable_sync_mode=True, enable_safety_checker=False)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    check_task(data, "v3", status="completed")
    images = [image_of(base64.b64decode(o)) for o in data["outputs"]]
    assert [(i.format, i.size) for i in images] == [("PNG", (512, 512))] * 2
    assert images[0].tobytes() != images[1].tobytes()  # seeds 9 and 10
    again = submit(server, **FAST, seed=9, num_images=2, output_format="png", enable_base64_output=True,
                   enable_sync_mode=True)
    assert again.json()["data"]["outputs"] == data["outputs"]  # the same seed: the same pixels
    webp = submit(server, **FAST, output_format="webp", enable_sync_mode=True).json()["data"]
    assert webp["outputs"][0].endswith(".webp")


def test_image_to_image_and_edit(server):
    raw = base64.b64encode(png(512, 512)).decode()
    for image in (raw, "data:image/png;base64," + raw):
        r = submit(server, **FAST, image=image, strength=0.5, enable_sync_mode=True)
        assert r.json()["data"]["status"] == "completed", r.text
    mask = base64.b64encode(mask_png(512, 512)).decode()
    r = submit(server, **FAST, image=raw, mask_image=mask, enable_sync_mode=True)
    assert r.json()["data"]["status"] == "completed", r.text
    # v3's example sends an empty image with a strength: text to image
    assert submit(server, **FAST, image="", strength=0.8, enable_sync_mode=True).json()["data"]["status"] == "completed"


@pytest.mark.parametrize(("version", "size"), [("v3", "640*384"), ("v3", "256*1000"), ("v2", "1024*768")])
def test_any_size_in_the_models_range(server, version, size):
    """Not only the catalog's formats: any WIDTH*HEIGHT the version and the model's ``sizes`` allow,
    exactly that size (generated at the architecture's multiple and centre-cropped)."""
    r = submit(server, version=version, **{**FAST, "size": size}, enable_sync_mode=True, output_format="png")
    assert r.status_code == 200 and r.json()["data"]["status"] == "completed", r.text
    url = r.json()["data"]["outputs"][0]
    cdn = server.client.get(url.removeprefix("http://127.0.0.1:8080"))
    assert image_of(cdn.content).size == tuple(int(side) for side in size.split("*"))


@pytest.mark.parametrize(("version", "body", "status", "words"), [
    ("v3", {"size": "1024x1024"}, 400, "WIDTH*HEIGHT"),
    ("v3", {"size": "128*512"}, 400, "256 to 1536"),
    ("v2", {"size": "256*256"}, 400, "512 to 1536"),
    ("v3", {"size": "1536*1536"}, 400, "not offered"),  # v3 allows it; flux/mini's sizes stop at 1024
    ("v3", {"size": "1536*1024"}, 400, "sizes: 512*512, 1024*1024"),
    ("v3", {"size": "1536*1024"}, 400, "or each side 256 to 1024"),
    ("v3", {"num_images": 5}, 400, "num_images"),
    ("v3", {"num_images": 0}, 400, "num_images"),
    ("v3", {"num_inference_steps": 51}, 400, "num_inference_steps"),
    ("v3", {"num_inference_steps": 30}, 400, "between 4 and 24"),  # flux/mini's own range
    ("v2", {"guidance_scale": 10.5}, 400, "guidance_scale"),
    ("v3", {"strength": 1.5}, 400, "strength"),
    ("v3", {"strength": 0, "image": base64.b64encode(png(64, 64)).decode()}, 400, "strength 0"),
    ("v3", {"seed": -2}, 400, "seed"),
    ("v3", {"seed": 2_147_483_648}, 400, "seed"),
    ("v3", {"loras": [{"path": "a/b", "scale": 1}] * 4}, 400, "loras"),
    ("v2", {"loras": [{"path": "a/b", "scale": 1}] * 6}, 400, "loras"),
    ("v2", {"loras": [{"path": "not a repo", "scale": 1}]}, 400, "Hugging Face repo id"),
    ("v3", {"loras": [{"path": "a/b", "scale": 4.5}]}, 400, "scale"),
    ("v3", {"loras": [{"path": "a/b"}]}, 400, "scale"),
    ("v3", {"output_format": "gif"}, 400, "output_format"),
    ("v3", {"colour": "red"}, 400, "colour"),
    ("v3", {"prompt": None}, 400, "prompt"),
    ("v3", {"prompt": "ab"}, 400, "prompt"),
    ("v2", {"prompt": ""}, 400, "prompt"),
    ("v3", {"mask_image": base64.b64encode(png(64, 64)).decode()}, 400, "mask_image needs an image"),
    ("v3", {"image": "not base64 !"}, 400, "base64"),
    ("v3", {"image": base64.b64encode(b"not an image").decode()}, 400, "could not be read"),
    ("v3", {"image": "ftp://example.com/x.png"}, 400, "image"),
])
def test_bad_parameters(server, version, body, status, words):
    data = {**FAST, **body}
    r = server.client.post(f"/api/{version}/{MINI}", json={k: v for k, v in data.items() if v is not None},
                           headers=server.auth)
    assert r.status_code == status, r.text
    assert r.json()["code"] == status and r.json()["data"] is None and words in r.json()["message"], r.text


def test_v2_takes_larger_seeds_than_v3(server):
    assert submit(server, version="v2", **FAST, seed=2**32 - 1).status_code == 200


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("wavespeed-ai/nope", None, 404),
    (MINI, {}, 401),
    (MINI, {"Authorization": "Bearer nonsense"}, 401),
])
def test_unknown_models_and_keys(server, path, headers, status):
    r = submit(server, path=path, headers=headers, **FAST)
    assert r.status_code == status and r.json()["code"] == status and r.json()["data"] is None


@pytest.mark.parametrize(("method", "path", "content"), [
    ("POST", f"/api/v3/{MINI}", b"{not json"),
    ("POST", f"/api/v3/{MINI}", b"[1, 2]"),
    ("GET", "/api/v3/predictions/j_missing/result", b""),
    ("GET", "/api/v3/nothing/here", b""),
    ("DELETE", "/api/v2/predictions/x/result", b""),
])
def test_whatever_a_client_sends_is_answered_in_the_envelope(server, method, path, content):
    r = server.client.request(method, path, content=content, headers={**server.auth, "content-type": "application/json"})
    assert r.status_code in (400, 404, 405) and set(r.json()) == {"code", "message", "data"}, r.text


def test_a_task_is_only_its_keys(server):
    task = submit(server, **FAST).json()["data"]["id"]
    other = server.services.keys.create("other").secret
    r = server.client.get(f"/api/v3/predictions/{task}/result", headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 404


def test_model_paths_come_from_the_catalog(idle):
    r = submit(idle, path="wavespeed-ai/flux-dev", prompt="a red circle", size="512*512")
    assert r.status_code == 200, r.text
    request = idle.services.broker.get(r.json()["data"]["id"]).payload["request"]
    # the reference's flux-dev defaults, from [dialects.wavespeed] in the catalog
    assert (request["family"], request["model"], request["steps"], request["guidance"]) == ("flux", "dev", 28, 5.0)
    assert (request["format"], request["encoding"], request["task"]) == ("512", "jpeg", "t2i")
    # a three-part path resolves too; a size that is no format goes as pixels when the model takes it
    r = submit(idle, path="wavespeed-ai/z-image/turbo", prompt="a red circle", size="1280*256")
    assert r.status_code == 200, r.text
    request = idle.services.broker.get(r.json()["data"]["id"]).payload["request"]
    assert (request["model"], request.get("format"), request["width"], request["height"]) == ("turbo", None, 1280, 256)


def test_sync_mode_answers_the_task_as_it_is_when_the_wait_runs_out(idle):
    r = submit(idle, **FAST, enable_sync_mode=True)
    assert r.status_code == 200 and r.json()["data"]["status"] == "created"


def test_failed_and_processing_tasks(idle):
    broker = idle.services.broker
    first = submit(idle, **FAST).json()["data"]["id"]
    second = submit(idle, **FAST).json()["data"]["id"]
    broker.claim("w")
    broker.report_progress(first, 1, 4)
    data = idle.client.get(f"/api/v3/predictions/{first}/result", headers=idle.auth).json()["data"]
    check_task(data, "v3", status="processing")
    broker.fail(first, "out_of_memory", "flux/mini ran out of memory")
    broker.cancel(second)
    for task, error in ((first, "flux/mini ran out of memory"), (second, "the task was cancelled")):
        data = idle.client.get(f"/api/v2/predictions/{task}/result", headers=idle.auth).json()["data"]
        check_task(data, "v2", status="failed")
        assert data["error"] == error


def test_concurrency_limit_per_key(idle):
    ids = [submit(idle, **FAST).json()["data"]["id"] for _ in range(2)]
    r = submit(idle, **FAST)
    assert r.status_code == 429 and r.json()["code"] == 429 and "unfinished" in r.json()["message"]
    other = idle.services.keys.create("other").secret  # another key has its own allowance
    assert submit(idle, headers={"Authorization": f"Bearer {other}"}, **FAST).status_code == 200
    idle.services.broker.cancel(ids[0])
    assert submit(idle, **FAST).status_code == 200


def test_rate_limit_per_key(tmp_path, engine):
    with running_server(tmp_path, engine, worker=StalledWorker(), wavespeed_rate_per_min=2) as srv:
        assert [submit(srv, **FAST).status_code for _ in range(2)] == [200, 200]
        r = submit(srv, **FAST)
        assert r.status_code == 429 and r.json()["code"] == 429 and int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-limit"] == "2"
        # the render API's own rate for the key is not spent by this door
        assert srv.client.get("/models", headers=srv.auth).headers["x-ratelimit-remaining"] == "99"


def test_defaults_are_the_references():
    from kiln.settings import Settings

    settings = Settings()
    assert (settings.wavespeed_rate_per_min, settings.wavespeed_max_concurrent) == (120, 20)


@pytest.mark.parametrize(("version", "strength"), [("v2", 0.6), ("v3", 0.8)])
def test_parameter_defaults_are_each_versions(idle, version, strength):
    """Left out: size 1024*1024, seed -1 (random: drawn when the task runs), strength per version,
    jpeg, one image."""
    image = base64.b64encode(png(64, 64)).decode()
    r = submit(idle, version=version, prompt="a red circle on a blue background", image=image)
    assert r.status_code == 200, r.text
    request = idle.services.broker.get(r.json()["data"]["id"]).payload["request"]
    assert (request["format"], request["strength"], request["encoding"], request["num_outputs"]) == ("1024", strength, "jpeg", 1)
    assert "seed" not in request
    r = submit(idle, version=version, prompt="a red circle on a blue background", seed=-1)
    assert "seed" not in idle.services.broker.get(r.json()["data"]["id"]).payload["request"]


def test_credits(idle):
    broke = idle.services.keys.create("broke", credits=0).secret
    r = submit(idle, headers={"Authorization": f"Bearer {broke}"}, **FAST)
    assert r.status_code == 402 and r.json()["code"] == 402


def test_webhook_gets_the_finished_task(tmp_path, engine):
    receiver = Receiver(fail_first=0)
    try:
        with running_server(tmp_path, engine, allow_private_fetch=True) as srv:
            r = srv.client.post(f"/api/v2/{MINI}", params={"webhook": receiver.url}, json=FAST, headers=srv.auth)
            assert r.status_code == 200, r.text
            assert receiver.done.wait(60)
            (sent,) = [json.loads(body) for _, body, _ in receiver.calls]
            assert sent["code"] == 200 and sent["data"]["id"] == r.json()["data"]["id"]
            check_task(sent["data"], "v2", status="completed")
            bad = srv.client.post(f"/api/v3/{MINI}", params={"webhook": "ftp://x/y"}, json=FAST, headers=srv.auth)
            assert bad.status_code == 400 and "webhook" in bad.json()["message"]
    finally:
        receiver.close()


@pytest.mark.parametrize(("path", "body", "message"), [
    (MINI, {"num_inference_steps": 30}, "num_inference_steps must be between 4 and 24 for kiln/flux-mini, got 30"),
    ("wavespeed-ai/flux-dev", {"num_inference_steps": 28, "guidance_scale": 6.0},
     "guidance_scale must be between 2.0 and 5.0 for wavespeed-ai/flux-dev"),
    ("wavespeed-ai/flux-schnell", {"num_inference_steps": 8}, "num_inference_steps is fixed at 4"),
    ("wavespeed-ai/flux-schnell", {"num_inference_steps": 4, "guidance_scale": 2.0}, "guidance_scale is fixed at 3.5"),
    (MINI, {"image": base64.b64encode(png(512, 512)).decode(), "mask_image": base64.b64encode(mask_png(64, 64)).decode()},
     "mask_image is 64*64 but image is 512*512"),
    (MINI, {"image": base64.b64encode(png(512, 512)).decode(), "mask_image": base64.b64encode(b"not an image").decode()},
     "mask_image could not be read"),
])
def test_errors_name_this_apis_parameters(server, path, body, message):
    """The catalog's ranges are the render API's, but the message names what this client sent."""
    r = submit(server, path=path, **{**FAST, **body})
    assert r.status_code == 400 and message in r.json()["message"], r.text
    assert not re.search(r"\b(steps|guidance|mask)\b", r.json()["message"]), r.text  # the render API's names


def test_a_schnell_lora_path_says_which_paths_take_loras(server):
    r = submit(server, path="wavespeed-ai/flux-schnell-lora", **FAST, loras=[{"path": "kiln/pastel", "scale": 1}])
    assert r.status_code == 400 and r.json()["data"] is None, r.text
    message = r.json()["message"]
    assert "wavespeed-ai/flux-schnell-lora runs flux/schnell on this server, which takes no LoRAs" in message
    assert "distilled" in message and "wavespeed-ai/flux-dev-lora" in message and MINI in message


@pytest.fixture(scope="module")
def local(tmp_path_factory, engine):
    """Fetches from 127.0.0.1 allowed, and a prompt filter."""
    rules = tmp_path_factory.mktemp("rules") / "filter.txt"
    rules.write_text("forbidden\n", encoding="utf-8")
    with running_server(tmp_path_factory.mktemp("local"), engine, allow_private_fetch=True,
                        prompt_filter_file=rules) as srv:
        yield srv


def test_a_filtered_prompt_is_403_in_the_envelope(local):
    for version in VERSIONS:
        r = submit(local, version=version, **{**FAST, "prompt": "a FORBIDDEN red circle"})
        assert r.status_code == 403, r.text
        assert r.json() == {"code": 403, "message": "the prompt was refused by this server's content policy",
                            "data": None}


def test_an_image_by_http_url(local):
    files = FileServer({"/in.png": png(512, 512, (40, 40, 200))})
    try:
        r = submit(local, **FAST, image=f"{files.url}/in.png", strength=0.5, enable_sync_mode=True, seed=2)
        assert r.status_code == 200 and r.json()["data"]["status"] == "completed", r.text
        assert files.hits == {"/in.png": 1}
        missing = submit(local, **FAST, image=f"{files.url}/missing.png", strength=0.5)
        assert missing.status_code == 400 and "image" in missing.json()["message"], missing.text
    finally:
        files.close()
