"""Every door is a translator onto the one canonical request: the same seed and parameters give the
same pixels whichever door a request comes through (compared losslessly, as PNG).

The render API answers in WebP (lossy) only, so its leg is compared as bytes: its WebP is exactly
the WebP encoding of the pixels the other doors return as PNG.
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from api_helpers import running_server
from helpers import png
from kiln.engine.encode import encode_image

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a blue background"
SEED = 42


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine):
    with running_server(tmp_path_factory.mktemp("doors"), engine) as srv:
        yield srv


def rgb(data: bytes, expected_format: str = "PNG") -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == expected_format
    return img.convert("RGB")


def test_text_to_image_through_every_door(server):
    c, auth = server.client, server.auth
    through: dict[str, bytes] = {}
    r = c.post("/v1/images/generations", headers=auth, json={
        "model": "flux/mini", "prompt": PROMPT, "size": "512x512", "response_format": "b64_json", "seed": SEED})
    through["openai"] = base64.b64decode(r.json()["data"][0]["b64_json"])
    for version in ("v2", "v3"):
        r = c.post(f"/api/{version}/kiln/flux-mini", headers=auth, json={
            "prompt": PROMPT, "size": "512*512", "seed": SEED, "output_format": "png",
            "enable_base64_output": True, "enable_sync_mode": True})
        assert r.json()["data"]["status"] == "completed", r.text
        through[f"wavespeed-{version}"] = base64.b64decode(r.json()["data"]["outputs"][0])
    r = c.post("/v2/image/generations", headers=auth,
               files={"prompt": (None, PROMPT), "style": (None, "flux-mini"), "aspect_ratio": (None, "1:1"),
                      "seed": (None, str(SEED))})
    through["vyro"] = r.content

    images = {door: rgb(data) for door, data in through.items()}
    reference = images["openai"]
    assert reference.size == (512, 512)
    for door, image in images.items():
        assert image.tobytes() == reference.tobytes(), f"{door} differs from openai"

    render = c.post("/image/flux/mini/t2i?format=512", headers=auth, json={"prompt": PROMPT, "seed": SEED})
    assert render.status_code == 200 and render.headers["content-type"] == "image/webp"
    assert render.content == encode_image(reference, "webp")


def test_an_edit_through_openai_and_wavespeed(server):
    """OpenAI's mask (transparent = edit) and WaveSpeed's (white = edit) reach the engine as one mask."""
    c, auth = server.client, server.auth
    image = png(512, 512, colour=(30, 90, 200))
    alpha_mask = Image.new("RGBA", (512, 512), (0, 0, 0, 255))
    alpha_mask.paste((0, 0, 0, 0), (128, 128, 384, 384))
    white_mask = Image.new("L", (512, 512), 0)
    white_mask.paste(255, (128, 128, 384, 384))
    encoded = {}
    for name, mask in (("alpha", alpha_mask), ("white", white_mask)):
        buf = io.BytesIO()
        mask.save(buf, "PNG")
        encoded[name] = buf.getvalue()

    r = c.post("/v1/images/edits", headers=auth, data={
        "model": "flux/mini", "prompt": PROMPT, "size": "512x512", "response_format": "b64_json", "seed": str(SEED),
    }, files={"image": ("in.png", image, "image/png"), "mask": ("mask.png", encoded["alpha"], "image/png")})
    assert r.status_code == 200, r.text
    openai_edit = rgb(base64.b64decode(r.json()["data"][0]["b64_json"]))
    r = c.post("/api/v3/kiln/flux-mini", headers=auth, json={
        "prompt": PROMPT, "size": "512*512", "seed": SEED, "output_format": "png", "enable_base64_output": True,
        "enable_sync_mode": True, "strength": 1.0,  # Kiln's edit default, which OpenAI's edit uses
        "image": base64.b64encode(image).decode(), "mask_image": base64.b64encode(encoded["white"]).decode()})
    assert r.json()["data"]["status"] == "completed", r.text
    wavespeed_edit = rgb(base64.b64decode(r.json()["data"]["outputs"][0]))
    assert openai_edit.tobytes() == wavespeed_edit.tobytes()
