"""What GET /models says a model offers beyond its catalog ranges (from the engine), and the render
API's precision field."""

from __future__ import annotations

import pytest
from api_helpers import running_server

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path, engine):
    with running_server(tmp_path, engine) as srv:
        yield srv


def test_models_list_precisions_strength_tasks_and_refinements(server):
    models = {f"{m['family']}/{m['model']}": m["info"] for m in server.client.get("/models", headers=server.auth).json()["models"]}
    assert models["flux/dev"]["refinements"] == ["upscale", "latent_upscale", "detail_enhance"]
    assert models["flux/dev"]["strength_tasks"] == ["edit", "i2i"]
    assert models["flux/dev2"]["refinements"] == [] and models["flux/dev2"]["strength_tasks"] == []  # reference conditioning
    assert models["zimage/turbo"]["refinements"] == ["upscale", "detail_enhance"]  # its i2i takes no latents
    assert models["wan/default"]["refinements"] == []
    assert all(info["precisions"] == ["native"] for info in models.values())  # no card here runs fp8


@pytest.mark.parametrize(("precision", "status", "words"), [
    ("native", 200, None),
    ("fp8", 400, "fp8"),
    ("fp16", 400, "precision"),
])
def test_the_precision_field(server, precision, status, words):
    r = server.client.post("/image/flux/dev/t2i?format=toy-64", headers=server.auth,
                           json={"prompt": "a red circle", "steps": 15, "precision": precision})
    assert r.status_code == status, r.text
    if words:
        assert r.json()["error"] == "invalid_parameters" and words in r.json()["message"], r.json()
