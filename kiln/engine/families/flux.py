"""FLUX.1 (dev, schnell): FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline."""

from __future__ import annotations

from typing import Any

import torch

from kiln.engine.families.base import Adapter, vae_latents


class FluxAdapter(Adapter):
    name = "flux"
    pipeline_classes = frozenset({"FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"})
    strength_tasks = frozenset({"i2i", "edit"})
    # FluxImg2ImgPipeline takes an `image` tensor with the VAE's latent channels as latents as they are.
    latent_img2img = True

    def call_kwargs(self, plan, pipe) -> dict[str, Any]:
        kwargs = super().call_kwargs(plan, pipe)
        if plan.spec.true_cfg:
            # A model trained with dropped captions (flux/mini): guidance is true CFG against the
            # negative prompt, or against the empty caption it learned as "anything".
            if plan.guidance > 1.0:
                kwargs["true_cfg_scale"] = plan.guidance
                kwargs.setdefault("negative_prompt", "")
        elif plan.negative_prompt:
            # FLUX.1 is guidance-distilled: a negative prompt only acts through true CFG.
            kwargs["true_cfg_scale"] = plan.guidance
        return kwargs

    def spatial_latents(self, pipe, latents, plan) -> torch.Tensor:
        return pipe._unpack_latents(latents, plan.gen_height, plan.gen_width, pipe.vae_scale_factor)

    def encode_for_preview(self, pipe, image) -> torch.Tensor:
        cfg = pipe.vae.config
        latents = vae_latents(pipe.vae, image)
        return (latents - cfg.shift_factor) * cfg.scaling_factor
