"""Turn a :class:`GenerationRequest` into a fully resolved :class:`Plan`, or refuse it.

Every check a user can fail happens here, before any model is loaded or any weight is touched:
unknown model or alias, task, format, steps, guidance, sampler, scheduler, strength, seed, prompt,
unreadable or oversized images, a mask of another size, upscaling and detail passes the model cannot
run (:mod:`kiln.engine.refinement`). The rules come from the catalog entry and from the architecture
adapter (what its pipelines can take); nothing about a model is written here.
"""

from __future__ import annotations

import io
import math
import secrets
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from kiln.catalog import KNOWN_SAMPLERS, KNOWN_SCHEDULERS, TASKS_NEEDING_IMAGE, Catalog, ModelSpec
from kiln.engine.families import adapter_for
from kiln.engine.pixels import PixelError, to_mask8, to_rgb8
from kiln.engine.refinement import Refinement, plan_refinement
from kiln.engine.request import MAX_SEED, MIN_PROMPT_CHARS, GenerationRequest, LoraRef
from kiln.errors import InvalidImage, InvalidParameters, InvalidPrompt, ModelUnavailable

MAX_INPUT_SIDE = 4096
DEFAULT_STRENGTH = {"i2i": 0.7, "edit": 1.0}
# i2i may go without a prompt when it mostly redraws the image (the render API's rule).
PROMPTLESS_I2I_STRENGTH = 0.8


@dataclass(frozen=True)
class Plan:
    """A request with every default filled in and every input decoded; what the engine runs."""

    spec: ModelSpec
    task: str
    width: int
    height: int
    # What the pipeline is asked for: the format's size rounded up to the architecture's multiple
    # (WAN's 720p is 1280x720, its latents need 1280x736); outputs are centre-cropped back.
    gen_width: int
    gen_height: int
    prompt: str
    negative_prompt: str | None
    steps: int
    guidance: float
    seed: int
    sampler: str | None
    scheduler: str | None
    strength: float | None
    image: Image.Image | None
    mask: Image.Image | None
    num_outputs: int
    num_frames: int | None = None
    fps: int | None = None
    loras: tuple[LoraRef, ...] = ()  # each adapter once (the weights of repeats added), in request order
    # Upscaling and detail passes after the base generation (kiln.engine.refinement); None: none.
    refinement: Refinement | None = None
    precision: str = "native"  # or fp8: which the engine can run is its own check (Engine.plan)

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the outputs: the base size, or the last refinement pass's."""
        return self.refinement.size if self.refinement is not None else (self.width, self.height)

    @property
    def seeds(self) -> list[int]:
        """One seed per output: output *i* is what the same request with ``seed + i`` gives alone."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_outputs)]


def plan_request(request: GenerationRequest, catalog: Catalog) -> Plan:
    spec = catalog.resolve(request.family, request.model)
    if spec.status == "coming_soon":
        raise ModelUnavailable(f"{spec.key} is announced but not available yet")
    catalog.check_task(spec, request.task)
    width, height = catalog.size_for(spec, request.format, request.width, request.height)
    adapter = adapter_for(spec)
    multiple = spec.size_multiple or adapter.size_multiple

    steps = _steps(request.steps, spec)
    strength = _strength(request, spec, adapter.strength_tasks, steps)
    prompt = _prompt(request, strength)
    loras = _loras(request, spec, catalog)
    if request.negative_prompt and not spec.negative_prompt:
        takers = [m.key for m in catalog if m.negative_prompt and m.status != "coming_soon"]
        raise InvalidParameters(
            f"{spec.key} does not use a negative prompt; leave negative_prompt out, or use a model that does: "
            f"{', '.join(takers) or 'none on this server'}",
            details={"field": "negative_prompt", "models": takers},
        )
    image, mask = _images(request)

    num_frames = fps = None
    if spec.video is not None:
        if request.num_outputs != 1:
            raise InvalidParameters(f"{spec.key} makes one video per request; num_outputs must be 1")
        duration = _in_range("duration", request.duration, spec.video.duration, spec.key, unit=" s")
        fps = spec.video.fps
        k = spec.video.frame_multiple
        num_frames = k * max(1, round(duration * fps / k)) + 1
    elif request.duration is not None:
        raise InvalidParameters(f"duration applies to video models; {spec.key} makes images")

    return Plan(
        spec=spec,
        task=request.task,
        width=width,
        height=height,
        gen_width=-(-width // multiple) * multiple,
        gen_height=-(-height // multiple) * multiple,
        prompt=prompt,
        negative_prompt=request.negative_prompt or None,
        steps=steps,
        guidance=_guidance(request.guidance, spec),
        seed=request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1),
        sampler=_choice("sampler", request.sampler, spec.samplers, KNOWN_SAMPLERS, spec.key),
        scheduler=_choice("scheduler", request.scheduler, spec.schedulers, KNOWN_SCHEDULERS, spec.key),
        strength=strength,
        image=image,
        mask=mask,
        num_outputs=request.num_outputs,
        num_frames=num_frames,
        fps=fps,
        loras=loras,
        refinement=plan_refinement(request, spec, adapter, width, height, multiple),
        precision=_precision(request, loras),
    )


def _precision(request: GenerationRequest, loras: tuple[LoraRef, ...]) -> str:
    precision = request.precision or "native"
    if precision == "fp8" and loras:
        raise InvalidParameters(
            "precision fp8 quantizes the transformer, and LoRA adapters cannot be applied to it; "
            "send loras or precision fp8, not both",
            details={"field": "precision"},
        )
    return precision


def _prompt(request: GenerationRequest, strength: float | None) -> str:
    prompt = request.prompt.strip()
    if len(prompt) >= MIN_PROMPT_CHARS:
        return prompt
    if request.task == "i2i" and not prompt and strength is not None and strength > PROMPTLESS_I2I_STRENGTH:
        return ""
    if not prompt:
        raise InvalidPrompt("a prompt is required (i2i may omit it only with strength above 0.8)")
    raise InvalidPrompt(f"prompt too short: at least {MIN_PROMPT_CHARS} characters")


def _steps(steps: int | None, spec: ModelSpec) -> int:
    rng = spec.steps
    if steps is None:
        return rng.default
    if rng.fixed and steps != rng.min:
        raise InvalidParameters(f"{spec.key} always runs {rng.min} steps; leave steps out or send {rng.min}")
    if not rng.min <= steps <= rng.max:
        raise InvalidParameters(
            f"steps must be between {rng.min} and {rng.max} for {spec.key}, got {steps}",
            details={"min": rng.min, "max": rng.max},
        )
    return steps


def _guidance(guidance: float | None, spec: ModelSpec) -> float:
    g = spec.guidance
    if g.mode == "ignored" or guidance is None:
        # The render API documents that models with fixed internal CFG ignore `guidance`.
        return g.value
    if g.mode == "fixed":
        if not math.isclose(guidance, g.value, abs_tol=1e-6):
            raise InvalidParameters(f"guidance is fixed at {g.value} for {spec.key}; leave it out or send {g.value}")
        return g.value
    assert g.min is not None and g.max is not None
    if not g.min <= guidance <= g.max:
        raise InvalidParameters(
            f"guidance must be between {g.min} and {g.max} for {spec.key}, got {guidance}",
            details={"min": g.min, "max": g.max},
        )
    return guidance


def _choice(what: str, value: str | None, allowed: list[str], known: tuple[str, ...], key: str) -> str | None:
    if value is None:
        return allowed[0] if allowed else None
    if value not in known:
        raise InvalidParameters(f"unknown {what} {value!r}; {what}s are: {', '.join(known)}")
    if not allowed:
        raise InvalidParameters(f"{key} uses its checkpoint's own scheduler; leave {what} out")
    if value not in allowed:
        raise InvalidParameters(
            f"{key} does not allow {what} {value!r}; allowed: {', '.join(allowed)}", details={"allowed": allowed}
        )
    return value


def _strength(request: GenerationRequest, spec: ModelSpec, strength_tasks: frozenset[str], steps: int) -> float | None:
    if request.task not in strength_tasks:
        if request.strength is not None:
            where = f"{spec.key} {request.task}" if request.task in ("i2i", "edit") else request.task
            raise InvalidParameters(f"strength does not apply to {where}; leave it out")
        return None
    strength = request.strength if request.strength is not None else DEFAULT_STRENGTH[request.task]
    # diffusers runs the last n - int(n - n*strength) of n steps; none at all is an error it raises late.
    if steps - int(steps - steps * strength) < 1:
        raise InvalidParameters(
            f"strength {strength} with {steps} steps runs no step; use a strength of at least {1 / steps:.3g}"
        )
    return strength


def _in_range(name: str, value: float | None, rng, key: str, unit: str = "") -> float:
    if value is None:
        return rng.default
    if not rng.min <= value <= rng.max:
        raise InvalidParameters(f"{name} must be between {rng.min}{unit} and {rng.max}{unit} for {key}, got {value}{unit}")
    return value


def _images(request: GenerationRequest) -> tuple[Image.Image | None, Image.Image | None]:
    task = request.task
    if task in TASKS_NEEDING_IMAGE and request.image is None:
        raise InvalidImage(f"{task} needs an input image")
    if task not in TASKS_NEEDING_IMAGE and request.image is not None:
        hint = {"t2i": "i2i", "t2v": "i2v"}.get(task, "")
        raise InvalidParameters(f"{task} takes no input image" + (f"; use {hint}" if hint else ""))
    if task == "edit" and request.mask is None:
        raise InvalidImage("edit needs a mask: white where the image is regenerated, black where it is kept")
    if task != "edit" and request.mask is not None:
        raise InvalidParameters(f"{task} takes no mask; masks are for edit")
    image = _decode(request.image, "image", "RGB") if request.image is not None else None
    mask = _decode(request.mask, "mask", "L") if request.mask is not None else None
    if image is not None and mask is not None and mask.size != image.size:
        raise InvalidImage(
            f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; they must match"
        )
    return image, mask


# MPO is how phones store JPEGs with a depth or preview frame; its first frame is the JPEG.
ACCEPTED_TYPES = ("PNG", "JPEG", "MPO", "WEBP")


def _decode(data: bytes, what: str, mode: str) -> Image.Image:
    """Decode an uploaded picture upright (EXIF orientation applied) as 8-bit sRGB RGB or an L mask.

    The size is checked from the header, before any pixel is decoded.
    """
    where = {"field": what}  # which input, for clients that point at the field
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in ACCEPTED_TYPES:
            raise InvalidImage(f"the {what} is {img.format or 'of an unknown type'}; send PNG, JPEG or WebP", details=where)
        if max(img.size) > MAX_INPUT_SIDE or min(img.size) < 1:
            raise InvalidImage(f"the {what} is {img.width}x{img.height}; at most {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}",
                               details=where)
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_mask8(img) if mode == "L" else to_rgb8(img)
    except InvalidImage:
        raise
    except PixelError as exc:
        raise InvalidImage(f"the {what} cannot be used: {exc}", details=where) from exc
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImage(f"the {what} could not be read as an image ({type(exc).__name__})", details=where) from exc


def check_lora_support(spec: ModelSpec, catalog: Catalog, field: str = "loras") -> None:
    """Refuse LoRAs for a model whose catalog entry takes none, saying why and naming those that do
    (the API edge asks before downloading any adapter)."""
    if not spec.lora:
        takers = [m.key for m in catalog if m.lora and m.status != "coming_soon"]
        why = spec.lora_refusal or "its catalog entry says it takes none"
        raise InvalidParameters(
            f"{spec.key} does not take LoRAs: {why}. Models that do: {', '.join(takers) or 'none on this server'}",
            details={"field": field, "models": takers},
        )


def _loras(request: GenerationRequest, spec: ModelSpec, catalog: Catalog) -> tuple[LoraRef, ...]:
    if not request.loras:
        return ()
    check_lora_support(spec, catalog)
    merged: dict[str, LoraRef] = {}
    for ref in request.loras:
        seen = merged.get(ref.sha256)
        merged[ref.sha256] = ref if seen is None else seen.model_copy(update={"weight": seen.weight + ref.weight})
    return tuple(merged.values())
