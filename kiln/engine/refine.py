"""Run a request's base generation and the upscaling and detail passes its plan names.

What the passes are, in which order and at what strength is :mod:`kiln.engine.refinement`'s; this
module only runs them. Every pipeline call goes through ``run(plan, **overrides)``, the engine's one
call (fresh scheduler, per-seed generators, progress, cancellation, error mapping), and every pass
is a plan of its own (task ``i2i`` at the pass's size, one output, seed *s + i*), so step events,
previews and errors work in a pass exactly as in the base generation. ``check`` raises when the
request was cancelled; it is called between pipeline calls (the progress callback checks between
steps).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from kiln.engine.families.base import crop_centre
from kiln.engine.plan import Plan
from kiln.engine.refinement import Pass

Run = Callable[..., Any]  # run(plan, **pipeline keyword overrides) -> the pipeline's output


def render(plan: Plan, parts: list[Plan], run: Run, loaded: Any, check: Callable[[], None]) -> list[Image.Image]:
    """The pictures (or video frames) of ``plan``, generated in ``parts`` and then refined.

    ``loaded`` is the engine's :class:`~kiln.engine.engine.LoadedModel` (its adapter and
    pipelines). Without refinement the pictures come back as the pipeline made them (at the
    generated size); refined ones come back at the output size.

    Between two calls the picture stays in latent space when the next pass can take latents
    (``latent_upscale`` always, ``detail_enhance`` on an architecture whose img2img takes them): a
    VAE decode and encode saved, which on flux/mini is most of what a pass costs.
    """
    adapter = loaded.adapter
    refinement = plan.refinement
    if refinement is None:
        return [picture for part in parts for picture in adapter.images(run(part), part)]
    passes = refinement.passes
    latent_input = [p.kind == "latent_upscale" or (p.kind == "detail" and adapter.latent_img2img) for p in passes]
    states: list[Image.Image | torch.Tensor] = []
    for part in parts:
        if latent_input[0]:
            packed = run(part, output_type="latent").images
            states.extend(adapter.spatial_latents(loaded.pipelines[part.task], packed, part).split(1))
        else:
            states.extend(crop_centre(p, plan.width, plan.height) for p in adapter.images(run(part), part))
    for i, step in enumerate(passes):
        latent_output = i + 1 < len(passes) and latent_input[i + 1]
        states = [_redraw(plan, step, seed, state, run, loaded, check, latent_output)
                  for seed, state in zip(plan.seeds, states, strict=True)]
    return states  # type: ignore[return-value]  # the last pass decodes


def _redraw(
    plan: Plan, step: Pass, seed: int, state: Image.Image | torch.Tensor, run: Run, loaded: Any,
    check: Callable[[], None], latent_output: bool,
) -> Image.Image | torch.Tensor:
    """One pass for one output: enlarge ``state`` to the pass's size (a picture with Lanczos, latents
    bicubic), redraw it from the pass's strength, and return latents or the sharpened picture."""
    check()
    pass_plan = _pass_plan(plan, step, seed, image=None)
    overrides: dict[str, Any] = {"scheduler_config": _shift(loaded, step)}
    if isinstance(state, torch.Tensor):
        # FluxImg2ImgPipeline takes latents as `image` as they are and adds the seed's noise at the
        # pass's starting sigma (scheduler.scale_noise): a real latent upscale, no decode/encode.
        vae_scale = loaded.pipelines["i2i"].vae_scale_factor
        factor = plan.refinement.latent_upscale if step.kind == "latent_upscale" else 1.0
        overrides["image"] = resize_latents(state, factor, (step.gen_height // vae_scale, step.gen_width // vae_scale))
    else:
        picture = state
        if picture.size != (step.width, step.height):
            picture = picture.resize((step.width, step.height), Image.Resampling.LANCZOS)
        pass_plan = replace(pass_plan, image=pad_to(picture, step.gen_width, step.gen_height))
    if latent_output:
        packed = run(pass_plan, output_type="latent", **overrides).images
        return loaded.adapter.spatial_latents(loaded.pipelines["i2i"], packed, pass_plan)
    redrawn = crop_centre(loaded.adapter.images(run(pass_plan, **overrides), pass_plan)[0], step.width, step.height)
    if step.sharpen:
        redrawn = redrawn.filter(ImageFilter.UnsharpMask(radius=2, percent=step.sharpen, threshold=2))
    return redrawn


def _shift(loaded: Any, step: Pass) -> dict[str, int]:
    patch = loaded.pipelines["i2i"].vae_scale_factor * 2
    return capped_shift(loaded.scheduler_config, step.gen_width // patch * (step.gen_height // patch))


def capped_shift(config: Mapping[str, Any], tokens: int) -> dict[str, int]:
    """Scheduler settings for a pass of ``tokens`` image tokens that keep its timestep shift at most
    the checkpoint's largest.

    FLUX.1 shifts its schedule by ``mu``, linear in image tokens between ``base_image_seq_len`` and
    ``max_image_seq_len`` (256 and 4096 tokens: 256² and 1024² pixels) and extrapolated beyond them by
    diffusers: mu = 3.2 at 2048², 11.5 at 4096², where a pass of strength 0.3 would start from
    sigma 0.92 and 1.0, redrawing the picture rather than refining it. Past the fitted range a pass
    keeps ``max_shift`` (mu 1.15: strength 0.3 starts near sigma 0.6, as a FLUX img2img at 1024²
    does). Checkpoints without dynamic shifting (flux/mini, Z-Image) are left as they are.
    """
    if not config.get("use_dynamic_shifting") or tokens <= config.get("max_image_seq_len", 4096):
        return {}
    return {"max_image_seq_len": tokens}


def _pass_plan(plan: Plan, step: Pass, seed: int, image: Image.Image | None) -> Plan:
    return replace(
        plan, task="i2i", width=step.width, height=step.height, gen_width=step.gen_width, gen_height=step.gen_height,
        strength=step.strength, image=image, mask=None, seed=seed, num_outputs=1, refinement=None,
    )


def resize_latents(latents: torch.Tensor, factor: float, size: tuple[int, int]) -> torch.Tensor:
    """(1, C, h, w) latents scaled by ``factor`` (bicubic), then centre-padded (edge values) or
    centre-cropped to ``size``: the pass generates at its architecture's multiple, which may be a
    little larger than ``factor`` times the base (the output is centre-cropped back)."""
    h, w = latents.shape[-2:]
    if factor == 1.0:
        return _centre_fit(latents, size)
    scaled = torch.nn.functional.interpolate(
        latents.float(), size=(round(h * factor), round(w * factor)), mode="bicubic", align_corners=False
    )
    return _centre_fit(scaled, size).to(latents.dtype)


def _centre_fit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    x = x[..., max(top, 0) : max(top, 0) + min(h, size[0]), max(left, 0) : max(left, 0) + min(w, size[1])]
    pad_h, pad_w = max(size[0] - h, 0), max(size[1] - w, 0)
    if pad_h or pad_w:
        pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        x = torch.nn.functional.pad(x, pad, mode="replicate")
    return x


def pad_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` centred in ``width`` x ``height``, the margin filled by mirroring its edges (so the
    img2img pass sees a plausible continuation rather than a border, and its centre crop is exactly
    ``image``'s place)."""
    if image.size == (width, height):
        return image
    pad_w, pad_h = width - image.width, height - image.height
    arr = np.pad(
        np.asarray(image), ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)), mode="reflect"
    )
    return Image.fromarray(arr, image.mode)
