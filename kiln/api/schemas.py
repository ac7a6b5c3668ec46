"""Request and response bodies of the render API (reference: ``000_…``, Request/Response Schemas).

Bounds that hold for every model are declared on the fields, so ``/openapi.json`` shows them;
per-model ranges come from the catalog and are checked by the engine's planner.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kiln.catalog import KNOWN_SAMPLERS, KNOWN_SCHEDULERS
from kiln.engine.request import MAX_LORAS

MAX_SEED = 2**32 - 1
Sampler = Literal[KNOWN_SAMPLERS]  # type: ignore[valid-type]
Scheduler = Literal[KNOWN_SCHEDULERS]  # type: ignore[valid-type]


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2048)
    weight: float = Field(default=1.0, ge=0.0, le=1.5)


class GenerateBody(BaseModel):
    """Body of ``POST /image/…`` and ``POST /video/…`` (and the generation part of ``/queue``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(default="", max_length=5000, description="3-5000 characters (i2i with strength > 0.8 may omit it)")
    negative_prompt: str | None = Field(default=None, max_length=5000)
    steps: int | None = Field(default=None, ge=1, description="per model: FLUX dev 15-50, schnell 4, Z-Image 5-12")
    guidance: float | None = Field(default=None, ge=0.0, allow_inf_nan=False, description="per model: FLUX 1.0-5.0")
    cfg: float | None = Field(default=None, ge=0.0, allow_inf_nan=False, description="video guidance (WAN 6-8)")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    sampler: Sampler | None = None
    scheduler: Scheduler | None = None
    image: str | None = Field(default=None, max_length=30_000_000, description="http(s) URL, data URI or upload URL")
    mask: str | None = Field(default=None, max_length=30_000_000, description="edit: white is regenerated")
    strength: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    duration: float | None = Field(default=None, gt=0.0, allow_inf_nan=False, description="video seconds, 0.5-10")
    loras: list[LoraSpec] | None = Field(default=None, max_length=MAX_LORAS)
    upscale: Literal[1.5, 2, 4] | None = Field(default=None, description="multiply the output size (resize + img2img pass)")
    latent_upscale: float | None = Field(default=None, gt=1.0, le=4.0, description="multiply the size in latent space "
                                         "and denoise again before decoding (1024 x 1.5 = 1536)")
    detail_enhance: bool | None = Field(default=None, description="a refinement pass at the output size")
    detail_strength: float | None = Field(default=None, ge=0.0, le=1.0, description="detail_enhance: 0-1, default 0.5")
    precision: Literal["native", "fp8"] | None = Field(
        default=None, description="native (the model's dtype) or fp8 where GET /models lists it for the model")


class QueueBody(GenerateBody):
    """Body of ``POST /queue``."""

    modality: Literal["image", "video"]
    family: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=64)
    task: Literal["t2i", "i2i", "t2v", "i2v", "edit"]
    format: str | None = Field(default=None, max_length=32)
    priority: Literal["low", "normal", "high"] = "normal"
    webhook: str | None = Field(default=None, max_length=2048)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)


