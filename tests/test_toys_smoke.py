"""Smoke tests for the toy checkpoints in kiln.testing.toys: each one builds offline, loads through
``from_pretrained`` exactly like a real checkpoint, and runs its pipelines end to end at small sizes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from kiln.testing.toys import MARKER_FILE, TOY_NAMES, build_toys, is_complete  # noqa: E402

STEPS = 2


@pytest.fixture(scope="session")
def toys(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Share the suite-wide toy directory when conftest provides one (build_toys is idempotent).
    try:
        directory = request.getfixturevalue("toys_dir")
    except pytest.FixtureLookupError:
        directory = tmp_path_factory.mktemp("toys")
    return build_toys(directory)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _load(cls, path: Path):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_pipe(cls, pipe):
    new = cls.from_pipe(pipe)
    new.set_progress_bar_config(disable=True)
    return new


def _image(w: int, h: int, colour=(200, 60, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def _mask(w: int, h: int) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    return mask


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------------ build


def test_build_layout_and_idempotence(toys: dict[str, Path]) -> None:
    assert tuple(toys) == TOY_NAMES
    for name, path in toys.items():
        assert path.name == name and is_complete(path, name)
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"]
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        assert size < 4 * 1024 * 1024, f"{name} is {size} bytes"
    before = {name: (path / MARKER_FILE).stat().st_mtime_ns for name, path in toys.items()}
    again = build_toys(next(iter(toys.values())).parent)
    assert again == toys
    assert {name: (path / MARKER_FILE).stat().st_mtime_ns for name, path in again.items()} == before


def test_build_is_deterministic_across_processes(toys: dict[str, Path], tmp_path: Path) -> None:
    # flux1-dev holds both trained tokenizer kinds (BPE + Unigram) and seeded weights.
    code = "import sys; from kiln.testing.toys import build_toy; build_toy('flux1-dev', sys.argv[1])"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, capture_output=True)
    assert _tree_digest(tmp_path / "flux1-dev") == _tree_digest(toys["flux1-dev"])


def test_unfinished_build_is_rebuilt(tmp_path: Path) -> None:
    from kiln.testing.toys import build_toy

    path = build_toy("zimage-turbo", tmp_path)
    (path / MARKER_FILE).unlink()
    (path / "stale.txt").write_text("left over")
    rebuilt = build_toy("zimage-turbo", tmp_path)
    assert rebuilt == path and is_complete(path) and not (path / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ FLUX.1


@pytest.mark.parametrize("name", ["flux1-dev", "flux1-schnell"])
def test_flux1_text_to_image(toys: dict[str, Path], name: str) -> None:
    from diffusers import DiffusionPipeline, FluxPipeline

    pipe = _load(DiffusionPipeline, toys[name])
    assert isinstance(pipe, FluxPipeline)
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.guidance_embeds is (name == "flux1-dev")
    assert pipe.scheduler.config.use_dynamic_shifting is (name == "flux1-dev")
    out = pipe(prompt="a red cat", height=64, width=96, num_inference_steps=STEPS, generator=_gen(), output_type="np")
    assert out.images.shape == (1, 64, 96, 3)
    assert np.isfinite(out.images).all()


def test_flux1_img2img_and_inpaint(toys: dict[str, Path]) -> None:
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

    pipe = _load(FluxPipeline, toys["flux1-dev"])
    i2i = _from_pipe(FluxImg2ImgPipeline, pipe)
    image = i2i(
        prompt="a red cat", image=_image(64, 64), strength=0.6, height=64, width=64,
        num_inference_steps=STEPS, generator=_gen(),
    ).images[0]  # fmt: skip
    assert image.size == (64, 64)
    inpaint = _from_pipe(FluxInpaintPipeline, pipe)
    image = inpaint(
        prompt="a red cat", image=_image(64, 64), mask_image=_mask(64, 64), strength=0.9, height=64, width=64,
        num_inference_steps=STEPS, generator=_gen(),
    ).images[0]  # fmt: skip
    assert image.size == (64, 64)


# ------------------------------------------------------------------------------------------------ FLUX.2


def test_flux2_text_to_image_and_reference(toys: dict[str, Path]) -> None:
    from diffusers import DiffusionPipeline, Flux2Pipeline

    pipe = _load(DiffusionPipeline, toys["flux2-dev"])
    assert isinstance(pipe, Flux2Pipeline)
    assert pipe.vae_scale_factor == 8  # x2 latent patchify: sizes are multiples of 16
    assert pipe.text_encoder.config.text_config.num_hidden_layers >= 31  # default text_encoder_out_layers work
    # Flux2Pipeline.__call__'s first positional parameter is `image`: always pass prompt by keyword.
    out = pipe(prompt="a red cat", height=64, width=48, num_inference_steps=STEPS, generator=_gen(), output_type="np")
    assert out.images.shape == (1, 64, 48, 3)
    ref = pipe(
        prompt="the same cat, in blue", image=_image(80, 64), height=64, width=64,
        num_inference_steps=STEPS, generator=_gen(),
    ).images[0]  # fmt: skip
    assert ref.size == (64, 64)


# ------------------------------------------------------------------------------------------------ Z-Image


def test_zimage_text_to_image(toys: dict[str, Path]) -> None:
    from diffusers import DiffusionPipeline, ZImagePipeline

    pipe = _load(DiffusionPipeline, toys["zimage-turbo"])
    assert isinstance(pipe, ZImagePipeline)
    assert pipe.vae_scale_factor == 8
    out = pipe(
        prompt="a red cat", height=64, width=96, num_inference_steps=STEPS, guidance_scale=0.0,
        generator=_gen(), output_type="np",
    )  # fmt: skip
    assert out.images.shape == (1, 64, 96, 3)
    # guidance_scale > 0 switches on classifier-free guidance with a negative prompt.
    out = pipe(
        prompt="a red cat", negative_prompt="blurry", height=32, width=32, num_inference_steps=STEPS,
        guidance_scale=4.0, generator=_gen(), output_type="np",
    )  # fmt: skip
    assert out.images.shape == (1, 32, 32, 3)


def test_zimage_img2img_and_inpaint(toys: dict[str, Path]) -> None:
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline

    pipe = _load(ZImagePipeline, toys["zimage-turbo"])
    i2i = _from_pipe(ZImageImg2ImgPipeline, pipe)
    image = i2i(
        prompt="a red cat", image=_image(64, 64), strength=0.6, height=64, width=64, guidance_scale=0.0,
        num_inference_steps=STEPS, generator=_gen(),
    ).images[0]  # fmt: skip
    assert image.size == (64, 64)
    inpaint = _from_pipe(ZImageInpaintPipeline, pipe)
    image = inpaint(
        prompt="a red cat", image=_image(64, 64), mask_image=_mask(64, 64), strength=0.9, height=64, width=64,
        guidance_scale=0.0, num_inference_steps=STEPS, generator=_gen(),
    ).images[0]  # fmt: skip
    assert image.size == (64, 64)


# ------------------------------------------------------------------------------------------------ WAN 2.2


def test_wan22_text_to_video(toys: dict[str, Path]) -> None:
    from diffusers import DiffusionPipeline, WanPipeline

    pipe = _load(DiffusionPipeline, toys["wan22-ti2v"])
    assert isinstance(pipe, WanPipeline)
    assert pipe.config.expand_timesteps is True and pipe.transformer_2 is None
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (16, 4)
    frames = pipe(
        prompt="a red cat running", height=64, width=96, num_frames=5, num_inference_steps=STEPS,
        generator=_gen(), output_type="np",
    ).frames  # fmt: skip
    assert frames.shape == (1, 5, 64, 96, 3)
    assert np.isfinite(frames).all()


def test_wan22_image_to_video(toys: dict[str, Path]) -> None:
    from diffusers import WanImageToVideoPipeline, WanPipeline

    t2v = _load(WanPipeline, toys["wan22-ti2v"])
    for i2v in (_from_pipe(WanImageToVideoPipeline, t2v), _load(WanImageToVideoPipeline, toys["wan22-ti2v"])):
        assert i2v.config.expand_timesteps is True and i2v.image_encoder is None
        frames = i2v(
            prompt="the cat starts to run", image=_image(120, 80), height=64, width=96, num_frames=5,
            num_inference_steps=STEPS, generator=_gen(), output_type="np",
        ).frames  # fmt: skip
        assert frames.shape == (1, 5, 64, 96, 3)
