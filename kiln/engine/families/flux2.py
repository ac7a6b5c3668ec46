"""FLUX.2 (dev): Flux2Pipeline. Its image input is reference conditioning, not a strength-based
img2img, so ``i2i`` here means "generate guided by this image" and strength does not apply."""

from __future__ import annotations

from typing import Any

import torch

from kiln.engine.families.base import Adapter, fit_to


class Flux2Adapter(Adapter):
    name = "flux2"
    pipeline_classes = frozenset({"Flux2Pipeline"})

    def call_kwargs(self, plan, pipe) -> dict[str, Any]:
        kwargs = self.prompt_kwargs(plan)
        if plan.image is not None:
            kwargs["image"] = [fit_to(plan.image, plan.gen_width, plan.gen_height)]
        return kwargs

    def spatial_latents(self, pipe, latents, plan) -> torch.Tensor:
        # Packed row-major: (B, h*w, C) with one token per 2x2 patch of the VAE latent.
        scale = pipe.vae_scale_factor * 2
        b, _, c = latents.shape
        return latents.view(b, plan.gen_height // scale, plan.gen_width // scale, c).permute(0, 3, 1, 2)

    def encode_for_preview(self, pipe, image) -> torch.Tensor:
        return pipe._encode_vae_image(image, generator=None)
