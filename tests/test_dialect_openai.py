"""The OpenAI Images door, driven by the official ``openai`` package against the app in process."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

from api_helpers import StalledWorker, running_server
from helpers import png

try:  # the HTTP library the installed openai package is built on (recent releases: httpx2)
    import httpx2 as http
except ImportError:  # pragma: no cover - older openai releases
    import httpx as http

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a blue background"
SMALL = "64x64"  # flux/mini's small test format (tests add it to the catalog)


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine):
    with running_server(tmp_path_factory.mktemp("openai"), engine) as srv:
        yield srv


def client_for(server, key: str | None = None) -> openai.OpenAI:
    """The official client, its HTTP requests handed to the in-process app."""

    def forward(request: http.Request) -> http.Response:
        r = server.client.request(request.method, str(request.url), content=request.content,
                                  headers=[(k, v) for k, v in request.headers.multi_items() if k.lower() != "host"])
        headers = [(k, v) for k, v in r.headers.multi_items() if k.lower() not in ("content-length", "content-encoding")]
        return http.Response(r.status_code, headers=headers, content=r.content)

    return openai.OpenAI(base_url="http://kiln.test/v1", api_key=key or server.key, max_retries=0,
                         http_client=http.Client(transport=http.MockTransport(forward)))


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


def pixels(data: bytes) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(io.BytesIO(data)) as img:
        return img.format, img.size, img.convert("RGB").tobytes()


def test_generate_url_is_a_permanent_png(server, client):
    result = client.images.generate(model="flux/mini", prompt=PROMPT, size=SMALL, extra_body={"seed": 7})
    assert result.created > 0 and result.output_format == "png" and result.size == SMALL
    (image,) = result.data
    assert image.url.startswith("http://127.0.0.1:8080/i/") and image.url.endswith(".png") and image.b64_json is None
    cdn = server.client.get(image.url.removeprefix("http://127.0.0.1:8080"))
    assert cdn.status_code == 200 and pixels(cdn.content)[:2] == ("PNG", (64, 64))


def test_b64_json_n_and_output_format(client):
    result = client.images.generate(model="flux/mini", prompt=PROMPT, size=SMALL, n=2, response_format="b64_json",
                                    output_format="jpeg", extra_body={"seed": 7})
    assert result.output_format == "jpeg" and len(result.data) == 2
    decoded = [pixels(base64.b64decode(d.b64_json)) for d in result.data]
    assert [d[:2] for d in decoded] == [("JPEG", (64, 64))] * 2
    assert decoded[0][2] != decoded[1][2]  # seed 7 and seed 8
    webp = client.images.generate(model="flux/mini", prompt=PROMPT, size=SMALL, response_format="b64_json",
                                  output_format="webp", extra_body={"seed": 8})
    assert pixels(base64.b64decode(webp.data[0].b64_json))[0] == "WEBP"


def test_same_seed_same_pixels_and_defaults(client):
    one = client.images.generate(model="flux/mini", prompt=PROMPT, size=SMALL, response_format="b64_json",
                                 extra_body={"seed": 11})
    two = client.images.generate(prompt=PROMPT, size=SMALL, response_format="b64_json", extra_body={"seed": 11})
    assert one.data[0].b64_json == two.data[0].b64_json  # no model: the catalog's default, flux/mini
    auto = client.images.generate(prompt=PROMPT, size="auto", response_format="b64_json", extra_body={"seed": 11})
    assert pixels(base64.b64decode(auto.data[0].b64_json))[1] == (512, 512)  # flux/mini's first format


def test_edit_without_and_with_a_mask(client):
    image = png(64, 64)
    plain = client.images.edit(image=("in.png", image, "image/png"), prompt=PROMPT, model="flux/mini", size=SMALL,
                               response_format="b64_json", extra_body={"seed": 5})
    assert pixels(base64.b64decode(plain.data[0].b64_json))[:2] == ("PNG", (64, 64))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: regenerated
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    masked = client.images.edit(image=("in.png", image, "image/png"), mask=("mask.png", buf.getvalue(), "image/png"),
                                prompt=PROMPT, model="flux/mini", size=SMALL, response_format="b64_json",
                                extra_body={"seed": 5})
    assert pixels(base64.b64decode(masked.data[0].b64_json))[:2] == ("PNG", (64, 64))
    assert masked.data[0].b64_json != plain.data[0].b64_json  # an edit, not the i2i
    from kiln.api.dialects.openai import _mask_from_alpha

    with Image.open(io.BytesIO(_mask_from_alpha(buf.getvalue()))) as kiln_mask:  # white: regenerated
        assert kiln_mask.mode == "L" and kiln_mask.getpixel((32, 32)) == 255 and kiln_mask.getpixel((1, 1)) == 0


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert "flux/mini" in ids and "flux/dev" in ids and "wan/default" not in ids
    # OpenAI's names from the catalog's [dialects.openai], after the catalog's own
    assert {"gpt-image-1", "gpt-image-1-mini", "dall-e-2", "dall-e-3"} <= set(ids)
    assert ids.index("flux/mini") < ids.index("gpt-image-1")
    model = client.models.retrieve("flux/mini")
    assert (model.id, model.object, model.owned_by) == ("flux/mini", "model", "kiln")
    assert client.models.retrieve("dall-e-3").id == "dall-e-3"
    for missing in ("wan/default", "dall-e-4"):
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve(missing)
        assert info.value.body["code"] == "model_not_found"


class RecordingWorker(StalledWorker):
    """Takes each sync request at once and fails it; keeps the requests it saw."""

    def __init__(self) -> None:
        self.requests = []

    def submit_sync(self, request, **kwargs):
        from kiln.errors import GenerationError
        from kiln.worker import SyncTicket

        self.requests.append(request)
        ticket = SyncTicket(request)
        ticket.started.set_result(None)
        ticket.done.set_exception(GenerationError("recorded, not run"))
        return ticket

    def withdraw(self, ticket):
        return False


def test_openai_model_names_are_catalog_models(tmp_path, engine):
    """A client written for OpenAI keeps its model name: the request is the catalog model's, to the bit."""
    worker = RecordingWorker()
    with running_server(tmp_path, engine, worker=worker) as srv:
        client = client_for(srv)
        for name, key in (("gpt-image-1", "flux/dev"), ("dall-e-3", "flux/dev"), ("dall-e-2", "flux/schnell"),
                          ("gpt-image-1-mini", "flux/schnell")):
            for model in (name, key):
                with pytest.raises(openai.InternalServerError):
                    client.images.generate(model=model, prompt=PROMPT, size="1024x1024", extra_body={"seed": 4})
            by_name, by_key = worker.requests[-2:]
            assert by_name == by_key and f"{by_name.family}/{by_name.model}" == key
        with pytest.raises(openai.InternalServerError):
            client.images.edit(image=("in.png", png(64, 64), "image/png"), prompt=PROMPT, model="dall-e-2",
                               size="256x256")
        edit = worker.requests[-1]
        assert (edit.family, edit.model, edit.task, edit.width, edit.height) == ("flux", "schnell", "i2i", 256, 256)


def test_a_size_that_is_no_format_comes_back_exactly_that_size(client):
    result = client.images.generate(model="flux/mini", prompt=PROMPT, size="320x256", response_format="b64_json",
                                    extra_body={"seed": 3})
    assert result.size == "320x256"
    assert pixels(base64.b64decode(result.data[0].b64_json))[:2] == ("PNG", (320, 256))


@pytest.mark.parametrize(("kwargs", "param", "code"), [
    ({"size": "2048x2048"}, "size", "unsupported_format"),  # past flux/mini's sizes (256-1024 a side)
    ({"size": "255x512"}, "size", "unsupported_format"),
    ({"size": "big"}, "size", "unsupported_format"),
    ({"n": 5}, "n", "invalid_parameters"),
    ({"n": "2"}, "n", "invalid_parameters"),  # JSON numbers are integers, as OpenAI's API takes them
    ({"n": True}, "n", "invalid_parameters"),
    ({"n": 2.0}, "n", "invalid_parameters"),
    ({"extra_body": {"seed": "7"}}, "seed", "invalid_parameters"),
    ({"quality": "hd"}, "quality", "invalid_parameters"),
    ({"style": "vivid"}, "style", "invalid_parameters"),
    ({"output_compression": 50}, "output_compression", "invalid_parameters"),
    ({"background": "transparent"}, "background", "invalid_parameters"),
    ({"response_format": "bytes"}, "response_format", "invalid_parameters"),
    ({"prompt": "x" * 5001}, "prompt", "invalid_prompt"),
    ({"prompt": "ab"}, "prompt", "invalid_prompt"),
    ({"extra_body": {"seed": -1}}, "seed", "invalid_parameters"),
    ({"model": "wan/default"}, "model", "invalid_parameters"),
])
def test_bad_requests_are_400_in_openai_shape(client, kwargs, param, code):
    kwargs = {"model": "flux/mini", "prompt": PROMPT, "size": SMALL, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(**kwargs)
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}
    assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", param, code)
    assert body["message"] and "Traceback" not in body["message"]


@pytest.mark.parametrize("model", ["flux/nope", "dall-e-4"])
def test_unknown_model_is_404(client, model):
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model=model, prompt=PROMPT)
    assert (info.value.body["code"], info.value.body["param"]) == ("model_not_found", "model")
    if "/" not in model:  # the names it could have sent
        assert "gpt-image-1" in info.value.body["message"] and "flux/mini" in info.value.body["message"]


def test_keys_credits_and_rate(server):
    with pytest.raises(openai.AuthenticationError) as info:
        client_for(server, "kiln_sk_" + "a" * 43).images.generate(model="flux/mini", prompt=PROMPT, size=SMALL)
    assert info.value.body["code"] == "invalid_api_key"
    broke = server.services.keys.create("broke", credits=0).secret
    with pytest.raises(openai.RateLimitError) as info:
        client_for(server, broke).images.generate(model="flux/mini", prompt=PROMPT, size=SMALL)
    assert (info.value.body["type"], info.value.body["code"]) == ("insufficient_quota", "insufficient_quota")
    slow = client_for(server, server.services.keys.create("slow", rate_per_min=1).secret)
    slow.models.list()
    with pytest.raises(openai.RateLimitError) as info:
        slow.models.list()
    assert info.value.body["code"] == "rate_limit_exceeded" and int(info.value.response.headers["retry-after"]) >= 1


def test_prompt_filter_is_a_content_policy_violation(tmp_path, engine):
    rules = tmp_path / "filter.txt"
    rules.write_text("\\bforbidden\\b\n")
    with (running_server(tmp_path, engine, prompt_filter_file=rules, warmup=False) as srv,
          pytest.raises(openai.BadRequestError) as info):
        client_for(srv).images.generate(model="flux/mini", prompt="a forbidden thing", size=SMALL)
    assert info.value.body["code"] == "content_policy_violation"


@pytest.mark.parametrize(("files", "data", "param"), [
    ({}, {"prompt": PROMPT}, "image"),
    ({"image": ("in.png", b"not an image", "image/png")}, {"prompt": PROMPT, "size": SMALL}, "image"),
    ({"image": ("in.png", png(64, 64), "image/png"), "mask": ("m.png", png(64, 64), "image/png")},
     {"prompt": PROMPT, "size": SMALL}, "mask"),
    ({"image": ("in.png", png(64, 64), "image/png"), "mask": ("m.png", png(32, 32, (0, 0, 0, 0), "RGBA"), "image/png")},
     {"prompt": PROMPT, "size": SMALL}, "mask"),  # not the image's size
    ({"image": ("in.png", png(64, 64), "image/png")}, {"prompt": PROMPT, "n": "two"}, "n"),
    ({"image": ("in.png", png(64, 64), "image/png"), "extra": ("x.png", png(8, 8), "image/png")},
     {"prompt": PROMPT}, "extra"),
    ({"image": ("in.png", png(64, 64), "image/png")}, {"prompt": PROMPT, "colour": "red"}, "colour"),
])
def test_bad_edits(server, files, data, param):
    r = server.client.post("/v1/images/edits", files=files or {"x": (None, "")}, data=data, headers=server.auth)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [
    ("POST", "/v1/images/generations", {"content": b"{not json"}, 400),
    ("POST", "/v1/images/generations", {"content": b"[]"}, 400),
    ("POST", "/v1/images/edits", {"json": {"prompt": PROMPT}}, 400),
    ("GET", "/v1/nope", {}, 404),
    ("POST", "/v1/models", {}, 404),
])
def test_whatever_a_client_sends_is_answered_in_openai_shape(server, method, path, kwargs, status):
    r = server.client.request(method, path, headers=server.auth, **kwargs)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_missing_key(server):
    r = server.client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_capacity_exhausted_is_a_503_server_error(tmp_path, engine):
    with (running_server(tmp_path, engine, worker=StalledWorker(), sync_wait_s=0.05) as srv,
          pytest.raises(openai.InternalServerError) as info):
        client_for(srv).images.generate(model="flux/mini", prompt=PROMPT, size=SMALL)
    assert info.value.status_code == 503 and info.value.body["type"] == "server_error"
    assert info.value.response.headers["retry-after"] == "5"


def test_openapi_documents_every_door(server):
    doc = server.client.get("/openapi.json").json()
    generations = doc["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "model", "n", "size", "response_format", "output_format", "seed"} <= set(generations["properties"])
    edits = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert edits["properties"]["image"]["format"] == "binary" and "mask" in edits["properties"]
    for version, most in (("v2", 5), ("v3", 3)):
        op = doc["paths"][f"/api/{version}/{{model_path}}"]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["loras"]["maxItems"] == most and body["properties"]["loras"]["items"]["properties"]
        assert [p["name"] for p in op["parameters"]] == ["model_path", "webhook"]
        assert f"/api/{version}/predictions/{{task_id}}/result" in doc["paths"]
    vyro = doc["paths"]["/v2/image/generations"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert vyro["required"] == ["prompt", "style"]


def test_an_edits_form_takes_its_numbers_as_text(client):
    """Multipart fields are text: the official client sends ``n`` as ``"2"`` there, and it is read."""
    result = client.images.edit(image=("in.png", png(64, 64), "image/png"), prompt=PROMPT, model="flux/mini",
                                size=SMALL, n=2, response_format="b64_json", extra_body={"seed": 5})
    assert len(result.data) == 2


def test_a_mask_of_another_size_names_the_mask(client):
    mask = png(32, 32, (0, 0, 0, 0), "RGBA")
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("in.png", png(64, 64), "image/png"), mask=("m.png", mask, "image/png"),
                           prompt=PROMPT, model="flux/mini", size=SMALL)
    body = info.value.body
    assert (body["param"], body["code"]) == ("mask", "invalid_image") and "32x32" in body["message"], body
