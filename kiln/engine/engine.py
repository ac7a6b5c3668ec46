"""The engine: one canonical request in, pictures or a video out.

It knows nothing of HTTP, jobs or storage. It loads each model once (``from_pretrained`` for the
first task's pipeline, ``from_pipe`` for the others, so weights are shared), runs one request at a
time per model (diffusers pipelines and schedulers keep per-call state), reports every step, and
stops between steps when asked to.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from kiln.catalog import Catalog, ModelSpec
from kiln.engine import weights
from kiln.engine.families import Adapter, adapter_for
from kiln.engine.lora import LoraFiles, LoraSlots
from kiln.engine.families.base import crop_centre
from kiln.engine.outputs import ImageOutput, Output, VideoOutput
from kiln.engine.plan import Plan, plan_request
from kiln.engine.previews import LatentPreviewer
from kiln.engine.refine import render
from kiln.engine.request import GenerationRequest
from kiln.engine.samplers import make_scheduler, step_completed, total_steps
from kiln.errors import GenerationCancelled, GenerationError, KilnError, ModelLoadFailed, OutOfMemory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepEvent:
    """One finished denoising step. ``preview`` is set only when previews were asked for."""

    step: int
    total: int
    preview: Image.Image | None = None


@dataclass(frozen=True)
class GenerationResult:
    """The outputs and every parameter that produced them (defaults filled in)."""

    outputs: list[Output]
    model: str
    task: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float
    sampler: str | None
    scheduler: str | None
    strength: float | None
    num_frames: int | None
    fps: int | None
    elapsed_ms: int
    # Upscaling and detail (kiln.engine.refinement); detail_strength is None without detail_enhance.
    upscale: float | None = None
    latent_upscale: float | None = None
    detail_strength: float | None = None


OnStep = Callable[[StepEvent], None]


class LoadedModel:
    """A model's pipelines (one per task, sharing weights) and the lock that serialises them."""

    def __init__(self, spec: ModelSpec, adapter: Adapter, pipelines: dict[str, Any]) -> None:
        self.spec = spec
        self.adapter = adapter
        self.pipelines = pipelines
        self.lock = threading.Lock()
        self.loras = LoraSlots(spec.key)  # adapters loaded into the shared transformer
        base = next(iter(pipelines.values()))
        self._scheduler_class = type(base.scheduler)
        self._scheduler_config = dict(base.scheduler.config)
        self._previewer: LatentPreviewer | None = None

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The checkpoint's scheduler settings, which every call's fresh scheduler starts from."""
        return dict(self._scheduler_config)

    def new_scheduler(self, plan: Plan, **config: Any) -> Any:
        """A fresh scheduler for one call: schedulers keep state, so no two calls share one.
        ``config`` overrides checkpoint settings for this call (a refinement pass's shift)."""
        base = {**self._scheduler_config, **config}
        if plan.sampler is None:
            return self._scheduler_class.from_config(base)
        return make_scheduler(base, plan.sampler, plan.scheduler or "simple", seeds=plan.seeds)

    def previewer(self, pipe: Any) -> LatentPreviewer:
        if self._previewer is None:
            self._previewer = LatentPreviewer.fit(self.adapter, pipe)
        return self._previewer


class Engine:
    """Runs generation requests against the models of a catalog.

    Thread-safe: requests for different models may run at once; requests for one model queue on
    its lock. ``device`` defaults to CUDA when present (weights in the catalog's dtype), else the
    CPU in float32.
    """

    def __init__(self, catalog: Catalog, *, device: str | None = None) -> None:
        self.catalog = catalog
        for spec in catalog:
            adapter_for(spec)  # an entry naming pipelines no adapter knows is a start-up error
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._models: dict[str, LoadedModel] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    # --- models ----------------------------------------------------------------------------------

    def dtype_for(self, spec: ModelSpec) -> torch.dtype:
        return torch.float32 if self.device.type == "cpu" else getattr(torch, spec.dtype)

    def installed(self, spec: ModelSpec) -> bool:
        return weights.locate(spec) is not None

    def loaded(self) -> list[str]:
        return list(self._models)

    def load(self, spec: ModelSpec) -> LoadedModel:
        """Load ``spec`` once (later calls return the same object); never downloads."""
        with self._guard:
            if spec.key in self._models:
                return self._models[spec.key]
            lock = self._load_locks.setdefault(spec.key, threading.Lock())
        with lock:
            loaded = self._models.get(spec.key)
            if loaded is None:
                loaded = self._models[spec.key] = self._load(spec)
            return loaded

    def unload(self, key: str) -> None:
        with self._guard:
            self._models.pop(key, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _load(self, spec: ModelSpec) -> LoadedModel:
        import diffusers
        import transformers

        path = weights.require(spec)
        # Loading bars belong to an interactive session, not to a server's log.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        adapter = adapter_for(spec)
        started = time.perf_counter()
        pipelines: dict[str, Any] = {}
        try:
            base = None
            for task, class_name in spec.pipelines.items():
                cls = getattr(diffusers, class_name)
                if base is None:
                    with warnings.catch_warnings():
                        # diffusers 0.42 renames torch_dtype to dtype; older releases know only torch_dtype
                        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                        base = cls.from_pretrained(path, torch_dtype=self.dtype_for(spec))
                    if self.device.type != "cpu":
                        base = base.to(self.device)
                    pipe = base
                elif type(base) is cls:
                    pipe = base
                else:
                    # Hand the components over by name: from_pipe silently drops any whose class is not
                    # the one its signature names (flux/mini's AutoencoderTiny VAE) and then fails.
                    wanted = inspect.signature(cls.__init__).parameters
                    pipe = cls.from_pipe(base, **{k: v for k, v in base.components.items() if k in wanted and v is not None})
                pipe.set_progress_bar_config(disable=True)
                pipelines[task] = pipe
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, AttributeError) as exc:
            # The details (paths, library messages) go to the operator's log, not to API clients.
            log.exception("%s could not be loaded from %s", spec.key, path)
            raise ModelLoadFailed(f"{spec.key} could not be loaded ({type(exc).__name__}); see the server log") from exc
        log.info("loaded %s from %s in %.1fs", spec.key, path, time.perf_counter() - started)
        return LoadedModel(spec, adapter, pipelines)

    # --- generation ------------------------------------------------------------------------------

    def plan(self, request: GenerationRequest) -> Plan:
        """Validate ``request`` against the catalog without touching a model."""
        return plan_request(request, self.catalog)

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_step: OnStep | None = None,
        cancel: threading.Event | None = None,
        previews: bool = False,
        loras: LoraFiles | None = None,
    ) -> GenerationResult:
        """Run ``request`` and return its outputs.

        ``on_step`` is called once per denoising step, from this thread; with ``previews`` its
        event carries a small RGB preview of the first output. Setting ``cancel`` stops the run
        between steps with :class:`GenerationCancelled` and no output. ``loras`` is where the
        request's adapters are found (:class:`kiln.loras.LoraStore`). Every user error is raised
        before any denoising (an adapter that does not fit the model, once it is being loaded).
        """
        plan = self.plan(request)
        _check_cancel(cancel)
        loaded = self.load(plan.spec)
        parts = _parts(plan)
        _acquire(loaded.lock, cancel)
        try:
            started = time.perf_counter()
            loaded.loras.activate(loaded.pipelines[plan.task], plan.loras, loras)
            extra = plan.refinement.steps(plan.steps, plan.num_outputs) if plan.refinement is not None else 0
            progress = _Progress(loaded, plan, on_step, cancel, previews, runs=len(parts), extra=extra)
            run = functools.partial(self._run, loaded, progress=progress)
            pictures = render(plan, parts, run, loaded, functools.partial(_check_cancel, cancel))
            elapsed_ms = round((time.perf_counter() - started) * 1000)
        finally:
            loaded.lock.release()
        return self._result(plan, pictures, elapsed_ms)

    def _run(
        self, loaded: LoadedModel, plan: Plan, progress: _Progress, scheduler_config: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Any:
        """One pipeline call for ``plan`` (the base generation or one refinement pass); ``overrides``
        are pipeline arguments set last (a refinement's ``output_type`` or latent ``image``),
        ``scheduler_config`` overrides the checkpoint's scheduler settings for this call."""
        pipe = loaded.pipelines[plan.task]
        progress.plan = plan  # previews unpack latents at this call's size
        pipe.scheduler = loaded.new_scheduler(plan, **(scheduler_config or {}))
        adapter = loaded.adapter
        kwargs = adapter.call_kwargs(plan, pipe)
        kwargs.update(
            num_inference_steps=plan.steps,
            guidance_scale=plan.guidance,
            generator=[torch.Generator("cpu").manual_seed(s) for s in plan.seeds],
            callback_on_step_end=progress,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        kwargs[adapter.count_argument] = plan.num_outputs
        kwargs.update(overrides)
        try:
            with torch.inference_mode():
                return pipe(**kwargs)
        except KilnError:
            raise
        except torch.OutOfMemoryError as exc:
            raise OutOfMemory(f"{plan.spec.key} ran out of memory at {plan.width}x{plan.height}") from exc
        except Exception as exc:
            log.exception("generation failed for %s %s", plan.spec.key, plan.task)
            raise GenerationError(f"{plan.spec.key} {plan.task} failed: {type(exc).__name__}") from exc

    def _result(self, plan: Plan, pictures: list[Image.Image], elapsed_ms: int) -> GenerationResult:
        width, height = plan.output_size
        pictures = [crop_centre(p, width, height) for p in pictures]
        outputs: list[Output]
        if plan.spec.modality == "video":
            outputs = [VideoOutput(frames=pictures, fps=plan.fps or 24, seed=plan.seed)]
        else:
            outputs = [ImageOutput(image=img, seed=seed) for img, seed in zip(pictures, plan.seeds, strict=True)]
        return GenerationResult(
            outputs=outputs,
            model=plan.spec.key,
            task=plan.task,
            width=width,
            height=height,
            seed=plan.seed,
            steps=plan.steps,
            guidance=plan.guidance,
            sampler=plan.sampler,
            scheduler=plan.scheduler,
            strength=plan.strength,
            num_frames=plan.num_frames,
            fps=plan.fps,
            elapsed_ms=elapsed_ms,
            upscale=plan.refinement.upscale if plan.refinement is not None else None,
            latent_upscale=plan.refinement.latent_upscale if plan.refinement is not None else None,
            detail_strength=plan.refinement.detail_strength if plan.refinement is not None else None,
        )


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("the request was cancelled")


class _Progress:
    """``callback_on_step_end`` for diffusers: counts user-visible steps, previews, cancels.

    One object spans every pipeline call of a request (``runs`` of them, then the refinement passes,
    which add ``extra`` steps), so steps count on across calls and ``total`` covers them all.
    """

    def __init__(
        self, loaded: LoadedModel, plan: Plan, on_step, cancel, previews: bool, runs: int = 1, extra: int = 0
    ) -> None:
        self.loaded, self.plan, self.runs, self.extra = loaded, plan, runs, extra
        self.on_step, self.cancel, self.previews = on_step, cancel, previews
        self.step = 0
        self.total: int | None = None

    def __call__(self, pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        scheduler = pipe.scheduler
        if self.total is None:
            self.total = total_steps(scheduler) * self.runs + self.extra
        if step_completed(scheduler):
            self.step += 1
            if self.on_step is not None:
                preview = None
                if self.previews and "latents" in tensors:
                    spatial = self.loaded.adapter.spatial_latents(pipe, tensors["latents"], self.plan)
                    preview = self.loaded.previewer(pipe).render(spatial[:1])[0]
                self.on_step(StepEvent(step=self.step, total=self.total, preview=preview))
        _check_cancel(self.cancel)
        return {}


def _parts(plan: Plan) -> list[Plan]:
    """The pipeline calls one request takes.

    diffusers' img2img and inpaint pipelines encode the input image with the first generator only,
    so in a batch output *i* would not be what seed *s + i* gives alone; those requests run one
    call per seed. Everything else runs as one batch.
    """
    if plan.image is None or plan.num_outputs == 1:
        return [plan]
    return [replace(plan, seed=seed, num_outputs=1) for seed in plan.seeds]


def _acquire(lock: threading.Lock, cancel: threading.Event | None) -> None:
    """Wait for the model's lock, giving up as soon as ``cancel`` is set."""
    if cancel is None:
        lock.acquire()
        return
    while not lock.acquire(timeout=0.05):
        _check_cancel(cancel)
    if cancel.is_set():
        lock.release()
        _check_cancel(cancel)
