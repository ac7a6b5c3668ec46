"""The engine on real diffusers architectures at toy size: every architecture x task, every allowed
sampler x scheduler pair, seeds, steps, previews, cancellation, outputs."""

from __future__ import annotations

import io
import threading

import av
import numpy as np
import pytest
from PIL import Image

from helpers import mask_png, png
from kiln.engine import Engine, GenerationRequest, ImageOutput, VideoOutput
from kiln.errors import GenerationCancelled, InvalidParameters, ModelNotInstalled

pytestmark = pytest.mark.slow

IMAGE_CASES = [
    ("flux", "dev", "t2i"), ("flux", "dev", "i2i"), ("flux", "dev", "edit"), ("flux", "schnell", "t2i"),
    ("flux", "schnell", "i2i"), ("flux", "schnell", "edit"), ("flux", "dev2", "t2i"), ("flux", "dev2", "i2i"),
    ("zimage", "turbo", "t2i"), ("zimage", "turbo", "i2i"), ("zimage", "turbo", "edit"),
]


def request(family="flux", model="dev", task="t2i", fmt="toy-64", **kw) -> GenerationRequest:
    fields = dict(family=family, model=model, task=task, format=fmt, prompt="a red circle on a blue background")
    if task in ("i2i", "edit", "i2v"):
        fields["image"] = png(80, 64)
    if task == "edit":
        fields["mask"] = mask_png(80, 64)
    fields.update(kw)
    return GenerationRequest.create(**fields)


def min_steps(engine, family, model) -> int:
    return engine.catalog.resolve(family, model).steps.min


def pixels(output: ImageOutput) -> np.ndarray:
    return np.asarray(output.image)


@pytest.mark.parametrize(("family", "model", "task"), IMAGE_CASES)
def test_every_image_architecture_and_task(engine, family, model, task):
    result = engine.generate(request(family, model, task, fmt="toy-96x64", steps=min_steps(engine, family, model), seed=3))
    assert result.model == f"{family}/{model}" and result.task == task and result.seed == 3
    assert len(result.outputs) == 1 and isinstance(result.outputs[0], ImageOutput)
    image = result.outputs[0].image
    assert image.size == (96, 64) and image.mode == "RGB"
    assert pixels(result.outputs[0]).std() > 0  # a real decode, not a blank


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_every_video_task(engine, task):
    result = engine.generate(request("wan", "default", task, duration=0.5, steps=10, seed=1))
    video = result.outputs[0]
    assert isinstance(video, VideoOutput) and video.fps == 24
    assert result.num_frames == 13 and len(video.frames) == 13 and video.size == (64, 64)


def test_mp4_decodes_at_24_fps_with_the_expected_frame_count(engine):
    result = engine.generate(request("wan", "default", "t2v", duration=1.0, steps=10, seed=2))
    data = result.outputs[0].encode()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 24
        frames = [f for f in container.decode(stream)]
    assert len(frames) == result.num_frames == 25
    assert (frames[0].width, frames[0].height) == (64, 64)


def test_webp_has_the_format_exact_size(engine):
    result = engine.generate(request("flux", "toy", fmt="landscape-wide", steps=1, seed=5))
    data = result.outputs[0].encode("webp")
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "WEBP" and img.size == (1024, 576) and img.mode == "RGB"


def _pairs(engine, key):
    spec = engine.catalog.models[key]
    return [(key, s, c) for s in spec.samplers for c in spec.schedulers]


def _all_pairs():
    from kiln.catalog import load_catalog

    default = load_catalog()
    return [(s.key, a, b) for s in default if s.modality == "image" for a in s.samplers for b in s.schedulers]


@pytest.mark.parametrize(("key", "sampler", "scheduler"), _all_pairs())
def test_every_allowed_sampler_scheduler_pair(engine, key, sampler, scheduler):
    family, model = key.split("/")
    events = []
    result = engine.generate(
        request(family, model, steps=min_steps(engine, family, model), sampler=sampler, scheduler=scheduler, seed=11),
        on_step=events.append,
    )
    assert (result.sampler, result.scheduler) == (sampler, scheduler)
    assert np.isfinite(pixels(result.outputs[0])).all()
    assert [e.step for e in events] == list(range(1, result.steps + 1))


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "euler_a"])
def test_img2img_with_every_sampler_runs_the_strength_share_of_steps(engine, sampler):
    events = []
    engine.generate(request(task="i2i", steps=20, strength=0.5, sampler=sampler, seed=4), on_step=events.append)
    assert [e.step for e in events] == list(range(1, 11)) and {e.total for e in events} == {10}


@pytest.mark.parametrize(("family", "model", "extra"), [
    ("flux", "dev", {}), ("flux", "dev", {"sampler": "euler_a"}), ("flux", "dev2", {}), ("zimage", "turbo", {}),
])
def test_same_seed_same_pixels_other_seed_other_pixels(engine, family, model, extra):
    steps = min_steps(engine, family, model)
    a = engine.generate(request(family, model, steps=steps, seed=42, **extra)).outputs[0]
    b = engine.generate(request(family, model, steps=steps, seed=42, **extra)).outputs[0]
    c = engine.generate(request(family, model, steps=steps, seed=43, **extra)).outputs[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_video_seed_is_deterministic(engine):
    a = engine.generate(request("wan", "default", "t2v", duration=0.5, steps=10, seed=9)).outputs[0]
    b = engine.generate(request("wan", "default", "t2v", duration=0.5, steps=10, seed=9)).outputs[0]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.frames, b.frames))


def test_output_i_of_a_batch_is_the_request_with_seed_plus_i(engine):
    batch = engine.generate(request(steps=15, seed=100, num_outputs=2))
    second = engine.generate(request(steps=15, seed=101))
    assert [o.seed for o in batch.outputs] == [100, 101]
    assert np.allclose(pixels(batch.outputs[1]).astype(int), pixels(second.outputs[0]).astype(int), atol=2)


def test_a_seed_is_drawn_and_reported_when_absent(engine):
    first = engine.generate(request(steps=15))
    again = engine.generate(request(steps=15, seed=first.seed))
    assert 0 <= first.seed <= 2**32 - 1
    assert np.array_equal(pixels(first.outputs[0]), pixels(again.outputs[0]))


@pytest.mark.parametrize(("family", "model", "task", "kw"), [
    ("flux", "dev", "t2i", {}), ("flux", "dev2", "t2i", {}), ("zimage", "turbo", "t2i", {}),
    ("wan", "default", "t2v", {"duration": 0.5}), ("flux", "dev", "t2i", {"sampler": "heun"}),
])
def test_one_step_event_per_step_with_decodable_previews(engine, family, model, task, kw):
    events = []
    steps = min_steps(engine, family, model)
    engine.generate(request(family, model, task, steps=steps, seed=1, **kw), on_step=events.append, previews=True)
    assert [(e.step, e.total) for e in events] == [(i, steps) for i in range(1, steps + 1)]
    for event in events:
        buf = io.BytesIO()
        event.preview.save(buf, "PNG")
        with Image.open(io.BytesIO(buf.getvalue())) as decoded:
            assert decoded.mode == "RGB" and min(decoded.size) >= 1


def test_previews_only_when_asked(engine):
    events = []
    engine.generate(request(steps=15, seed=1), on_step=events.append)
    assert events and all(e.preview is None for e in events)


def test_cancel_between_steps_returns_no_output(engine):
    cancel = threading.Event()
    seen = []

    def on_step(event):
        seen.append(event.step)
        if event.step == 3:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        engine.generate(request(steps=15, seed=1), on_step=on_step, cancel=cancel)
    assert seen == [1, 2, 3]
    # the model still works afterwards, from a clean scheduler
    assert engine.generate(request(steps=15, seed=1)).outputs


def test_cancelled_before_start_never_runs(engine):
    cancel = threading.Event()
    cancel.set()
    seen = []
    with pytest.raises(GenerationCancelled):
        engine.generate(request(steps=15, seed=1), on_step=seen.append, cancel=cancel)
    assert seen == []


def test_concurrent_requests_on_one_model_do_not_corrupt_each_other(engine):
    expected = {seed: pixels(engine.generate(request(steps=15, seed=seed, sampler="dpmpp_2m")).outputs[0]) for seed in (1, 2)}
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(seed):
        try:
            results[seed] = pixels(engine.generate(request(steps=15, seed=seed, sampler="dpmpp_2m")).outputs[0])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(np.array_equal(results[s], expected[s]) for s in (1, 2))


def test_models_load_once_and_tasks_share_weights(engine):
    engine.generate(request(steps=15, seed=1))
    loaded = engine.load(engine.catalog.models["flux/dev"])
    assert loaded is engine.load(engine.catalog.models["flux/dev"])
    t2i, i2i, edit = (loaded.pipelines[t] for t in ("t2i", "i2i", "edit"))
    assert t2i.transformer is i2i.transformer is edit.transformer
    assert type(i2i).__name__ == "FluxImg2ImgPipeline" and type(edit).__name__ == "FluxInpaintPipeline"


def test_edit_keeps_the_unmasked_area(engine):
    source = Image.new("RGB", (64, 64), (30, 160, 90))
    buf = io.BytesIO()
    source.save(buf, "PNG")
    result = engine.generate(request(task="edit", image=buf.getvalue(), mask=mask_png(64, 64), steps=15, seed=1))
    out = pixels(result.outputs[0]).astype(int)
    corner = out[:8, :8].reshape(-1, 3).mean(axis=0)
    centre = out[24:40, 24:40].reshape(-1, 3).mean(axis=0)
    # the toy VAE does not reconstruct colours exactly, but the kept corner is far closer to the source
    assert np.abs(corner - (30, 160, 90)).sum() < np.abs(centre - (30, 160, 90)).sum()


def test_not_installed_model_names_the_pull_command(tmp_path):
    from kiln.catalog import load_catalog
    from huggingface_hub import constants

    engine = Engine(load_catalog(), device="cpu")
    original = constants.HF_HUB_CACHE
    constants.HF_HUB_CACHE = str(tmp_path)
    try:
        with pytest.raises(ModelNotInstalled, match="kiln pull flux/schnell"):
            engine.generate(request("flux", "schnell", fmt="512"))
        # a user error wins over "not installed": it is raised before any model work
        with pytest.raises(InvalidParameters):
            engine.generate(request("flux", "schnell", fmt="512", steps=8))
    finally:
        constants.HF_HUB_CACHE = original


def test_negative_prompt_changes_the_output_where_the_model_uses_one(engine):
    # FLUX.1 dev takes one through true CFG (a second transformer pass), WAN through its own CFG
    for family, model, task, extra in [("flux", "dev", "t2i", {"steps": 15}), ("wan", "default", "t2v", {"duration": 0.5, "steps": 10})]:
        plain = engine.generate(request(family, model, task, seed=8, **extra)).outputs[0]
        negative = engine.generate(request(family, model, task, seed=8, negative_prompt="blurry, dark", **extra)).outputs[0]
        a = np.asarray(plain.image if isinstance(plain, ImageOutput) else plain.frames[-1])
        b = np.asarray(negative.image if isinstance(negative, ImageOutput) else negative.frames[-1])
        assert not np.array_equal(a, b), f"{family}/{model} ignored its negative prompt"


def test_wan_720p_comes_out_at_exactly_1280x720(engine):
    result = engine.generate(request("wan", "default", "i2v", fmt="720p", duration=0.5, steps=10, seed=1))
    assert result.outputs[0].size == (1280, 720) and (result.width, result.height) == (1280, 720)


@pytest.mark.parametrize(("family", "model", "task"), [("flux", "dev", "i2i"), ("flux", "dev", "edit"), ("zimage", "turbo", "i2i")])
def test_batches_with_an_input_image_keep_the_seed_plus_i_rule(engine, family, model, task):
    steps = min_steps(engine, family, model)
    events = []
    batch = engine.generate(request(family, model, task, steps=steps, seed=100, num_outputs=2), on_step=events.append)
    alone = engine.generate(request(family, model, task, steps=steps, seed=101))
    assert np.array_equal(pixels(batch.outputs[1]), pixels(alone.outputs[0]))
    assert [e.step for e in events] == list(range(1, len(events) + 1)) and events[-1].step == events[-1].total


def test_a_request_waiting_for_the_model_can_be_cancelled(engine):
    loaded = engine.load(engine.catalog.models["flux/dev"])
    cancel = threading.Event()
    errors: list[BaseException] = []

    def waiting():
        try:
            engine.generate(request(steps=15, seed=1), cancel=cancel)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with loaded.lock:  # another request holds the model
        thread = threading.Thread(target=waiting)
        thread.start()
        cancel.set()
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], GenerationCancelled)
