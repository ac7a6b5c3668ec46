"""The engine: one canonical request in, pictures or a video out.

It knows nothing of HTTP, jobs or storage. It loads each model once (``from_pretrained`` for the
first task's pipeline, ``from_pipe`` for the others, so weights are shared), optimizes it
(:mod:`kiln.engine.optimize`: the catalog's and the settings' switches), warms it up on request
(:meth:`Engine.warm_up`), runs one pipeline call at a time per model (diffusers pipelines and
schedulers keep per-call state) — one request, or a batch of compatible ones on purpose
(:meth:`Engine.generate_batch`) — reports every step, and stops between steps when asked to.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from kiln.catalog import Catalog, ModelSpec
from kiln.catalog.schema import Optimizations
from kiln.engine import optimize as optimize_module
from kiln.engine import refinement, weights
from kiln.engine.batch import AllSet, BatchItem, batch_key
from kiln.engine.families import adapter_for
from kiln.engine.families.base import crop_centre
from kiln.engine.loaded import LoadedModel, fp8_pipelines, load_pipelines, optimize_model
from kiln.engine.lora import LoraFiles
from kiln.engine.outputs import ImageOutput, Output, VideoOutput
from kiln.engine.plan import Plan, plan_request
from kiln.engine.refine import render
from kiln.engine.request import MAX_OUTPUTS, GenerationRequest
from kiln.engine.samplers import step_completed, total_steps
from kiln.errors import (
    GenerationCancelled,
    GenerationError,
    InvalidParameters,
    KilnError,
    ModelLoadFailed,
    OutOfMemory,
    UserError,
)

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
    precision: str = "native"  # or fp8 (kiln.engine.optimize)


OnStep = Callable[[StepEvent], None]


@dataclass(frozen=True)
class WarmUpRun:
    """One shape run by :meth:`Engine.warm_up` and how long it took (compiling included)."""

    format: str
    precision: str
    batch: int
    seconds: float
    result: GenerationResult


class Engine:
    """Runs generation requests against the models of a catalog.

    Thread-safe: requests for different models may run at once; requests for one model queue on
    its lock. ``device`` defaults to CUDA when present (weights in the catalog's dtype), else the
    CPU in float32. ``optimize`` overrides every model's catalog switches (the settings' ``optimize``);
    ``compile_cache_dir`` is where torch.compile keeps what it compiled across restarts.
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        device: str | None = None,
        optimize: Optimizations | None = None,
        compile_cache_dir: Path | None = None,
    ) -> None:
        self.catalog = catalog
        for spec in catalog:
            adapter_for(spec)  # an entry naming pipelines no adapter knows is a start-up error
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.overrides = optimize
        self.compile_cache_dir = compile_cache_dir
        # How the fp8 precision's transformer is quantized (torchao float8, rowwise); a test seam.
        self.quantize_fp8: optimize_module.Quantizer = optimize_module.quantize_fp8
        self._models: dict[str, LoadedModel] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    # --- switches --------------------------------------------------------------------------------

    def switches(self, spec: ModelSpec) -> Optimizations:
        """``spec``'s optimisation switches with the engine's overrides on top (None: the default)."""
        return self.overrides.over(spec.optimize) if self.overrides is not None else spec.optimize

    def fp8_unavailable(self) -> str | None:
        """Why this engine's device cannot run precision fp8, or None."""
        device = self.device
        return optimize_module.fp8_unavailable(
            device, optimize_module.cuda_capability(device), optimize_module.torchao_available()
        )

    def precisions(self, spec: ModelSpec) -> list[str]:
        """The precisions requests for ``spec`` may name here, the default first (for ``/models``)."""
        if self.switches(spec).fp8 and self.fp8_unavailable() is None:
            return ["native", "fp8"]
        return ["native"]

    def offers(self, spec: ModelSpec) -> dict[str, Any]:
        """What requests for ``spec`` may ask of this engine beyond the catalog's ranges, for ``/models``:
        ``precisions`` (:meth:`precisions`), ``strength_tasks`` (tasks that take ``strength``) and
        ``refinements`` (the upscale and detail passes it takes, :mod:`kiln.engine.refinement`)."""
        adapter = adapter_for(spec)
        return {
            "precisions": self.precisions(spec),
            "strength_tasks": sorted(t for t in adapter.strength_tasks if t in spec.pipelines),
            "refinements": refinement.offered(spec, adapter),
        }

    def max_batch(self, spec: ModelSpec) -> int:
        """How many compatible requests for ``spec`` the worker may hand :meth:`generate_batch` at once."""
        return self.switches(spec).max_batch or 1

    def optimizations(self, key: str) -> optimize_module.Report | None:
        """What each switch did for the loaded model ``key`` (None: not loaded)."""
        loaded = self._models.get(key)
        return loaded.report if loaded is not None else None

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
        dtype = self.dtype_for(spec)
        try:
            pipelines = load_pipelines(spec, path, dtype, self.device)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, AttributeError) as exc:
            # The details (paths, library messages) go to the operator's log, not to API clients.
            log.exception("%s could not be loaded from %s", spec.key, path)
            raise ModelLoadFailed(f"{spec.key} could not be loaded ({type(exc).__name__}); see the server log") from exc
        loaded_s = time.perf_counter() - started
        switches = self.switches(spec)
        fp8_reason = self.fp8_unavailable() if switches.fp8 else None
        report, text_cache = optimize_model(
            spec, adapter, pipelines, switches, device=self.device, dtype=dtype,
            compile_cache=self.compile_cache_dir, fp8_reason=fp8_reason,
        )
        loaded = LoadedModel(spec, adapter, pipelines, report=report, text_cache=text_cache)
        if switches.fp8 and fp8_reason is None:
            loaded.offer("fp8", functools.partial(
                fp8_pipelines, loaded, path, switches, device=self.device, dtype=dtype,
                compile_cache=self.compile_cache_dir, quantize=self.quantize_fp8,
            ))
        log.info("loaded %s from %s in %.1fs; optimizations: %s", spec.key, path, loaded_s, report.summary())
        return loaded

    # --- generation ------------------------------------------------------------------------------

    def plan(self, request: GenerationRequest) -> Plan:
        """Validate ``request`` against the catalog and this engine's device without touching a model."""
        plan = plan_request(request, self.catalog)
        if plan.precision != "native" and plan.precision not in self.precisions(plan.spec):
            raise self._precision_refused(plan)
        return plan

    def _precision_refused(self, plan: Plan) -> InvalidParameters:
        details = {"field": "precision", "precisions": self.precisions(plan.spec)}
        if not self.switches(plan.spec).fp8:
            offering = [m.key for m in self.catalog if self.switches(m).fp8 and m.status != "coming_soon"]
            return InvalidParameters(
                f"{plan.spec.key} does not offer precision {plan.precision}; leave precision out"
                + (f", or use a model that does: {', '.join(offering)}" if offering else ""),
                details=details,
            )
        return InvalidParameters(
            f"precision {plan.precision} is not available on this server: {self.fp8_unavailable()}; "
            "leave precision out", details=details,
        )

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
            with loaded.text_scope(plan.loras):
                pictures = render(plan, parts, run, loaded, functools.partial(_check_cancel, cancel))
            elapsed_ms = round((time.perf_counter() - started) * 1000)
        finally:
            loaded.lock.release()
        return self._result(plan, pictures, elapsed_ms)

    def _run(
        self, loaded: LoadedModel, plan: Plan, progress: _Progress, scheduler_config: dict[str, Any] | None = None,
        batch: Sequence[Plan] | None = None, **overrides: Any,
    ) -> Any:
        """One pipeline call for ``plan`` (the base generation or one refinement pass); ``overrides``
        are pipeline arguments set last (a refinement's ``output_type`` or latent ``image``),
        ``scheduler_config`` overrides the checkpoint's scheduler settings for this call. With
        ``batch`` (compatible plans, ``plan`` the first) the call makes every output of every plan:
        one prompt per output, each with the generator of its own seed."""
        pipe = loaded.pipelines_for(plan.precision)[plan.task]
        progress.plan = plan  # previews unpack latents at this call's size
        seeds = plan.seeds if batch is None else [seed for p in batch for seed in p.seeds]
        batch_seeds = {} if batch is None else {"seeds": seeds}
        pipe.scheduler = loaded.new_scheduler(plan, **batch_seeds, **(scheduler_config or {}))
        adapter = loaded.adapter
        kwargs = adapter.call_kwargs(plan, pipe)
        kwargs.update(
            num_inference_steps=plan.steps,
            guidance_scale=plan.guidance,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            callback_on_step_end=progress,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        kwargs[adapter.count_argument] = plan.num_outputs
        if batch is not None:
            adapter.batch_prompts(kwargs, batch)
            kwargs[adapter.count_argument] = 1
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

    # --- warm-up ---------------------------------------------------------------------------------

    def warm_up(
        self,
        spec: ModelSpec,
        *,
        formats: Sequence[str] | None = None,
        precisions: Sequence[str] | None = None,
        batch_sizes: Sequence[int] = (1,),
    ) -> list[WarmUpRun]:
        """Load ``spec`` and run each shape it will serve once, so the first real request pays no
        compiling, kernel selection or lazy initialisation.

        ``formats`` default: every format of the model when its transformer is compiled (with
        ``dynamic=False`` each size is a graph of its own; the first one also compiles the others'
        shared parts), else only the smallest (one run does the lazy work). ``precisions`` default:
        every precision offered (fp8 builds its quantized transformer here). ``batch_sizes``: the
        outputs per call to compile for (the worker's batches; 1 is a single request). Each run is a
        text-to-image (or text-to-video) generation at the model's fewest steps, seed 0. Returns what
        ran, with each run's time and result (the worker's ETA estimate may start from them).
        """
        self.load(spec)
        task = "t2v" if "t2v" in spec.pipelines else "t2i"
        if task not in spec.pipelines:
            return []
        size = functools.partial(self.catalog.size_of, spec)
        if formats is None:
            report = self.optimizations(spec.key)
            compiled = report is not None and report.applied("compile")
            formats = list(spec.formats) if compiled else [min(spec.formats, key=lambda f: size(f)[0] * size(f)[1])]
        runs: list[WarmUpRun] = []
        seen: set[tuple[int, int, str, int]] = set()
        for precision in precisions or self.precisions(spec):
            for fmt in formats:
                for batch in batch_sizes:
                    shape = (*size(fmt), precision, batch)
                    if shape in seen or (batch > 1 and spec.modality != "image"):
                        continue
                    seen.add(shape)
                    runs.append(self._warm_run(spec, task, fmt, precision, batch))
        return runs

    def _warm_run(self, spec: ModelSpec, task: str, fmt: str, precision: str, batch: int) -> WarmUpRun:
        fields: dict[str, Any] = dict(
            family=spec.family, model=spec.model, task=task, format=fmt, prompt="a warm-up run",
            steps=spec.steps.min, seed=0, precision=precision,
            duration=spec.video.duration.min if spec.video else None,
        )
        started = time.perf_counter()
        if batch <= MAX_OUTPUTS:
            result = self.generate(GenerationRequest.create(**fields, num_outputs=batch))
        else:
            items = [BatchItem(GenerationRequest.create(**{**fields, "seed": i})) for i in range(batch)]
            outcome = self.generate_batch(items)[0]
            if isinstance(outcome, BaseException):
                raise outcome
            result = outcome
        seconds = time.perf_counter() - started
        log.info("%s warmed up at %s, %s, batch %d in %.2f s", spec.key, fmt, precision, batch, seconds)
        return WarmUpRun(format=fmt, precision=precision, batch=batch, seconds=seconds, result=result)

    # --- batches ---------------------------------------------------------------------------------

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        """What ``request`` must share with others to run in one batch with them (None: it runs
        alone). Plans the request, so a user error is raised here as :meth:`plan` raises it."""
        return batch_key(self.plan(request))

    def generate_batch(
        self, items: Sequence[BatchItem], *, loras: LoraFiles | None = None
    ) -> list[GenerationResult | KilnError]:
        """Run compatible requests (equal :meth:`batch_key`) as one pipeline call; return each one's
        own result, or the error that ended it, in order.

        A request that fails planning gets its user error and the others run. Each item's ``on_step``
        sees every step; a cancelled item's output is dropped (:class:`GenerationCancelled`) and the
        call stops between steps once every item is cancelled. An error of the call itself (out of
        memory, a pipeline failure) is every remaining item's. Results share the call's
        ``elapsed_ms``. ValueError when the planned requests do not share one key.
        """
        outcomes: list[GenerationResult | KilnError | None] = [None] * len(items)
        plans: list[Plan] = []
        members: list[int] = []
        for i, item in enumerate(items):
            try:
                plans.append(self.plan(item.request))
                members.append(i)
            except UserError as exc:
                outcomes[i] = exc
        keys = {batch_key(p) for p in plans}
        if None in keys or len(keys) > 1:
            raise ValueError("generate_batch takes compatible text-to-image requests (equal Engine.batch_key)")
        if plans:
            chosen = [items[i] for i in members]
            for i, outcome in zip(members, self._run_batch(plans, chosen, loras), strict=True):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]  # every slot is filled

    def _run_batch(
        self, plans: list[Plan], items: list[BatchItem], loras: LoraFiles | None
    ) -> list[GenerationResult | KilnError]:
        cancels = [item.cancel for item in items]
        everyone = AllSet(cancels)
        first = plans[0]
        try:
            _check_cancel(everyone)  # type: ignore[arg-type]
            loaded = self.load(first.spec)
            _acquire(loaded.lock, everyone)  # type: ignore[arg-type]
        except KilnError as exc:
            return [exc] * len(plans)
        try:
            started = time.perf_counter()
            loaded.loras.activate(loaded.pipelines[first.task], first.loras, loras)
            progress = _BatchProgress(loaded, plans, items)
            with loaded.text_scope(first.loras):
                output = self._run(loaded, first, progress, batch=plans)
            pictures = loaded.adapter.images(output, first)
            elapsed_ms = round((time.perf_counter() - started) * 1000)
        except KilnError as exc:
            return [exc] * len(plans)
        finally:
            loaded.lock.release()
        outcomes: list[GenerationResult | KilnError] = []
        offset = 0
        for plan, cancel in zip(plans, cancels, strict=True):
            own, offset = pictures[offset : offset + plan.num_outputs], offset + plan.num_outputs
            if cancel is not None and cancel.is_set():
                outcomes.append(GenerationCancelled("the request was cancelled"))
            else:
                outcomes.append(self._result(plan, own, elapsed_ms))
        return outcomes

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
            precision=plan.precision,
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
            self.report(pipe, tensors)
        _check_cancel(self.cancel)
        return {}

    def report(self, pipe: Any, tensors: dict[str, Any]) -> None:
        """Tell ``on_step``. Nothing here reads a tensor's value unless a preview was asked for: the
        denoising loop runs ahead of the GPU, and one ``.item()`` or ``.cpu()`` per step would make
        it wait at every step."""
        if self.on_step is None:
            return
        preview = None
        if self.previews and "latents" in tensors:
            spatial = self.loaded.adapter.spatial_latents(pipe, tensors["latents"], self.plan)
            preview = self.loaded.previewer(pipe).render(spatial[:1])[0]
        self.on_step(StepEvent(step=self.step, total=self.total, preview=preview))


class _BatchProgress(_Progress):
    """``callback_on_step_end`` for a batch: every item's ``on_step`` sees every step (with a preview
    of its own first output when it asked for previews); the call stops once every item is cancelled."""

    def __init__(self, loaded: LoadedModel, plans: list[Plan], items: list[BatchItem]) -> None:
        super().__init__(loaded, plans[0], None, AllSet([i.cancel for i in items]), previews=False)
        self.items = items
        self.rows = [sum(p.num_outputs for p in plans[:k]) for k in range(len(plans))]  # each item's first row

    def report(self, pipe: Any, tensors: dict[str, Any]) -> None:
        spatial = None
        for item, row in zip(self.items, self.rows, strict=True):
            if item.on_step is None:
                continue
            preview = None
            if item.previews and "latents" in tensors:
                if spatial is None:
                    spatial = self.loaded.adapter.spatial_latents(pipe, tensors["latents"], self.plan)
                preview = self.loaded.previewer(pipe).render(spatial[row : row + 1])[0]
            item.on_step(StepEvent(step=self.step, total=self.total or self.step, preview=preview))


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
