"""Upscaling and detail passes (the render API's ``upscale``, ``latent_upscale``, ``detail_enhance``):
which passes a request takes, at what sizes and strengths, or why it cannot have them.

Each pass redraws a picture with the model's own img2img pipeline at a low strength, so a model
can have them only when its catalog entry names an ``i2i`` pipeline whose architecture takes a
``strength`` (FLUX.2's ``i2i`` is reference conditioning and does not); ``latent_upscale`` also
needs an img2img pipeline that takes latents (FLUX.1's). Video models have none of them.

The passes run in this order, each from the previous one's result:

1. ``latent_upscale`` (factor *a*): the base generation stops before its decode; its latents are
   interpolated (bicubic) by *a* and denoised again from ``LATENT_STRENGTH`` (noise added at that
   sigma), then decoded. The base size times *a*.
2. ``upscale`` (factor *u*: 1.5, 2 or 4 in the render API): a Lanczos resize by *u*, then an
   img2img pass at ``HIRES_STRENGTH`` ("hires fix"). Times *u*.
3. ``detail_enhance``: an img2img pass at the output size with strength
   ``0.1 + 0.3 * detail_strength`` (0.1-0.4; 0.5 gives 0.25), then an unsharp mask of
   ``80 * detail_strength`` percent (radius 2 px, threshold 2). Same size. Where the img2img
   pipeline takes latents (FLUX.1) it starts from the previous call's latents, with no VAE decode
   and encode in between.

So the output is ``format size x latent_upscale x upscale`` (each side rounded to a pixel after
each factor; 1024 with ``latent_upscale`` 1.5 is 1536, with ``upscale`` 4 is 4096), at most
``MAX_OUTPUT_SIDE`` a side. Every pass runs the request's steps, sampler, scheduler, prompt and
guidance, and output *i*'s passes use seed *s + i*, so the same request gives the same pixels.
A pass of strength *t* runs ``n - int(n - n * t)`` of the *n* steps (at least one).
On checkpoints whose timestep shift grows with the image size (FLUX.1), a pass larger than the
size the shift was fitted for (1024²) keeps the largest fitted shift (:func:`kiln.engine.refine.capped_shift`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kiln.errors import InvalidParameters

if TYPE_CHECKING:
    from kiln.catalog import ModelSpec
    from kiln.engine.families import Adapter
    from kiln.engine.request import GenerationRequest

# The largest side an upscaled output may have: 4x the largest format (1024) is allowed, as the
# render API's documentation implies; beyond it a single FLUX pass needs far more than an 80 GB GPU.
MAX_OUTPUT_SIDE = 4096
HIRES_STRENGTH = 0.3
# Interpolated latents are soft; redrawing their detail needs more of the schedule than a Lanczos
# resize does (ComfyUI's and A1111's latent hires fix recommend 0.5-0.6).
LATENT_STRENGTH = 0.55
DEFAULT_DETAIL_STRENGTH = 0.5

PassKind = Literal["latent_upscale", "upscale", "detail"]


def detail_denoise(detail_strength: float) -> float:
    """img2img strength of the detail pass: 0.1 (``detail_strength`` 0) to 0.4 (1)."""
    return 0.1 + 0.3 * detail_strength


def detail_sharpen(detail_strength: float) -> int:
    """Unsharp-mask percent after the detail pass: 0 to 80."""
    return round(80 * detail_strength)


def pass_steps(steps: int, strength: float) -> int:
    """User-visible steps an img2img call of ``steps`` steps at ``strength`` runs (diffusers' rule)."""
    return steps - int(steps - steps * strength)


@dataclass(frozen=True)
class Pass:
    """One img2img call per output: redraw at ``width`` x ``height`` (generated at ``gen_*``,
    centre-cropped back) from ``strength``, then sharpen by ``sharpen`` percent (0: not at all)."""

    kind: PassKind
    width: int
    height: int
    gen_width: int
    gen_height: int
    strength: float
    sharpen: int = 0


@dataclass(frozen=True)
class Refinement:
    """The passes a request takes after its base generation, in order, and the controls asked for."""

    passes: tuple[Pass, ...]
    upscale: float | None
    latent_upscale: float | None
    detail_strength: float | None

    @property
    def size(self) -> tuple[int, int]:
        """The output's size: the last pass's."""
        return self.passes[-1].width, self.passes[-1].height

    def steps(self, steps: int, outputs: int) -> int:
        """Steps every pass together adds to a request of ``steps`` steps and ``outputs`` outputs."""
        return outputs * sum(pass_steps(steps, p.strength) for p in self.passes)


def plan_refinement(
    request: GenerationRequest, spec: ModelSpec, adapter: Adapter, width: int, height: int, multiple: int
) -> Refinement | None:
    """The refinement of a ``width`` x ``height`` base generation, or None when none is asked for.

    Raises :class:`InvalidParameters` naming the control when the model cannot take it (from its
    catalog entry and architecture) or when the output would be larger than ``MAX_OUTPUT_SIDE``.
    """
    if request.detail_strength is not None and not request.detail_enhance:
        raise InvalidParameters("detail_strength goes with detail_enhance: true; send both or neither")
    asked = [name for name, on in (("latent_upscale", request.latent_upscale is not None),
                                   ("upscale", request.upscale is not None),
                                   ("detail_enhance", request.detail_enhance)) if on]
    if not asked:
        return None
    _check_model(asked, spec, adapter)

    def sized(kind: PassKind, w: int, h: int, strength: float, sharpen: int = 0) -> Pass:
        if max(w, h) > MAX_OUTPUT_SIDE:
            factors = " x ".join(f"{name} {getattr(request, name):g}" for name in asked if name != "detail_enhance")
            raise InvalidParameters(
                f"{width}x{height} x {factors} is {w}x{h}; outputs are at most {MAX_OUTPUT_SIDE} px a side",
                details={"max_side": MAX_OUTPUT_SIDE},
            )
        return Pass(kind, w, h, -(-w // multiple) * multiple, -(-h // multiple) * multiple, strength, sharpen)

    passes: list[Pass] = []
    w, h = width, height
    if request.latent_upscale is not None:
        w, h = round(w * request.latent_upscale), round(h * request.latent_upscale)
        passes.append(sized("latent_upscale", w, h, LATENT_STRENGTH))
    if request.upscale is not None:
        w, h = round(w * request.upscale), round(h * request.upscale)
        passes.append(sized("upscale", w, h, HIRES_STRENGTH))
    detail = None
    if request.detail_enhance:
        detail = request.detail_strength if request.detail_strength is not None else DEFAULT_DETAIL_STRENGTH
        passes.append(sized("detail", w, h, detail_denoise(detail), detail_sharpen(detail)))
    return Refinement(tuple(passes), request.upscale, request.latent_upscale, detail)


def offered(spec: ModelSpec, adapter: Adapter) -> list[str]:
    """The passes ``spec`` takes (``latent_upscale``, ``upscale``, ``detail_enhance``), for ``/models``."""
    out = []
    for name in ("upscale", "latent_upscale", "detail_enhance"):
        try:
            _check_model([name], spec, adapter)
        except InvalidParameters:
            continue
        out.append(name)
    return out


def _check_model(asked: list[str], spec: ModelSpec, adapter: Adapter) -> None:
    name = asked[0]
    if spec.modality != "image":
        raise InvalidParameters(f"{name} applies to image models; {spec.key} makes {spec.modality}s")
    if "i2i" not in spec.pipelines:
        raise InvalidParameters(f"{name} redraws the picture with the model's img2img pipeline, and {spec.key} has none")
    if "i2i" not in adapter.strength_tasks:
        raise InvalidParameters(
            f"{name} redraws the picture with a strength-based img2img pass; {spec.key}'s i2i "
            f"({spec.pipelines['i2i']}) is reference-image conditioning without strength"
        )
    if "latent_upscale" in asked and not adapter.latent_img2img:
        raise InvalidParameters(
            f"latent_upscale needs an img2img pipeline that takes latents; {spec.key}'s ({spec.pipelines['i2i']}) "
            "takes only pictures: use upscale"
        )
