"""The image safety classifier: one small interface, the Stable Diffusion safety checker behind it.

:class:`SafetyChecker` answers, for each picture, whether it is flagged. :class:`ClipSafetyChecker`
is the standard Stable Diffusion checker: diffusers' ``StableDiffusionSafetyChecker`` (a CLIP vision
tower whose projected image embedding is compared, by cosine, with 17 concept embeddings and 3
"special care" ones, each with its own threshold) and the ``CLIPImageProcessor`` saved beside it,
for example ``CompVis/stable-diffusion-safety-checker``. :class:`NoSafetyChecker` flags nothing: a
server with no classifier configured.

A checker loads from a local directory or from a hub id already in the Hugging Face cache: Kiln
never downloads while serving. Like the engine's pipelines, a checker is used from the worker's
thread only.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from PIL import Image

from kiln.engine.outputs import Output, VideoOutput
from kiln.errors import ModelLoadFailed

if TYPE_CHECKING:
    import torch


class SafetyChecker(Protocol):
    def flags(self, images: list[Image.Image]) -> list[bool]:
        """One verdict per image, in order: True where the image is flagged."""
        ...


class NoSafetyChecker:
    """Flags nothing."""

    def flags(self, images: list[Image.Image]) -> list[bool]:
        return [False] * len(images)


class ClipSafetyChecker:
    """diffusers' ``StableDiffusionSafetyChecker`` with its ``CLIPImageProcessor``, loaded once.

    ``source`` is a directory holding both (``config.json``, the weights, ``preprocessor_config.json``)
    or a hub id in the Hugging Face cache. Any load failure is :class:`ModelLoadFailed` naming the
    source and what to do. ``device`` defaults to CUDA when present (float16 there, float32 on a CPU).
    """

    def __init__(self, source: str, device: str | torch.device | None = None) -> None:
        import torch
        import transformers
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        self.source = source
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float32 if self.device.type == "cpu" else torch.float16
        local = is_local(source)
        where = str(Path(source).expanduser()) if local else source
        if local and not Path(where).is_dir():
            raise ModelLoadFailed(f"safety checker {source}: no such directory")
        transformers.utils.logging.disable_progress_bar()  # a server's log, not an interactive session
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # transformers' notes on processor backends and config ids
                model = StableDiffusionSafetyChecker.from_pretrained(where, dtype=self.dtype, local_files_only=True)
                self.processor = CLIPImageProcessor.from_pretrained(where, local_files_only=True)
            self.model = model.to(self.device).eval()
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, AttributeError) as exc:
            # start-up, not a request: the operator reads this, so it names the source and the cause
            cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            hint = "" if local else f"; Kiln never downloads while serving: fetch it once with `hf download {source}`"
            raise ModelLoadFailed(f"safety checker {source} could not be loaded ({cause}){hint}") from exc
        # diffusers warns on every flagged image; the worker reports verdicts itself
        logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)

    def flags(self, images: list[Image.Image]) -> list[bool]:
        if not images:
            return []
        import numpy as np
        import torch

        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        # The checker blacks out flagged images in place: hand it placeholders, never the outputs.
        placeholders = np.zeros((len(images), 1, 1, 3), dtype=np.float32)
        with torch.no_grad():
            _, flagged = self.model(clip_input=pixels.to(self.device, self.dtype), images=placeholders)
        return [bool(f) for f in flagged]


def is_local(source: str) -> bool:
    """The catalog's rule (a path starts with ``/``, ``./``, ``../`` or ``~``), or an existing directory."""
    return source.startswith(("/", "./", "../", "~")) or Path(source).is_dir()


def load_safety_checker(source: str | None, *, device: str | torch.device | None = None) -> SafetyChecker:
    """The configured classifier: :class:`ClipSafetyChecker` from ``source``, or :class:`NoSafetyChecker`."""
    if not source:
        return NoSafetyChecker()
    return ClipSafetyChecker(source, device=device)


def flag_outputs(checker: SafetyChecker, outputs: Sequence[Output]) -> list[bool]:
    """One verdict per output: an image as the checker sees it; a video flagged when its first,
    middle or last frame is (one batch for all of them)."""
    groups: list[list[Image.Image]] = []
    for output in outputs:
        if isinstance(output, VideoOutput):
            frames = output.frames
            groups.append([frames[i] for i in sorted({0, len(frames) // 2, len(frames) - 1})])
        else:
            groups.append([output.image])
    verdicts = checker.flags([image for group in groups for image in group])
    result, at = [], 0
    for group in groups:
        result.append(any(verdicts[at:at + len(group)]))
        at += len(group)
    return result
