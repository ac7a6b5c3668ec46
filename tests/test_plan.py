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
    (dict(negative_prompt="blurry"), InvalidParameters, "negative prompt"),
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
    (dict(prompt="x" * 5001), "prompt"),
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
