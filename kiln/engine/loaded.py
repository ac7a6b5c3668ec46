"""A loaded model: its pipelines (one per task, sharing weights), per precision, and how they got there.

Loading is the first of three steps (load, optimize, warm up). :func:`load_pipelines` builds the
pipelines from a checkpoint (``from_pretrained`` for the first task, ``from_pipe`` for the others);
:func:`optimize_model` applies the model's switches (:mod:`kiln.engine.optimize`) to the shared
transformer and VAE and installs the text-encoder cache on every pipeline; the engine's warm-up runs
each shape once. An fp8 precision, where offered, is a second set of pipelines built on first use
around a quantized copy of the transformer (:func:`fp8_pipelines`); the VAE, text encoders and the
text cache are shared with the native ones.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch

from kiln.catalog import ModelSpec
from kiln.catalog.schema import Optimizations
from kiln.engine import optimize
from kiln.engine.families import Adapter
from kiln.engine.families.base import expose_latents
from kiln.engine.lora import LoraSlots
from kiln.engine.plan import Plan
from kiln.engine.previews import LatentPreviewer
from kiln.engine.samplers import make_scheduler
from kiln.engine.text_cache import TextEncoderCache


class LoadedModel:
    """A model's pipelines (one per task and precision, sharing weights) and the lock that serialises them.

    ``report`` records what each optimisation switch did; ``text_cache`` is the model's text-encoder
    cache (None when off).
    """

    def __init__(
        self,
        spec: ModelSpec,
        adapter: Adapter,
        pipelines: dict[str, Any],
        *,
        report: optimize.Report | None = None,
        text_cache: TextEncoderCache | None = None,
    ) -> None:
        self.spec = spec
        self.adapter = adapter
        self.pipelines = pipelines  # the native precision's
        self.lock = threading.Lock()
        self.loras = LoraSlots(spec.key)  # adapters loaded into the shared transformer
        self.report = report or optimize.Report()
        self.text_cache = text_cache
        base = next(iter(pipelines.values()))
        self._scheduler_class = type(base.scheduler)
        self._scheduler_config = dict(base.scheduler.config)
        self._previewer: LatentPreviewer | None = None
        self._variants: dict[str, dict[str, Any]] = {"native": pipelines}
        self._builders: dict[str, Callable[[], dict[str, Any]]] = {}

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The checkpoint's scheduler settings, which every call's fresh scheduler starts from."""
        return dict(self._scheduler_config)

    def new_scheduler(self, plan: Plan, seeds: list[int] | None = None, **config: Any) -> Any:
        """A fresh scheduler for one call: schedulers keep state, so no two calls share one.
        ``config`` overrides checkpoint settings for this call (a refinement pass's shift); ``seeds``
        are the call's output seeds when it is a batch of several requests."""
        base = {**self._scheduler_config, **config}
        if plan.sampler is None:
            return self._scheduler_class.from_config(base)
        return make_scheduler(base, plan.sampler, plan.scheduler or "simple", seeds=seeds or plan.seeds)

    def previewer(self, pipe: Any) -> LatentPreviewer:
        if self._previewer is None:
            self._previewer = LatentPreviewer.fit(self.adapter, pipe)
        return self._previewer

    def offer(self, precision: str, build: Callable[[], dict[str, Any]]) -> None:
        """Build ``precision``'s pipelines with ``build`` when first asked for."""
        self._builders[precision] = build

    def built(self, precision: str) -> bool:
        return precision in self._variants

    def pipelines_for(self, precision: str) -> dict[str, Any]:
        """The pipelines of ``precision``, built on first use (call with the model's lock held)."""
        pipelines = self._variants.get(precision)
        if pipelines is None:
            pipelines = self._variants[precision] = self._builders[precision]()
        return pipelines

    def text_scope(self, salt: Hashable) -> contextlib.AbstractContextManager[None]:
        """Text-cache keys inside carry ``salt`` (the request's LoRA adapters)."""
        return self.text_cache.scope(salt) if self.text_cache is not None else contextlib.nullcontext()


def load_pipelines(spec: ModelSpec, path: Path, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """One pipeline per task of ``spec``, all sharing the first one's components, on ``device``."""
    import diffusers

    pipelines: dict[str, Any] = {}
    base = None
    for task, class_name in spec.pipelines.items():
        cls = getattr(diffusers, class_name)
        if base is None:
            with warnings.catch_warnings():
                # diffusers 0.42 renames torch_dtype to dtype; older releases know only torch_dtype
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                base = cls.from_pretrained(path, torch_dtype=dtype)
            if device.type != "cpu":
                base = base.to(device)
            if getattr(base, "vae", None) is not None:
                expose_latents(base.vae)  # flux/mini's AutoencoderDC, for the img2img and inpaint pipelines
            pipe = base
        elif type(base) is cls:
            pipe = base
        else:
            pipe = derive(base, cls)
        pipe.set_progress_bar_config(disable=True)
        pipelines[task] = pipe
    return pipelines


def derive(base: Any, cls: type, **replace: Any) -> Any:
    """A ``cls`` pipeline on ``base``'s components, some replaced.

    The components are handed over by name: ``from_pipe`` silently drops any whose class is not the
    one its signature names (flux/mini's AutoencoderDC VAE) and then fails.
    """
    wanted = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in base.components.items() if k in wanted and v is not None}
    components.update(replace)
    pipe = cls.from_pipe(base, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def optimize_model(
    spec: ModelSpec, adapter: Adapter, pipelines: dict[str, Any], switches: Optimizations, *,
    device: torch.device, dtype: torch.dtype, compile_cache: Path | None, fp8_reason: str | None,
) -> tuple[optimize.Report, TextEncoderCache | None]:
    """Apply ``switches`` to a freshly loaded model; return the record and the text cache."""
    report = optimize.Report()
    base = next(iter(pipelines.values()))
    ctx = context(spec, adapter, switches, device, dtype, compile_cache)
    optimize.optimize_transformer(base.transformer, ctx, report)
    optimize.optimize_vae(base.vae, ctx, report)
    entries, max_bytes = optimize.text_cache_size(switches)
    cache = None
    if entries > 0:
        cache = TextEncoderCache(entries, max_bytes)
        for pipe in pipelines.values():
            cache.install(pipe)
        report.add("text_cache", "applied", f"up to {entries} prompts, {max_bytes // 2**20} MB")
    else:
        report.add("text_cache", "off")
    if not switches.fp8:
        report.add("fp8", "off")
    elif fp8_reason is not None:
        report.add("fp8", "skipped", fp8_reason)
    else:
        report.add("fp8", "applied", "precision fp8 offered; its transformer is quantized at warm-up or first use")
    batch = switches.max_batch or 1
    report.add("batching", "applied" if batch > 1 else "off", f"up to {batch} requests" if batch > 1 else "")
    return report, cache


def fp8_pipelines(
    loaded: LoadedModel, path: Path, switches: Optimizations, *, device: torch.device, dtype: torch.dtype,
    compile_cache: Path | None, quantize: optimize.Quantizer,
) -> dict[str, Any]:
    """The fp8 precision's pipelines: the checkpoint's transformer loaded again and quantized with
    ``quantize``, then fused, given its attention kernel and compiled like the native one; everything
    else is the native pipelines' own."""
    native = loaded.pipelines
    base = next(iter(native.values()))
    transformer = type(base.transformer).from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
    if device.type != "cpu":
        transformer = transformer.to(device)
    ctx = context(loaded.spec, loaded.adapter, switches, device, dtype, compile_cache)
    optimize.optimize_transformer(transformer, ctx, loaded.report, prefix="fp8 ", quantize=quantize)
    pipelines = {task: derive(pipe, type(pipe), transformer=transformer) for task, pipe in native.items()}
    if loaded.text_cache is not None:
        for pipe in pipelines.values():
            loaded.text_cache.install(pipe)
    return pipelines


def context(
    spec: ModelSpec, adapter: Adapter, switches: Optimizations, device: torch.device, dtype: torch.dtype,
    compile_cache: Path | None,
) -> optimize.Context:
    return optimize.Context(
        spec=spec, switches=switches, device=device, dtype=dtype, attention_masked=adapter.attention_masked,
        image_vae=spec.modality == "image", compile_cache=compile_cache,
    )
