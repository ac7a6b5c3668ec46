"""Every bad request is a typed error with an actionable message, raised before any model work."""

from __future__ import annotations

import pytest

from helpers import mask_png, png
from kiln.catalog import load_catalog
from kiln.engine import GenerationRequest, plan_request
from kiln.errors import (
    InvalidImage,
    InvalidParameters,
    InvalidPrompt,
    UnknownModel,
    UnsupportedFormat,
    UnsupportedTask,
    UserError,
)


@pytest.fixture(scope="module")
def default_catalog():
    return load_catalog()


def req(**kw) -> GenerationRequest:
    base = dict(family="flux", model="dev", task="t2i", format="512", prompt="a red circle on blue")
    base.update(kw)
    return GenerationRequest.create(**base)


def test_defaults_come_from_the_catalog(default_catalog):
    plan = plan_request(req(), default_catalog)
    assert (plan.width, plan.height, plan.steps, plan.guidance) == (512, 512, 28, 3.5)
    assert (plan.sampler, plan.scheduler, plan.strength, plan.num_frames) == ("euler", "simple", None, None)
    assert 0 <= plan.seed <= 2**32 - 1


def test_alias_in_the_request_resolves(default_catalog):
    assert plan_request(req(model="fast", steps=4), default_catalog).spec.key == "flux/schnell"


def test_fixed_values_may_be_repeated(default_catalog):
    plan = plan_request(req(model="schnell", steps=4, guidance=3.5, sampler="euler", scheduler="simple"), default_catalog)
    assert (plan.steps, plan.guidance) == (4, 3.5)


def test_zimage_ignores_guidance_as_documented(default_catalog):
    plan = plan_request(req(family="zimage", model="turbo", guidance=4.5), default_catalog)
    assert plan.guidance == 0.0 and plan.steps == 8


@pytest.mark.parametrize(("kw", "error", "message"), [
    (dict(model="dev3"), UnknownModel, "flux/dev3.*dev2"),
    (dict(family="sdxl"), UnknownModel, "family 'sdxl'"),
    (dict(task="t2v"), UnsupportedTask, "does not do 't2v'"),
    (dict(model="dev2", task="edit"), UnsupportedTask, "t2i, i2i"),
    (dict(format="2048"), UnsupportedFormat, "'2048'.*1024"),
    (dict(format="720p"), UnsupportedFormat, "720p"),
    (dict(format=None, width=2050, height=1024), UnsupportedFormat, "each side from 256 to 2048"),
    (dict(format=None, width=200, height=1024), UnsupportedFormat, "each side from 256 to 2048"),
    (dict(format=None, family="wan", model="default", task="t2v", width=640, height=480), UnsupportedFormat,
     "only the sizes of its formats .*1280x720"),
    (dict(steps=10), InvalidParameters, "between 15 and 50"),
    (dict(steps=51), InvalidParameters, "between 15 and 50"),
    (dict(model="schnell", steps=8), InvalidParameters, "always runs 4 steps"),
    (dict(family="zimage", model="turbo", steps=4), InvalidParameters, "between 5 and 12"),
    (dict(guidance=1.5), InvalidParameters, "between 2.0 and 5.0"),
    (dict(model="schnell", guidance=2.0), InvalidParameters, "fixed at 3.5"),
    (dict(sampler="ddim"), InvalidParameters, "unknown sampler 'ddim'"),
    (dict(scheduler="karras"), InvalidParameters, "unknown scheduler"),
    (dict(model="schnell", sampler="heun"), InvalidParameters, "allowed: euler"),
    (dict(model="schnell", scheduler="sgm"), InvalidParameters, "allowed: simple"),
    (dict(family="zimage", model="turbo", sampler="dpmpp_2m"), InvalidParameters, "allowed: euler"),
    (dict(prompt=""), InvalidPrompt, "required"),
    (dict(prompt="  a "), InvalidPrompt, "too short"),
    (dict(strength=0.5), InvalidParameters, "strength does not apply"),
    (dict(model="schnell", steps=4, negative_prompt="blurry"), InvalidParameters,
     "does not use a negative prompt.*a model that does: flux/dev, wan/default, flux/mini"),
    (dict(duration=2.0), InvalidParameters, "duration applies to video"),
    (dict(image=png()), InvalidParameters, "t2i takes no input image; use i2i"),
    (dict(task="i2i"), InvalidImage, "needs an input image"),
    (dict(task="edit", image=png()), InvalidImage, "needs a mask"),
    (dict(task="i2i", image=png(), mask=mask_png()), InvalidParameters, "takes no mask"),
    (dict(task="i2i", image=b"not an image at all"), InvalidImage, "could not be read"),
    (dict(task="i2i", image=png()[:40]), InvalidImage, "could not be read"),
    (dict(task="edit", image=png(64, 64), mask=b"\x00garbage"), InvalidImage, "mask could not be read"),
    (dict(task="edit", image=png(64, 64), mask=mask_png(32, 64)), InvalidImage, "mask is 32x64 but the image is 64x64"),
    (dict(task="i2i", image=png(5000, 16)), InvalidImage, "at most 4096"),
    (dict(model="dev2", task="i2i", image=png(), strength=0.5), InvalidParameters, "strength does not apply to flux/dev2 i2i"),
    (dict(family="wan", model="default", task="t2v", format="480p", duration=12.0), InvalidParameters, "between 0.5 s and 10.0 s"),
    (dict(family="wan", model="default", task="t2v", format="480p", guidance=9.0), InvalidParameters, "between 6.0 and 8.0"),
    (dict(family="wan", model="default", task="t2v", format="480p", num_outputs=2), InvalidParameters, "one video"),
    (dict(family="wan", model="default", task="t2v", format="480p", sampler="euler"), InvalidParameters, "own scheduler"),
])
def test_rejections(default_catalog, kw, error, message):
    with pytest.raises(error, match=message) as info:
        plan_request(req(**kw), default_catalog)
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize(("kw", "field"), [
    (dict(seed=2**32), "seed"),
    (dict(seed=-1), "seed"),
    (dict(num_outputs=5), "num_outputs"),
    (dict(task="upscale"), "task"),
    (dict(strength=1.5), "strength"),
    (dict(colour="red"), "colour"),
])
def test_out_of_bounds_fields_are_invalid_parameters(kw, field):
    with pytest.raises(InvalidParameters, match=field):
        req(**kw)


def test_seed_edges_are_accepted(default_catalog):
    assert plan_request(req(seed=0), default_catalog).seed == 0
    plan = plan_request(req(seed=2**32 - 1, num_outputs=2), default_catalog)
    assert plan.seeds == [2**32 - 1, 0]


def test_i2i_without_prompt_needs_high_strength(default_catalog):
    plan = plan_request(req(task="i2i", image=png(), prompt="", strength=0.9), default_catalog)
    assert plan.prompt == "" and plan.strength == 0.9
    with pytest.raises(InvalidPrompt):
        plan_request(req(task="i2i", image=png(), prompt="", strength=0.5), default_catalog)


def test_task_defaults_and_decoded_inputs(default_catalog):
    plan = plan_request(req(task="edit", image=png(80, 60, mode="RGBA", colour=(1, 2, 3, 4)), mask=mask_png(80, 60)), default_catalog)
    assert plan.strength == 1.0 and plan.image.mode == "RGB" and plan.mask.mode == "L"
    assert plan_request(req(task="i2i", image=png()), default_catalog).strength == 0.7


@pytest.mark.parametrize(("duration", "frames"), [(None, 49), (0.5, 13), (2.0, 49), (3.0, 73), (10.0, 241)])
def test_video_frame_count_follows_duration(default_catalog, duration, frames):
    plan = plan_request(req(family="wan", model="default", task="t2v", format="480p", duration=duration), default_catalog)
    assert plan.num_frames == frames and plan.fps == 24 and (plan.width, plan.height) == (832, 480)
    assert (plan.num_frames - 1) % 4 == 0


def test_request_is_never_mutated(default_catalog):
    request = req(task="edit", image=png(), mask=mask_png())
    before = request.model_dump()
    plan_request(request, default_catalog)
    assert request.model_dump() == before
    with pytest.raises(Exception):
        request.prompt = "changed"  # frozen


def test_a_too_long_prompt_is_an_invalid_prompt():
    with pytest.raises(InvalidPrompt, match="Prompt too long \\(max 5000 chars\\)"):
        req(prompt="x" * 5001)


@pytest.mark.parametrize(("kw", "message"), [
    (dict(guidance=150.0), "between 2.0 and 5.0 for flux/dev"),
    (dict(steps=5000), "between 15 and 50 for flux/dev"),
    (dict(family="wan", model="default", task="t2v", format="480p", duration=90.0), "between 0.5 s and 10.0 s"),
])
def test_large_values_get_the_model_range_in_the_message(default_catalog, kw, message):
    with pytest.raises(InvalidParameters, match=message):
        plan_request(req(**kw), default_catalog)


@pytest.mark.parametrize("field", ["guidance", "strength", "duration"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(InvalidParameters, match=field):
        req(**{field: value})


def test_a_strength_that_runs_no_step_is_refused_before_loading(default_catalog):
    with pytest.raises(InvalidParameters, match="runs no step; use a strength of at least 0.0357"):
        plan_request(req(task="i2i", image=png(), strength=1e-300), default_catalog)
    assert plan_request(req(task="i2i", image=png(), strength=0.04), default_catalog).strength == 0.04


def test_coming_soon_models_are_refused(tmp_path):
    import tomllib

    from kiln.catalog import DEFAULT_CATALOG, parse_catalog
    from kiln.errors import ModelUnavailable

    raw = tomllib.loads(DEFAULT_CATALOG.read_text())
    raw["models"][1]["status"] = "coming_soon"
    with pytest.raises(ModelUnavailable, match="flux/dev is announced"):
        plan_request(req(), parse_catalog(raw, base_dir=tmp_path))


def _encoded(img, fmt, **save) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def test_exif_orientation_is_applied_before_the_mask_check(default_catalog):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 64x32, shown 32x64
    jpeg = _encoded(Image.new("RGB", (64, 32), (200, 10, 10)), "JPEG", exif=exif)
    plan = plan_request(req(task="edit", image=jpeg, mask=mask_png(32, 64)), default_catalog)
    assert plan.image.size == (32, 64)


def test_phone_jpegs_with_an_mpo_frame_are_accepted(default_catalog):
    from PIL import Image

    mpo = _encoded(Image.new("RGB", (48, 32), (10, 200, 10)), "MPO", save_all=True,
                   append_images=[Image.new("RGB", (48, 32), (0, 0, 0))])
    assert plan_request(req(task="i2i", image=mpo), default_catalog).image.size == (48, 32)


def test_sixteen_bit_and_transparent_inputs_are_scaled_not_clipped(default_catalog):
    import numpy as np
    from PIL import Image

    grey16 = Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16))
    mask16 = Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16))
    plan = plan_request(req(task="edit", image=_encoded(grey16, "PNG"), mask=_encoded(mask16, "PNG")), default_catalog)
    assert abs(int(np.asarray(plan.mask).max()) - 117) <= 1  # 30000/65535 of 255, not clipped to 255
    assert abs(int(np.asarray(plan.image).max()) - 117) <= 1
    clear = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent mask pixels: keep
    assert int(np.asarray(plan_request(req(task="edit", image=png(32, 32), mask=_encoded(clear, "PNG")), default_catalog).mask).max()) == 0


def test_a_sliver_image_is_fitted_without_a_huge_intermediate():
    import tracemalloc

    from PIL import Image

    from kiln.engine.families.base import fit_to

    sliver = Image.new("RGB", (1, 4096), (5, 5, 5))
    tracemalloc.start()
    fitted = fit_to(sliver, 1024, 1024)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert fitted.size == (1024, 1024) and peak < 64 * 2**20


def test_generation_size_is_rounded_up_to_the_architecture_multiple(default_catalog):
    plan = plan_request(req(family="wan", model="default", task="t2v", format="720p"), default_catalog)
    assert (plan.width, plan.height, plan.gen_width, plan.gen_height) == (1280, 720, 1280, 736)
    plan = plan_request(req(format="landscape-wide"), default_catalog)
    assert (plan.gen_width, plan.gen_height) == (1024, 576)


def test_a_pixel_size_in_the_models_range_is_generated_at_the_multiple_and_cropped(default_catalog):
    plan = plan_request(req(format=None, width=1000, height=600), default_catalog)
    assert (plan.width, plan.height, plan.gen_width, plan.gen_height) == (1000, 600, 1008, 608)
    assert plan_request(req(format=None), default_catalog).width == 1024  # neither: the model's first format
    # flux/mini's VAE compresses 32x: its catalog entry says its sides divide by 64
    plan = plan_request(req(model="mini", format=None, width=1000, height=600), default_catalog)
    assert (plan.width, plan.height, plan.gen_width, plan.gen_height) == (1000, 600, 1024, 640)


@pytest.mark.parametrize(("kw", "message"), [
    (dict(width=640), "width and height go together"),
    (dict(format=None, height=640), "width and height go together"),
    (dict(width=640, height=640), "a format or a width and height, not both"),
    (dict(format=None, width=0, height=640), "width"),
])
def test_size_fields_are_checked_at_the_edge(kw, message):
    with pytest.raises(InvalidParameters, match=message):
        req(**kw)
