"""The canonical generation request: what every API dialect and the CLI translate into.

It is a frozen pydantic model: the engine never mutates it, and a request is safe to share between
threads, to queue and to log. Field bounds that hold for every model are declared here; the
per-model rules (steps, guidance, formats, samplers) come from the catalog and are checked by
:func:`kiln.engine.plan.plan_request` before any model work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kiln.errors import InvalidParameters, InvalidPrompt

Task = Literal["t2i", "i2i", "edit", "t2v", "i2v"]
Encoding = Literal["webp", "png", "jpeg"]
# What happens to an output the safety classifier flags: the request fails with NsfwDetected
# (refuse), or the output is left out and reported (withhold); off: not checked.
SafetyCheck = Literal["refuse", "withhold", "off"]
# How the transformer computes: native is the catalog's dtype (bfloat16 on a GPU, float32 on a CPU);
# fp8 is lossy float8 quantization, offered only where the model and the card allow it (see
# kiln.engine.optimize).
Precision = Literal["native", "fp8"]

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 5000
MIN_PROMPT_CHARS = 3
MAX_OUTPUTS = 4


MAX_LORAS = 5
MAX_LORA_WEIGHT = 4.0


class LoraRef(BaseModel):
    """One adapter a request applies: the file's SHA-256 (the LoRA store holds it) and its weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weight: float = Field(default=1.0, ge=0.0, le=MAX_LORA_WEIGHT, allow_inf_nan=False)
    source: str = Field(default="", max_length=2048, description="the URL or repo id it came from (logs, re-fetching)")


class GenerationRequest(BaseModel):
    """One generation, independent of transport. ``None`` means "the model's default"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1, max_length=64, description="model name or alias within the family")
    task: Task
    format: str | None = Field(
        default=None, min_length=1, max_length=32, description="a name from the catalog's format table (None: the model's first)"
    )
    width: int | None = Field(default=None, ge=1, le=8192, description="a pixel size instead of a format, with height")
    height: int | None = Field(default=None, ge=1, le=8192, description="a pixel size instead of a format, with width")
    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    # Upper bounds of steps, guidance and duration are the model's and are checked with its name.
    steps: int | None = Field(default=None, ge=1)
    guidance: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    sampler: str | None = None
    scheduler: str | None = None
    strength: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False, description="i2i/edit: how much to change")
    image: bytes | None = Field(default=None, repr=False, description="encoded input image (PNG, JPEG, WebP)")
    mask: bytes | None = Field(default=None, repr=False, description="edit: white = regenerate, black = keep")
    num_outputs: int = Field(default=1, ge=1, le=MAX_OUTPUTS)
    duration: float | None = Field(default=None, gt=0.0, allow_inf_nan=False, description="video length in seconds")
    # Passes after the base generation; kiln.engine.refinement says which models take them and how.
    upscale: float | None = Field(
        default=None, gt=1.0, le=4.0, allow_inf_nan=False, description="multiply the output size: resize + img2img pass"
    )
    latent_upscale: float | None = Field(
        default=None, gt=1.0, le=4.0, allow_inf_nan=False, description="multiply the size in latent space, denoise again"
    )
    detail_enhance: bool = Field(default=False, description="an img2img refinement pass at the output size")
    detail_strength: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False, description="detail_enhance: 0-1 (None: 0.5)"
    )
    encoding: Encoding = Field(default="webp", description="how image outputs are encoded (videos are always MP4)")
    loras: tuple[LoraRef, ...] = Field(default=(), max_length=MAX_LORAS, description="adapters, applied in order")
    precision: Precision | None = Field(
        default=None, description="native (the model's dtype) or fp8 where offered (None: native)"
    )
    safety_check: SafetyCheck | None = Field(
        default=None, description="None: the server's default (refuse if the classifier runs by default, else off)"
    )

    @model_validator(mode="after")
    def _one_size(self) -> GenerationRequest:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height go together")
        if self.width is not None and self.format is not None:
            raise ValueError("name a format or a width and height, not both")
        return self

    @classmethod
    def create(cls, **fields: object) -> GenerationRequest:
        """Build a request, turning validation failures into :class:`InvalidParameters`."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            if any(e["loc"][:1] in (("prompt",), ("negative_prompt",)) for e in exc.errors()):
                raise InvalidPrompt(
                    f"Prompt too long (max {MAX_PROMPT_CHARS} chars)"
                    if any(e["type"] == "string_too_long" for e in exc.errors())
                    else describe_validation_error(exc)
                ) from exc
            raise InvalidParameters(describe_validation_error(exc), details={"errors": _clean(exc)}) from exc


def describe_validation_error(exc: ValidationError) -> str:
    """One readable sentence per problem: ``seed: Input should be less than or equal to 4294967295``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def _clean(exc: ValidationError) -> list[dict[str, object]]:
    return [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
