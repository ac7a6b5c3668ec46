"""Cheap step previews: a linear map from latent channels to RGB, no second network.

The map is fitted once per loaded model by least squares: a fixed calibration picture is encoded
by the model's own VAE into the space the denoiser works in, and channels are regressed onto the
picture's colours at latent resolution. It costs one small VAE encode at first use and a matrix
product per preview, and it works for any VAE (including toy ones) without shipped constants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from kiln.engine.families.base import Adapter

CALIBRATION_SIDE = 256


def calibration_image(side: int = CALIBRATION_SIDE) -> np.ndarray:
    """Saturated and neutral colours in blocks plus smooth gradients: (side, side, 3) floats in [0, 1]."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1)
    img = np.stack([x, y, 1.0 - 0.5 * (x + y)], axis=-1)
    palette = np.array(
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1], [0, 0, 0], [0.5, 0.5, 0.5]],
        dtype=np.float32,
    )
    block = side // 8
    for i, colour in enumerate(palette):
        r, c = divmod(i, 3)
        img[block * (1 + 2 * r) : block * (2 + 2 * r), block * (1 + 2 * c) : block * (2 + 2 * c)] = colour
    return img


class LatentPreviewer:
    """Projects denoising latents of one model to a small RGB image."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight = weight  # (C, 3)
        self.bias = bias  # (3,)

    @classmethod
    @torch.no_grad()
    def fit(cls, adapter: Adapter, pipe: Any) -> LatentPreviewer:
        vae = pipe.vae
        rgb = torch.from_numpy(calibration_image()).permute(2, 0, 1).unsqueeze(0)
        x = (rgb * 2 - 1).to(device=vae.device, dtype=vae.dtype)
        lat = adapter.encode_for_preview(pipe, x).float().cpu()  # (1, C, h, w)
        _, c, h, w = lat.shape
        target = torch.nn.functional.interpolate(rgb, size=(h, w), mode="area")[0]  # (3, h, w)
        a = torch.cat([lat[0].reshape(c, -1).T, torch.ones(h * w, 1)], dim=1)  # (hw, C+1)
        b = target.reshape(3, -1).T  # (hw, 3)
        solution = torch.linalg.lstsq(a, b, driver="gelsd").solution  # (C+1, 3)
        return cls(solution[:c], solution[c])

    @torch.no_grad()
    def render(self, spatial: torch.Tensor) -> list[Image.Image]:
        """(B, C, h, w) latents -> one RGB image per batch item, at latent resolution."""
        lat = spatial.detach().float().cpu()
        rgb = torch.einsum("bchw,cr->bhwr", lat, self.weight) + self.bias
        arr = (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
        return [Image.fromarray(a, "RGB") for a in arr]
