"""Upscaling and detail (``upscale``, ``latent_upscale``, ``detail_enhance``): output sizes, real
img2img passes, determinism, progress and cancellation across passes, refusals, the render API.

The engine cases run flux/mini (real trained weights, ~0.1 s a call at 64x64 on a CPU) at the tests'
``toy-64`` format, so 4x is 256x256."""

from __future__ import annotations

import io
import re
import threading

import numpy as np
import pytest
from PIL import Image

from api_helpers import StalledWorker, running_server
from kiln.engine import GenerationRequest
from kiln.engine.refine import capped_shift
from kiln.engine.refinement import HIRES_STRENGTH, LATENT_STRENGTH, MAX_OUTPUT_SIDE, detail_denoise, pass_steps
from kiln.errors import GenerationCancelled, InvalidParameters

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a blue background"


def request(family="flux", model="mini", task="t2i", fmt="toy-64", **kw) -> GenerationRequest:
    return GenerationRequest.create(family=family, model=model, task=task, format=fmt, prompt=PROMPT, **kw)


def pixels(result, i: int = 0) -> np.ndarray:
    return np.asarray(result.outputs[i].image, dtype=np.int16)


# --- the plan: sizes, steps, refusals (no model runs) ------------------------------------------------


@pytest.mark.parametrize(("controls", "size"), [
    ({"upscale": 1.5}, (1536, 1536)),
    ({"upscale": 2}, (2048, 2048)),
    ({"upscale": 4}, (4096, 4096)),  # the reference's largest scale on its largest format: allowed
    ({"latent_upscale": 1.5}, (1536, 1536)),  # the reference's example: 1024 x 1.5 = 1536
    ({"detail_enhance": True}, (1024, 1024)),
    ({"latent_upscale": 1.5, "upscale": 2, "detail_enhance": True}, (3072, 3072)),
])
def test_planned_output_size_is_the_format_times_the_factors(engine, controls, size):
    plan = engine.plan(request("flux", "dev", fmt="1024", **controls))
    assert plan.output_size == size
    assert (plan.width, plan.height) == (1024, 1024)  # the base generation keeps the format's size


def test_planned_passes_and_their_steps(engine):
    plan = engine.plan(request(steps=8, latent_upscale=1.5, upscale=2, detail_enhance=True, detail_strength=0.3))
    passes = plan.refinement.passes
    assert [p.kind for p in passes] == ["latent_upscale", "upscale", "detail"]
    assert [(p.width, p.height) for p in passes] == [(96, 96), (192, 192), (192, 192)]
    assert [p.gen_width for p in passes] == [128, 192, 192]  # flux/mini generates at multiples of 64
    assert [p.strength for p in passes] == [LATENT_STRENGTH, HIRES_STRENGTH, detail_denoise(0.3)]
    assert passes[-1].sharpen == 24 and plan.refinement.detail_strength == 0.3
    assert plan.refinement.steps(8, 2) == 2 * sum(pass_steps(8, p.strength) for p in passes)
    assert engine.plan(request(detail_enhance=True)).refinement.detail_strength == 0.5  # the default


@pytest.mark.parametrize(("family", "model", "task", "controls", "message"), [
    ("wan", "default", "t2v", {"latent_upscale": 1.5}, "latent_upscale applies to image models; wan/default makes videos"),
    ("wan", "default", "t2v", {"detail_enhance": True}, "detail_enhance applies to image models"),
    ("flux", "dev2", "t2i", {"upscale": 2}, "flux/dev2's i2i (Flux2Pipeline) is reference-image conditioning"),
    ("zimage", "turbo", "t2i", {"latent_upscale": 2}, "latent_upscale needs an img2img pipeline that takes latents"),
    ("flux", "dev", "t2i", {"latent_upscale": 1.5, "upscale": 4}, f"is 6144x6144; outputs are at most {MAX_OUTPUT_SIDE}"),
    ("flux", "dev", "t2i", {"detail_strength": 0.5}, "detail_strength goes with detail_enhance: true"),
])
def test_refused_before_any_model_work(engine, family, model, task, controls, message):
    fmt = "toy-64" if family == "wan" else "1024"
    with pytest.raises(InvalidParameters, match=re.escape(message)):
        engine.plan(request(family, model, task, fmt=fmt, **controls))


def test_a_model_without_an_img2img_pipeline_is_refused(toys_dir):
    from kiln.catalog import parse_catalog
    from kiln.engine.plan import plan_request
    from kiln.testing.catalog import toy_catalog_dict

    raw = toy_catalog_dict(toys_dir, small_formats=True)
    for entry in raw["models"]:
        if entry["model"] == "dev":
            entry["pipelines"] = {"t2i": "FluxPipeline"}
    t2i_only = parse_catalog(raw, base_dir=toys_dir)
    with pytest.raises(InvalidParameters, match="upscale redraws the picture with the model's img2img pipeline, and "
                                                "flux/dev has none"):
        plan_request(request("flux", "dev", upscale=2), t2i_only)


# --- FLUX.1's size-dependent shift in large passes ------------------------------------------------


def test_passes_past_fluxs_fitted_size_keep_its_largest_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
              "max_shift": 1.15}
    assert capped_shift(config, 4096) == {} and capped_shift({**config, "use_dynamic_shifting": False}, 65536) == {}
    assert calculate_shift(65536, 256, 4096, 0.5, 1.15) > 11  # diffusers extrapolates: 4096x4096 FLUX
    capped = {**config, **capped_shift(config, 65536)}
    assert calculate_shift(65536, 256, capped["max_image_seq_len"], 0.5, 1.15) == pytest.approx(1.15)


def test_the_engine_gives_each_pass_its_shift(engine, monkeypatch):
    loaded = engine.load(engine.catalog.resolve("flux", "dev"))
    # as if 32 tokens were the largest size the toy's shift was fitted for: the 128x128 pass has 64
    monkeypatch.setitem(loaded._scheduler_config, "max_image_seq_len", 32)
    seen = []
    make = loaded.new_scheduler
    monkeypatch.setattr(loaded, "new_scheduler", lambda plan, **config: seen.append(config) or make(plan, **config))
    engine.generate(request("flux", "dev", steps=15, seed=1, upscale=2))
    assert seen == [{}, {"max_image_seq_len": 64}]


# --- the engine on flux/mini ------------------------------------------------------------------------


@pytest.mark.parametrize(("controls", "side"), [
    ({"upscale": 1.5}, 96), ({"upscale": 2}, 128), ({"upscale": 4}, 256),
    ({"latent_upscale": 1.5}, 96), ({"latent_upscale": 2}, 128),
    ({"detail_enhance": True}, 64), ({"detail_enhance": True, "detail_strength": 0.0}, 64),
    ({"latent_upscale": 1.5, "upscale": 2, "detail_enhance": True}, 192),
])
def test_outputs_have_the_planned_size_and_progress_reaches_the_total(engine, controls, side):
    events = []
    result = engine.generate(request(seed=3, **controls), on_step=events.append)
    image = result.outputs[0].image
    assert image.size == (side, side) and image.mode == "RGB" and (result.width, result.height) == (side, side)
    total = 8 + engine.plan(request(seed=3, **controls)).refinement.steps(8, 1)
    assert [e.step for e in events] == list(range(1, total + 1)) and {e.total for e in events} == {total}


def test_same_seed_same_bytes(engine):
    controls = {"latent_upscale": 1.5, "upscale": 2, "detail_enhance": True, "seed": 11}
    first = engine.generate(request(**controls)).outputs[0].encode("png")
    assert engine.generate(request(**controls)).outputs[0].encode("png") == first
    assert engine.generate(request(**{**controls, "seed": 12})).outputs[0].encode("png") != first


def test_upscale_redraws_rather_than_only_resizing(engine):
    base = engine.generate(request(seed=5)).outputs[0].image
    upscaled = engine.generate(request(seed=5, upscale=2))
    resized = np.asarray(base.resize((128, 128), Image.Resampling.LANCZOS), dtype=np.int16)
    difference = np.abs(pixels(upscaled) - resized).mean()
    other = engine.generate(request(seed=55)).outputs[0].image
    new_picture = np.abs(np.asarray(other.resize((128, 128), Image.Resampling.LANCZOS), dtype=np.int16) - resized).mean()
    # changed by the img2img pass, yet still the same picture (a low-strength redraw, not a new one):
    # a resize alone differs by 0, another seed's picture by much more. Measured with the 2026-12-06
    # flux/mini weights at this 64x64 format (2x2 latents, far below the 512 it was trained at): the
    # redraw 19.7 here (12-22 over seeds 1-7), seed 55's picture 74.2
    assert 0.3 < difference < 0.5 * new_picture


def test_latent_upscale_and_detail_change_the_picture(engine):
    base = engine.generate(request(seed=5)).outputs[0].image
    detailed = engine.generate(request(seed=5, detail_enhance=True, detail_strength=0.8))
    # without the pass both differences would be 0; measured 0.16-0.28 (detail) and 0.8-1.3 (latent)
    # over seeds 1-7, most of the picture being a flat background the redraw keeps
    assert np.abs(pixels(detailed) - np.asarray(base, dtype=np.int16)).mean() > 0.08
    latent = engine.generate(request(seed=5, latent_upscale=2))
    resized = np.asarray(base.resize((128, 128), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(pixels(latent) - resized).mean() > 0.3


@pytest.mark.parametrize(("controls", "encodes", "decodes"), [
    ({}, 0, 1),
    ({"detail_enhance": True}, 0, 1),  # the detail pass starts from the base's latents
    ({"latent_upscale": 2, "detail_enhance": True}, 0, 1),
    ({"upscale": 2}, 1, 2),  # the hires fix resizes pixels: decode, resize, encode
    ({"upscale": 2, "detail_enhance": True}, 1, 2),
])
def test_pictures_stay_latents_between_passes_that_take_latents(engine, monkeypatch, controls, encodes, decodes):
    vae = engine.load(engine.catalog.resolve("flux", "mini")).pipelines["i2i"].vae
    calls = {"encode": 0, "decode": 0}
    for name in calls:
        method = getattr(vae, name)
        monkeypatch.setattr(vae, name, lambda *a, _m=method, _n=name, **k: calls.__setitem__(_n, calls[_n] + 1) or _m(*a, **k))
    engine.generate(request(seed=1, **controls))
    assert calls == {"encode": encodes, "decode": decodes}


def test_output_i_of_a_batch_is_seed_plus_i_alone(engine):
    batch = engine.generate(request(seed=20, num_outputs=2, upscale=2))
    assert [o.image.size for o in batch.outputs] == [(128, 128)] * 2
    alone = pixels(engine.generate(request(seed=21, upscale=2)))
    # the same picture; a batch of two runs the base pass's kernels at another batch size, which moves a
    # pixel by a level at most (measured: 1); test_engine's batch rule allows two, and so does this
    assert np.abs(pixels(batch, 1) - alone).max() <= 2


def test_heun_counts_its_steps_once_in_every_pass(engine):
    events = []
    engine.generate(request(seed=2, sampler="heun", latent_upscale=2, detail_enhance=True), on_step=events.append)
    total = 8 + engine.plan(request(latent_upscale=2, detail_enhance=True)).refinement.steps(8, 1)
    assert [e.step for e in events] == list(range(1, total + 1)) and events[-1].total == total


def test_previews_follow_each_pass_size(engine):
    previews = []
    engine.generate(request(seed=4, upscale=4), on_step=lambda e: previews.append(e.preview.size), previews=True)
    assert previews[0] == (2, 2) and previews[-1] == (8, 8)  # latent resolution: 64 / 32, then 256 / 32


def test_cancel_in_a_refinement_pass_returns_no_output(engine):
    cancel = threading.Event()
    seen = []

    def on_step(event):
        seen.append(event.step)
        if event.step == 9:  # the first step after the 8 of the base generation
            cancel.set()

    with pytest.raises(GenerationCancelled):
        engine.generate(request(seed=1, upscale=2, detail_enhance=True), on_step=on_step, cancel=cancel)
    assert seen == list(range(1, 10))
    assert engine.generate(request(seed=1, upscale=2)).outputs  # the model still works


def test_another_architecture_takes_upscale_and_detail(engine):
    result = engine.generate(request("zimage", "turbo", steps=5, seed=1, upscale=2, detail_enhance=True))
    assert result.outputs[0].image.size == (128, 128)


# --- the render API -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, engine):
    with running_server(tmp_path_factory.mktemp("refine"), engine) as srv:
        yield srv


@pytest.mark.parametrize(("body", "side"), [
    ({"upscale": 2}, 128), ({"upscale": 1.5}, 96), ({"latent_upscale": 1.5}, 96),
    ({"detail_enhance": True, "detail_strength": 0.3}, 64),
])
def test_render_api_sync(server, body, side):
    r = server.client.post("/image/flux/mini/t2i?format=toy-64", json={"prompt": PROMPT, "seed": 3, **body},
                           headers=server.auth)
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.size == (side, side)


def test_the_references_examples_on_flux_dev(server):
    # "Detail Enhancement": its three bodies, on the toy FLUX.1 dev at the small format (the reference
    # uses 1024) with the model's fewest steps; latent_upscale's example names its format in the body: /queue
    for body, side in (({"prompt": "portrait", "upscale": 2}, 128),
                       ({"prompt": "portrait", "detail_enhance": True, "detail_strength": 0.5}, 64)):
        r = server.client.post("/image/flux/dev/t2i?format=toy-64", json={**body, "steps": 15}, headers=server.auth)
        assert r.status_code == 200, r.text
        with Image.open(io.BytesIO(r.content)) as img:
            assert img.size == (side, side)
    r = server.client.post("/queue", json={"prompt": "detailed landscape", "format": "toy-64", "latent_upscale": 1.5,
                                           "modality": "image", "family": "flux", "model": "dev", "task": "t2i",
                                           "steps": 15}, headers=server.auth)
    assert r.status_code == 202, r.text
    assert server.wait_for(r.json()["id"]).result["width"] == 96


def test_render_api_websocket_frames_cover_every_pass(server):
    with server.client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "auth", "token": server.key})
        ws.send_json({"type": "generate", "id": "u", "modality": "image", "family": "flux", "model": "mini",
                      "task": "t2i", "format": "toy-64", "prompt": PROMPT, "seed": 2, "upscale": 2,
                      "stream_frames": True})
        frames = []
        while (message := ws.receive_json())["type"] == "frame":
            frames.append(message)
    assert message["type"] == "complete", message
    total = 8 + pass_steps(8, HIRES_STRENGTH)
    assert [f["step"] for f in frames] == list(range(1, total + 1)) and {f["total_steps"] for f in frames} == {total}
    output = server.client.get(message["output"].removeprefix("http://127.0.0.1:8080"))
    with Image.open(io.BytesIO(output.content)) as img:
        assert img.size == (128, 128)


def test_render_api_queue_reports_the_upscaled_size(server):
    r = server.client.post("/queue", json={"prompt": PROMPT, "modality": "image", "family": "flux", "model": "mini",
                                           "task": "t2i", "format": "toy-64", "upscale": 4, "seed": 1},
                           headers=server.auth)
    assert r.status_code == 202, r.text
    job = server.wait_for(r.json()["id"])
    assert job.result["width"] == job.result["height"] == 256 and job.total_steps == 8 + pass_steps(8, HIRES_STRENGTH)


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/video/wan/default/t2v?format=toy-64", {"latent_upscale": 1.5, "duration": 0.5},
     "latent_upscale applies to image models"),
    ("/image/flux/dev2/t2i?format=1024", {"upscale": 2}, "reference-image conditioning"),
    ("/image/flux/dev/t2i?format=1024", {"latent_upscale": 1.5, "upscale": 4}, "at most 4096 px a side"),
    ("/image/flux/dev/t2i?format=1024", {"detail_strength": 0.5}, "detail_strength goes with detail_enhance"),
    ("/image/flux/dev/t2i?format=1024", {"upscale": 3}, "upscale"),
    ("/image/flux/dev/t2i?format=1024", {"latent_upscale": 8}, "latent_upscale"),
    ("/image/flux/dev/t2i?format=1024", {"detail_enhance": True, "detail_strength": 1.5}, "detail_strength"),
])
def test_render_api_refusals_are_400_in_its_error_schema(server, path, body, message):
    r = server.client.post(path, json={"prompt": PROMPT, **body}, headers=server.auth)
    assert r.status_code == 400, r.text
    data = r.json()
    assert data["error"] == "invalid_parameters" and message in data["message"], data


def test_render_api_accepts_4x_on_1024(tmp_path, engine):
    with running_server(tmp_path, engine, worker=StalledWorker()) as srv:  # accepted, never run (16 MP)
        r = srv.client.post("/queue", json={"prompt": PROMPT, "modality": "image", "family": "flux", "model": "dev",
                                            "task": "t2i", "format": "1024", "upscale": 4}, headers=srv.auth)
    assert r.status_code == 202, r.text
