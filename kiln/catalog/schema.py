"""Typed records for the model catalog (see ``default.toml`` for the file format).

The records are validated once when the catalog is loaded; everything downstream (request
validation, the engine, ``/models``) reads ranges and rules from them and from nowhere else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Modality = Literal["image", "video"]
Task = Literal["t2i", "i2i", "edit", "t2v", "i2v"]
Status = Literal["active", "beta", "coming_soon", "deprecated"]

TASK_MODALITY: dict[str, str] = {"t2i": "image", "i2i": "image", "edit": "image", "t2v": "video", "i2v": "video"}
TASKS_NEEDING_IMAGE = frozenset({"i2i", "edit", "i2v"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    default: float
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.min <= self.default <= self.max:
            raise ValueError(f"needs min <= default <= max, got {self.min} <= {self.default} <= {self.max}")
        return self


class StepRange(_Strict):
    default: int = Field(ge=1)
    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> StepRange:
        if not self.min <= self.default <= self.max:
            raise ValueError(f"needs min <= default <= max, got {self.min} <= {self.default} <= {self.max}")
        return self

    @property
    def fixed(self) -> bool:
        return self.min == self.max


class Guidance(_Strict):
    """Exactly one of: a range with a default, a fixed value, or a value used whatever is asked."""

    default: float | None = None
    min: float | None = None
    max: float | None = None
    fixed: float | None = None
    ignored: float | None = None

    @model_validator(mode="after")
    def _one_mode(self) -> Guidance:
        ranged = (self.default, self.min, self.max)
        modes = [all(v is not None for v in ranged), self.fixed is not None, self.ignored is not None]
        if sum(modes) != 1 or (modes[0] is False and any(v is not None for v in ranged)):
            raise ValueError("guidance is {default, min, max} or {fixed = X} or {ignored = X}")
        if modes[0] and not self.min <= self.default <= self.max:  # type: ignore[operator]
            raise ValueError(f"needs min <= default <= max, got {self.min} <= {self.default} <= {self.max}")
        return self

    @property
    def mode(self) -> Literal["range", "fixed", "ignored"]:
        if self.fixed is not None:
            return "fixed"
        if self.ignored is not None:
            return "ignored"
        return "range"

    @property
    def value(self) -> float:
        """What the pipeline gets when the request names no guidance."""
        if self.fixed is not None:
            return self.fixed
        if self.ignored is not None:
            return self.ignored
        return self.default  # type: ignore[return-value]


class SizeRange(_Strict):
    """Sizes in pixels a model takes besides its named formats: each side in [min, max].

    The compatible doors name sizes in pixels (WaveSpeed's ``size: "1000*600"``, OpenAI's
    ``"1536x1024"``); the render API names formats. The engine generates at the architecture's
    multiple and centre-crops, so any side in range comes back exactly that size.
    """

    min: int = Field(ge=64, le=8192)
    max: int = Field(ge=64, le=8192)

    @model_validator(mode="after")
    def _ordered(self) -> SizeRange:
        if self.min > self.max:
            raise ValueError(f"needs min <= max, got {self.min} > {self.max}")
        return self

    def __contains__(self, size: object) -> bool:
        width, height = size  # type: ignore[misc]
        return self.min <= width <= self.max and self.min <= height <= self.max


class VideoSpec(_Strict):
    fps: int = Field(ge=1, le=120)
    frame_multiple: int = Field(ge=1, description="frame counts are frame_multiple * k + 1")
    duration: Range


CompileChoice = Literal["off", "regional", "whole"]
AttentionChoice = Literal["auto", "native", "cudnn", "flash", "efficient", "math"]


class Optimizations(_Strict):
    """Speed switches for one model (``optimize = {...}`` in the catalog; the settings' ``optimize``
    overrides them for every model). ``None`` leaves a switch at the engine's default for the device:
    the lossless ones on where the device supports them (most only on CUDA), lossy ones off. What each
    does, and when it is skipped, is :mod:`kiln.engine.optimize`'s docstring."""

    compile: CompileChoice | None = Field(
        default=None, description="torch.compile the transformer: regional (its repeated blocks), whole, or off")
    compile_backend: str | None = Field(default=None, min_length=1, max_length=64,
                                        description="torch.compile backend (default inductor)")
    cuda_graphs: bool | None = Field(default=None, description="replay each compiled shape as a CUDA graph "
                                                                "(needs compile = whole)")
    autotune: bool | None = Field(default=None, description="inductor max-autotune: slower compiles, faster kernels")
    fuse_qkv: bool | None = Field(default=None, description="one projection for Q, K and V (not with LoRAs)")
    channels_last_vae: bool | None = None
    attention: AttentionChoice | None = Field(default=None, description="scaled-dot-product attention kernel")
    text_cache: int | None = Field(default=None, ge=0, le=100_000,
                                   description="text-encoder outputs kept for repeated prompts (0: off)")
    text_cache_mb: int | None = Field(default=None, ge=1, le=1_000_000, description="their memory bound")
    fp8: bool | None = Field(default=None, description="offer precision fp8 (lossy: torchao float8 dynamic "
                                                       "activations and weights, rowwise) where the card can")
    max_batch: int | None = Field(default=None, ge=1, le=16,
                                  description="compatible waiting requests run as one batch of up to this many")

    def over(self, base: Optimizations) -> Optimizations:
        """These switches where set, ``base``'s elsewhere."""
        return base.model_copy(update=self.model_dump(exclude_none=True))


class ModelSpec(_Strict):
    family: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    model: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    modality: Modality
    pipelines: dict[Task, str] = Field(min_length=1)
    formats: list[str] = Field(min_length=1)
    sizes: SizeRange | None = Field(default=None, description="pixel sizes accepted besides the formats")
    size_multiple: int | None = Field(
        default=None, ge=8, le=256, description="what each generated side must divide by, when the checkpoint's VAE "
        "differs from its architecture's (default: the architecture's)",
    )
    source: str = Field(min_length=1)
    revision: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    steps: StepRange
    guidance: Guidance
    samplers: list[str] = []
    schedulers: list[str] = []
    lora: bool = False
    lora_refusal: str | None = Field(default=None, description="why the model takes no LoRAs, told to a request that sends some")
    negative_prompt: bool = False
    true_cfg: bool = Field(
        default=False,
        description="guidance is true classifier-free guidance: a second transformer pass per step on the "
        "negative prompt (empty when none), mixed by the guidance scale; 1.0 turns it off",
    )
    max_sequence_length: int | None = Field(default=None, ge=1, le=4096, description="prompt tokens for the text encoder")
    video: VideoSpec | None = None
    status: Status = "active"
    random_weights: bool = False
    toy: str | None = Field(default=None, description="toy checkpoint kiln.testing.toys builds at `source`")
    optimize: Optimizations = Field(default_factory=Optimizations, description="speed switches (kiln.engine.optimize)")
    info: dict[str, Any] = {}
    # Set by the loader: the catalog file's directory, against which a relative source resolves.
    base_dir: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        for task in self.pipelines:
            if TASK_MODALITY[task] != self.modality:
                raise ValueError(f"task {task!r} produces {TASK_MODALITY[task]}, but the model's modality is {self.modality}")
        if self.toy is not None and (
            not self.source.startswith(("/", "./", "../", "~")) or Path(self.source).name != self.toy
        ):
            raise ValueError(f"a toy model's source is the local directory it is built in, ending in /{self.toy}")
        if (self.modality == "video") != (self.video is not None):
            raise ValueError("a video model needs a [video] table, and only a video model may have one")
        return self

    @property
    def key(self) -> str:
        return f"{self.family}/{self.model}"

    @property
    def tasks(self) -> list[str]:
        return list(self.pipelines)

    @property
    def local_path(self) -> Path | None:
        """The checkpoint directory when ``source`` is a path, else None (``source`` is a hub repo id).

        A path starts with ``/``, ``./``, ``../`` or ``~``; a relative one resolves against the
        directory of the catalog file. Hub ids (``org/name``) never start that way.
        """
        if not self.source.startswith(("/", "./", "../", "~")):
            return None
        src = Path(self.source).expanduser()
        return src if src.is_absolute() else (self.base_dir or Path.cwd()) / src


# --- other APIs' names for catalog models (the compatible front doors in kiln.api.dialects) --------

MODEL_KEY = r"^[a-z0-9][a-z0-9_-]*/[a-z0-9][a-z0-9_.-]*$"
NAME_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
DIALECT_NAMES: dict[str, str] = {
    "wavespeed": rf"^{NAME_PART}(/{NAME_PART})+$",  # owner/model[/variant], as in /api/v3/{owner}/{model…}
    "vyro": rf"^{NAME_PART}$",  # a style name
    "openai": rf"^{NAME_PART}$",  # a model name (gpt-image-1, dall-e-3); never FAMILY/MODEL, which it also takes
}


class DialectTarget(_Strict):
    """The catalog model another API's name stands for, with that API's defaults where they differ."""

    model: str = Field(pattern=MODEL_KEY, description="FAMILY/MODEL or FAMILY/ALIAS")
    steps: int | None = Field(default=None, ge=1, description="default steps under this name (else the model's)")
    guidance: float | None = Field(default=None, ge=0.0, description="default guidance under this name (else the model's)")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return {"model": value} if isinstance(value, str) else value


class Dialects(_Strict):
    """``[dialects.<name>]`` tables: a name in that API -> a catalog model."""

    wavespeed: dict[str, DialectTarget] = {}
    vyro: dict[str, DialectTarget] = {}
    openai: dict[str, DialectTarget] = {}

    @model_validator(mode="after")
    def _names(self) -> Dialects:
        for dialect, pattern in DIALECT_NAMES.items():
            for name in getattr(self, dialect):
                if not re.match(pattern, name) or len(name) > 128:
                    raise ValueError(f"[dialects.{dialect}] {name!r} is not a valid name there")
        return self
