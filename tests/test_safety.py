"""The image safety classifier: the toy Stable Diffusion checker's verdicts, its settings and load
errors, and what each door does with a flagged output (render API 403 ``nsfw_detected``, a failed job,
WaveSpeed's ``has_nsfw_contents`` with the output withheld, OpenAI's and Vyro's error codes).

API tests run the real worker and the real toy checker over :class:`PaintEngine`, which paints each
output the solid colour its prompt names, so "magenta" is flagged and "blue" is not, instantly.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageColor

from api_helpers import running_server
from kiln.catalog import load_catalog
from kiln.engine import Engine, GenerationResult, ImageOutput, VideoOutput
from kiln.engine.safety import ClipSafetyChecker, NoSafetyChecker, flag_outputs, load_safety_checker
from kiln.errors import ModelLoadFailed
from kiln.server import build_runtime
from kiln.settings import Settings, SettingsError, load_settings
from kiln.storage.names import asset_name
from kiln.testing.safety_toy import MAGENTA, NOT_FLAGGED, build_safety_checker


class PaintEngine(Engine):
    """The real planner over the default catalog; each output is one solid colour named in the prompt
    ("magenta, blue": output 0 magenta, output 1 blue; a word that is no colour paints gray)."""

    def load(self, spec):
        return None

    def generate(self, request, **kwargs) -> GenerationResult:  # on_step, cancel, loras, ...: nothing to do
        plan = self.plan(request)
        words = [w.strip() for w in plan.prompt.split(",")]
        outputs = [ImageOutput(solid(_colour(words[i % len(words)]), (plan.width, plan.height)), seed)
                   for i, seed in enumerate(plan.seeds)]
        return GenerationResult(
            outputs=outputs, model=plan.spec.key, task=plan.task, width=plan.width, height=plan.height,
            seed=plan.seed, steps=plan.steps, guidance=plan.guidance, sampler=plan.sampler,
            scheduler=plan.scheduler, strength=plan.strength, num_frames=None, fps=None, elapsed_ms=1,
        )


def _colour(word: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(word)[:3]
    except ValueError:
        return (128, 128, 128)


def solid(colour, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory):
    return build_safety_checker(tmp_path_factory.mktemp("safety") / "checker")


@pytest.fixture(scope="module")
def checker(checker_dir):
    return ClipSafetyChecker(str(checker_dir), device="cpu")


@pytest.fixture(scope="module")
def paint():
    return PaintEngine(load_catalog(None), device="cpu")


@pytest.fixture(scope="module")
def server(tmp_path_factory, paint, checker_dir):
    """The classifier configured and on by default."""
    with running_server(tmp_path_factory.mktemp("safe"), paint, safety_checker=str(checker_dir)) as srv:
        yield srv


def stored(srv, image: Image.Image, fmt: str) -> bool:
    data = ImageOutput(image, 0).encode(fmt)
    return srv.services.store.stat("i", asset_name(data, ImageOutput.media_type(fmt))) is not None


# --- the classifier -------------------------------------------------------------------------------


def test_toy_checker_flags_magenta_and_no_other_colour(checker):
    flagged = [solid(MAGENTA, (512, 512)), solid((245, 10, 240), (300, 200))]
    noise = Image.fromarray(np.random.default_rng(7).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    others = [solid(c, (64, 96)) for c in NOT_FLAGGED.values()] + [noise]
    assert checker.flags(flagged + others) == [True, True] + [False] * len(others)
    assert checker.flags([solid(MAGENTA).convert("RGBA")]) == [True]  # any mode is read as RGB
    assert checker.flags([]) == []


def test_each_output_gets_one_verdict_and_a_video_is_checked_at_its_first_middle_and_last_frame(checker):
    blue, magenta = solid((0, 0, 255)), solid(MAGENTA)
    outputs = [
        ImageOutput(blue, 0),
        VideoOutput([blue, blue, magenta, blue, blue], fps=24, seed=0),  # the middle frame
        VideoOutput([blue, magenta, blue, magenta, blue], fps=24, seed=0),  # frames never sampled
        ImageOutput(magenta, 0),
    ]
    assert flag_outputs(checker, outputs) == [False, True, False, True]


def test_no_classifier_flags_nothing():
    assert isinstance(load_safety_checker(None), NoSafetyChecker)
    assert isinstance(load_safety_checker(""), NoSafetyChecker)
    assert NoSafetyChecker().flags([solid(MAGENTA), solid((0, 0, 255))]) == [False, False]


def test_load_errors_are_model_load_failed_naming_the_source(tmp_path):
    with pytest.raises(ModelLoadFailed, match="safety checker /no/such/checker: no such directory"):
        ClipSafetyChecker("/no/such/checker")
    with pytest.raises(ModelLoadFailed, match=f"safety checker {tmp_path} could not be loaded \\(OSError"):
        ClipSafetyChecker(str(tmp_path))  # a directory without the checker's files
    with pytest.raises(ModelLoadFailed, match="hf download someone/not-cached"):
        ClipSafetyChecker("someone/not-cached")  # a hub id not in the cache: Kiln never downloads


# --- settings -------------------------------------------------------------------------------------


def test_settings_name_the_checker_and_its_default(checker_dir):
    assert load_settings(environ={}).safety_checker is None
    assert load_settings(environ={}).safety_checker_default is True
    assert load_settings(environ={"KILN_SAFETY_CHECKER": " "}).safety_checker is None
    s = load_settings(environ={"KILN_SAFETY_CHECKER": str(checker_dir), "KILN_SAFETY_CHECKER_DEFAULT": "false"})
    assert (s.safety_checker, s.safety_checker_default) == (str(checker_dir), False)
    with pytest.raises(SettingsError, match="KILN_SAFETY_CHECKER=./no-checker: .*no directory ./no-checker"):
        load_settings(environ={"KILN_SAFETY_CHECKER": "./no-checker"})


def test_a_checker_that_does_not_load_stops_start_up(tmp_path, paint):
    with pytest.raises(ModelLoadFailed, match="someone/not-cached"):
        build_runtime(Settings(data_dir=tmp_path / "data", safety_checker="someone/not-cached"), engine=paint)


# --- the render API -------------------------------------------------------------------------------


def test_sync_flagged_output_is_403_nsfw_detected_and_never_stored(server):
    r = server.client.post("/image/flux/mini/t2i?format=512", json={"prompt": "magenta", "seed": 1},
                           headers=server.auth)
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["error"] == "nsfw_detected" and body["message"].startswith("Content policy violation")
    assert body["details"] == {"outputs": [0]}
    assert not stored(server, solid(MAGENTA, (512, 512)), "webp")
    ok = server.client.post("/image/flux/mini/t2i?format=512", json={"prompt": "blue", "seed": 1}, headers=server.auth)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/webp"


@pytest.mark.parametrize("settings", [{"safety_checker_default": False}, {}], ids=["off-by-default", "no-classifier"])
def test_sync_flagged_output_is_served_when_the_classifier_does_not_run(tmp_path, paint, checker_dir, settings):
    if settings:
        settings = {**settings, "safety_checker": str(checker_dir)}
    with running_server(tmp_path, paint, **settings) as srv:
        r = srv.client.post("/image/flux/mini/t2i?format=512", json={"prompt": "magenta"}, headers=srv.auth)
        assert r.status_code == 200, r.text


def test_async_job_with_a_flagged_output_fails_with_nsfw_detected(server):
    body = {"modality": "image", "family": "flux", "model": "mini", "task": "t2i", "format": "512",
            "prompt": "magenta", "seed": 2}
    r = server.client.post("/queue", json=body, headers=server.auth)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    server.wait_for(job_id)
    r = server.client.get(f"/jobs/{job_id}", headers=server.auth)
    assert r.status_code == 200 and r.json()["status"] == "failed"
    assert r.json()["error"]["code"] == "nsfw_detected"
    assert r.json()["error"]["message"].startswith("Content policy violation")
    assert not stored(server, solid(MAGENTA, (512, 512)), "webp")


# --- the other doors ------------------------------------------------------------------------------


def wavespeed(srv, **body):
    r = srv.client.post("/api/v3/kiln/flux-mini", headers=srv.auth,
                        json={"size": "512*512", "enable_sync_mode": True, **body})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["status"] == "completed", data
    return data


def test_wavespeed_withholds_a_flagged_output_and_reports_it(server):
    data = wavespeed(server, prompt="magenta, blue", num_images=2, seed=3)  # enable_safety_checker left out: on
    assert data["has_nsfw_contents"] == [True, False]
    assert data["outputs"][0] == "" and data["outputs"][1].endswith(".jpg")
    assert not stored(server, solid(MAGENTA, (512, 512)), "jpeg")
    assert stored(server, solid((0, 0, 255), (512, 512)), "jpeg")
    again = server.client.get(f"/api/v2/predictions/{data['id']}/result", headers=server.auth).json()["data"]
    assert again["has_nsfw_contents"] == [True, False] and again["outputs"] == data["outputs"]
    b64 = wavespeed(server, prompt="magenta, blue", num_images=2, seed=3, enable_base64_output=True)
    assert b64["outputs"][0] == "" and len(b64["outputs"][1]) > 100


def test_wavespeed_without_the_safety_checker_does_not_check(server):
    data = wavespeed(server, prompt="magenta", seed=4, enable_safety_checker=False, output_format="png")
    assert data["has_nsfw_contents"] == [False] and data["outputs"][0].endswith(".png")
    assert stored(server, solid(MAGENTA, (512, 512)), "png")


def test_openai_answers_a_flagged_output_as_a_content_policy_violation(server):
    r = server.client.post("/v1/images/generations", headers=server.auth,
                           json={"model": "flux/mini", "prompt": "magenta", "size": "512x512"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "content_policy_violation" and error["type"] == "invalid_request_error"


def test_vyro_answers_a_flagged_output_as_an_invalid_request(server):
    r = server.client.post("/v2/image/generations", headers=server.auth,
                           files={"prompt": (None, "magenta"), "style": (None, "flux-mini")})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == 1100 and r.json()["message"].startswith("Content policy violation")
