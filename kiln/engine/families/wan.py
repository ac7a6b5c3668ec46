"""WAN 2.2: WanPipeline (text-to-video) and WanImageToVideoPipeline (image-to-video)."""

from __future__ import annotations

from typing import Any

import torch

from kiln.engine.families.base import Adapter, fit_to, frames_from_array


class WanAdapter(Adapter):
    name = "wan"
    pipeline_classes = frozenset({"WanPipeline", "WanImageToVideoPipeline"})
    count_argument = "num_videos_per_prompt"
    size_multiple = 32  # VAE 16 x patch 2

    def call_kwargs(self, plan, pipe) -> dict[str, Any]:
        kwargs = self.prompt_kwargs(plan)
        kwargs.update(num_frames=plan.num_frames, output_type="np")
        if plan.negative_prompt:
            kwargs["negative_prompt"] = plan.negative_prompt
        if plan.image is not None:
            kwargs["image"] = fit_to(plan.image, plan.gen_width, plan.gen_height)
        return kwargs

    def spatial_latents(self, pipe, latents, plan) -> torch.Tensor:
        return latents[:, :, -1]  # (B, C, F, h, w): the newest frame

    def encode_for_preview(self, pipe, image) -> torch.Tensor:
        cfg = pipe.vae.config
        latents = pipe.vae.encode(image.unsqueeze(2)).latent_dist.mode()
        mean = torch.tensor(cfg.latents_mean, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1, 1)
        return ((latents - mean) / std)[:, :, 0]

    def images(self, output, plan):
        return frames_from_array(output.frames[0])
