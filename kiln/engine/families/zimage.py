"""Z-Image (turbo): ZImagePipeline, ZImageImg2ImgPipeline, ZImageInpaintPipeline."""

from __future__ import annotations

import torch

from kiln.engine.families.base import Adapter, vae_latents


class ZImageAdapter(Adapter):
    name = "zimage"
    pipeline_classes = frozenset({"ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"})
    strength_tasks = frozenset({"i2i", "edit"})
    attention_masked = True  # captions of different lengths are padded and masked

    def encode_for_preview(self, pipe, image) -> torch.Tensor:
        cfg = pipe.vae.config
        latents = vae_latents(pipe.vae, image)
        return (latents - cfg.shift_factor) * cfg.scaling_factor
