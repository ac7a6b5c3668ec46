"""What the engine needs to know about one diffusers architecture.

An adapter knows how to call its pipelines (which keyword carries the image, whether strength
applies), how to read their latents for previews, and how to turn their output into pictures. It
holds no per-model facts: those are in the catalog.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image

from kiln.engine.samplers import pipeline_strength

if TYPE_CHECKING:
    from kiln.engine.plan import Plan


class Adapter:
    """Base class; one subclass per diffusers architecture (FLUX.1, FLUX.2, Z-Image, WAN)."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[frozenset[str]]
    # Tasks whose pipeline takes a `strength` (how far from the input image to go).
    strength_tasks: ClassVar[frozenset[str]] = frozenset()
    # Name of the pipeline argument that sets the number of outputs.
    count_argument: ClassVar[str] = "num_images_per_prompt"
    # Width and height the pipeline accepts are multiples of this (VAE factor x latent patch).
    size_multiple: ClassVar[int] = 16
    # Whether its i2i pipeline takes latents as `image` (the space spatial_latents gives from an
    # `output_type="latent"` call) and adds noise to them at its starting sigma: latent_upscale needs it.
    latent_img2img: ClassVar[bool] = False
    # Whether its transformer passes attention masks (padded captions): the attention kernels that take
    # none (flash SDPA) do not fit it (kiln.engine.optimize).
    attention_masked: ClassVar[bool] = False

    def call_kwargs(self, plan: Plan, pipe: Any) -> dict[str, Any]:
        """Arguments for ``pipe(...)`` beyond the ones every pipeline shares (see the engine)."""
        kwargs = self.prompt_kwargs(plan)
        if plan.negative_prompt:
            kwargs["negative_prompt"] = plan.negative_prompt
        if plan.strength is not None:
            # Heun's doubled timesteps would otherwise shift where img2img starts.
            kwargs["strength"] = pipeline_strength(pipe.scheduler, plan.strength, plan.steps)
        if plan.image is not None:
            kwargs["image"] = fit_to(plan.image, plan.gen_width, plan.gen_height)
        if plan.mask is not None:
            kwargs["mask_image"] = fit_to(plan.mask, plan.gen_width, plan.gen_height)
        return kwargs

    def batch_prompts(self, kwargs: dict[str, Any], plans: Sequence[Plan]) -> None:
        """Turn ``kwargs`` (built for the first of ``plans``) into one call for every output of all
        of them: one prompt per output, and as many negative prompts where the call has one."""
        kwargs["prompt"] = [p.prompt for p in plans for _ in range(p.num_outputs)]
        if "negative_prompt" in kwargs:
            kwargs["negative_prompt"] = [p.negative_prompt or "" for p in plans for _ in range(p.num_outputs)]

    def prompt_kwargs(self, plan: Plan) -> dict[str, Any]:
        """Prompt and size: what every pipeline of every family takes, by keyword."""
        kwargs: dict[str, Any] = {"prompt": plan.prompt, "height": plan.gen_height, "width": plan.gen_width}
        if plan.spec.max_sequence_length is not None:
            kwargs["max_sequence_length"] = plan.spec.max_sequence_length
        return kwargs

    def spatial_latents(self, pipe: Any, latents: torch.Tensor, plan: Plan) -> torch.Tensor:
        """The denoising latents as (batch, channels, h, w), for the preview projection."""
        return latents

    def encode_for_preview(self, pipe: Any, image: torch.Tensor) -> torch.Tensor:
        """Encode ``image`` (1, 3, H, W in [-1, 1]) into the same space as :meth:`spatial_latents`."""
        raise NotImplementedError

    def images(self, output: Any, plan: Plan) -> list[Image.Image]:
        """Final pictures (or video frames, in order) from the pipeline's output."""
        return list(output.images)


def vae_latents(vae: Any, image: torch.Tensor) -> torch.Tensor:
    """The deterministic latents of ``image``: the posterior's mode for a KL autoencoder, the output of a
    deterministic one (``AutoencoderTiny``'s ``latents``; ``AutoencoderDC``'s ``latent``, or ``latents``
    once :func:`expose_latents` has run)."""
    encoded = vae.encode(image)
    dist = getattr(encoded, "latent_dist", None)
    if dist is not None:
        return dist.mode()
    return encoded.latents if hasattr(encoded, "latents") else encoded.latent


def expose_latents(vae: Any) -> None:
    """Make ``vae``'s encoder output readable by diffusers' img2img and inpaint pipelines.

    Those read an encoding as ``latent_dist`` (a KL autoencoder) or ``latents`` (``AutoencoderTiny``);
    ``AutoencoderDC`` (the pixel-shuffle autoencoder of Sana, and of flux/mini) names it ``latent``,
    and ``FluxImg2ImgPipeline`` then fails with "Could not access latents of provided encoder_output".
    Such a VAE gets, on this instance only, an ``encode`` whose output carries the same tensor as
    ``latents``. Other VAEs are left as they are; calling it twice changes nothing.
    """
    from diffusers import AutoencoderDC
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput

    if not isinstance(vae, AutoencoderDC) or "encode" in vars(vae):
        return
    original = vae.encode

    def encode(x: torch.Tensor, return_dict: bool = True) -> Any:
        latent = original(x, return_dict=False)[0]
        return AutoencoderTinyOutput(latents=latent) if return_dict else (latent,)

    vae.encode = encode


def fit_to(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale ``image`` to cover ``width``x``height`` and crop the centre, keeping its aspect ratio.

    Only the kept region is resampled, so a 1x4096 input costs no more than a square one.
    """
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    crop_w, crop_h = width / scale, height / scale
    left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
    resample = Image.Resampling.NEAREST if image.mode == "L" else Image.Resampling.LANCZOS
    return image.resize((width, height), resample, box=(left, top, left + crop_w, top + crop_h))


def crop_centre(image: Image.Image, width: int, height: int) -> Image.Image:
    """The centre ``width``x``height`` of ``image`` (outputs generated at a rounded-up size)."""
    if image.size == (width, height):
        return image
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def frames_from_array(video: np.ndarray) -> list[Image.Image]:
    """(frames, H, W, 3) floats in [0, 1] -> 8-bit RGB images."""
    arr = np.clip(np.asarray(video, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return [Image.fromarray(frame, "RGB") for frame in arr]
