"""The worker: the one owner of the engine in a process.

It runs sync requests first (a client is waiting on the connection), then async jobs claimed from
the broker. The sync tier has no queue: a sync request that the worker cannot start within its
wait is withdrawn and answered 503 by the API.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from kiln.engine import Engine, GenerationRequest, GenerationResult, Output, StepEvent
from kiln.engine.lora import LoraFiles
from kiln.engine.safety import SafetyChecker, flag_outputs
from kiln.errors import CapacityExhausted, GenerationError, KilnError, NsfwDetected
from kiln.queue import Broker, Job
from kiln.storage import Asset, AssetStore
from kiln.worker.finishing import Finishing
from kiln.worker.jobs import JobRuns, Rendered
from kiln.worker.routing import MAX_LORAS_ADVERTISED, holdings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stored:
    """A finished generation whose outputs are in the asset store.

    ``nsfw`` has one safety verdict per output of ``result`` (all False when the classifier did not
    run); an output flagged under ``safety_check="withhold"`` was never stored, so ``assets`` holds
    only the others, in order."""

    result: GenerationResult
    assets: list[Asset]
    media_type: str
    first_bytes: bytes  # the first stored output, as the sync tier returns it
    generate_ms: float = 0.0  # Engine.generate as the worker called it (planning and the model lock included)
    encode_ms: float = 0.0  # time spent encoding every output
    store_ms: float = 0.0  # time spent handing every output to the store (``put`` or ``put_soon``)
    nsfw: list[bool] = field(default_factory=list)


@dataclass
class SyncTicket:
    """A sync request handed to the worker: ``started`` resolves when the worker takes it, ``done``
    with its :class:`Stored` result (or error). Both are concurrent futures, so callers can wait
    on them from a thread or await them on an event loop (``asyncio.wrap_future``)."""

    request: GenerationRequest
    on_step: Callable[[StepEvent], None] | None = None
    cancel: threading.Event | None = None
    previews: bool = False
    started: Future = field(default_factory=Future)
    done: Future = field(default_factory=Future)


STEP_WAIT_S = 60.0
IDLE_POLL_S = 0.5  # the longest an idle worker goes without asking the broker (leases expire, bells get lost)
HOLDINGS_TTL_S = 5.0  # how long the list of held models and LoRAs is reused between claims
STARTUP_WAIT_S = 300.0
"""How long a sync request waits for a starting worker (loading and warming up its default model)
before its own ``wait_s`` counts: a request sent right after ``kiln serve`` starts is slow, not 503."""


def capacity_exhausted(retry_after: int) -> CapacityExhausted:
    return CapacityExhausted(f"sync tier at capacity, retry in {retry_after}s or use async", retry_after=retry_after)


class Worker(JobRuns):
    def __init__(
        self, engine: Engine, broker: Broker, store: AssetStore, *, worker_id: str = "local", preload: tuple[str, ...] = (),
        warmup: bool = True, safety: SafetyChecker | None = None, safety_default: bool = True,
    ) -> None:
        self.engine, self.broker, self.store, self.worker_id = engine, broker, store, worker_id
        self.loras: LoraFiles | None = None  # where requests' LoRA adapters are found (kiln.loras.LoraStore)
        # The image safety classifier (None: none configured, nothing is checked) and whether it runs
        # for a request whose safety_check is None.
        self.safety, self.safety_default = safety, safety_default
        self.preload = preload  # model keys loaded before the worker reports alive (ready)
        self.warmup = warmup  # run each preloaded model once (smallest format, fewest steps) before ready
        # Called with each job that reached a terminal state here (webhooks); must not block.
        self.on_terminal: Callable[[Job], None] | None = None
        self._job_cancel: Any = None  # what a shutdown sets to stop the run in hand (an Event, or all of a batch)
        # kiln.worker.remote.RemoteSync: sync requests offered by API nodes on other machines (kiln worker)
        self.remote: Any = None
        self._sync: deque[SyncTicket] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.current_job: str | None = None
        self.seconds_per_job: float | None = None  # moving average of measured run times
        # per model: moving average of seconds per work unit (one step over one megapixel of output,
        # every frame and output counted): time scales with both, so one measurement at one size
        # estimates another
        self.seconds_per_unit: dict[str, float] = {}
        self.alive = False
        self.ready = False  # alive and the default model loaded
        self.starting = False  # started, still loading and warming up what it preloads
        self._holdings: tuple[float, list[str]] = (-HOLDINGS_TTL_S, [])
        self.finishing = Finishing()  # encoding, storing and recording jobs, off this thread (kiln.worker.jobs)

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.broker.recover()
        self.starting = True
        self._thread = threading.Thread(target=self._loop, name="kiln-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the job in hand (or hand it back if it outlasts ``timeout``) and stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._ring()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._job_cancel is not None:
                # too long to finish: stop it between steps and hand it back to the queue
                log.warning("job %s outlasted the shutdown wait; handing it back to the queue", self.current_job)
                self._job_cancel.set()
                self._thread.join(STEP_WAIT_S)  # the engine stops at the end of the current step

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
        self._ring()

    def _ring(self) -> None:
        """End an idle wait on the broker (Redis), as notify_all ends one on the condition."""
        ring = getattr(self.broker, "ring", None)
        if ring is not None:
            try:
                ring(self.worker_id)
            except KilnError:  # Redis out of reach: the idle wait ends within IDLE_POLL_S anyway
                pass

    def holdings(self) -> list[str]:
        """What this worker holds, for routing (:mod:`kiln.worker.routing`): loaded models, cached LoRAs."""
        at, held = self._holdings
        if time.monotonic() - at < HOLDINGS_TTL_S:
            return held
        loras = self.loras.cached(MAX_LORAS_ADVERTISED) if hasattr(self.loras, "cached") else ()
        held = holdings(self.engine.loaded(), self.engine.catalog.aliases, loras)
        self._holdings = (time.monotonic(), held)
        return held

    def estimate(self, model: str, steps: int, megapixels: float) -> float | None:
        """Seconds a run of ``model`` takes here for ``steps`` steps over ``megapixels`` of output (every
        frame and output counted), from measured runs; None if the model has not run here yet."""
        per_unit = self.seconds_per_unit.get(model)
        return None if per_unit is None else per_unit * steps * megapixels

    # --- sync tier ---------------------------------------------------------------------------------

    def submit_sync(
        self,
        request: GenerationRequest,
        *,
        on_step: Callable[[StepEvent], None] | None = None,
        cancel: threading.Event | None = None,
        previews: bool = False,
    ) -> SyncTicket:
        """Put a sync request ahead of every queued job; non-blocking. ``on_step`` runs on the worker's thread."""
        ticket = SyncTicket(request, on_step=on_step, cancel=cancel, previews=previews)
        with self._cond:
            self._sync.append(ticket)
            self._cond.notify_all()
        self._ring()
        return ticket

    def withdraw(self, ticket: SyncTicket) -> bool:
        """Take back a ticket the worker has not started; False if it already has."""
        with self._cond:
            if ticket.started.done():
                return False
            self._sync.remove(ticket)
            return True

    def run_sync(self, request: GenerationRequest, *, wait_s: float, retry_after: int, **kwargs) -> Stored:
        """Blocking form of :meth:`submit_sync` for threads: the result, or :class:`CapacityExhausted`
        if the worker cannot start it within ``wait_s``."""
        ticket = self.submit_sync(request, **kwargs)
        began, timeout = time.monotonic(), wait_s
        while True:
            try:
                ticket.started.result(timeout=timeout)
                break
            except FutureTimeout:
                if self.still_starting(began):
                    timeout = max(wait_s, 0.1)  # a start-up, not a full tier: keep waiting
                    continue
                if self.withdraw(ticket):
                    raise capacity_exhausted(retry_after) from None
                break
        return ticket.done.result()

    def still_starting(self, began: float) -> bool:
        """Whether a sync request waiting since ``began`` (``time.monotonic()``) should keep waiting for
        this worker's start-up (``STARTUP_WAIT_S`` at most) rather than be refused."""
        return self.starting and time.monotonic() - began < STARTUP_WAIT_S

    # --- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        self.ready = True
        for key in self.preload:
            spec = self.engine.catalog.models[key]
            try:
                self.engine.load(spec)
                if self.warmup:
                    self._warm_up(spec)
            except KilnError as exc:
                self.ready = False  # /readyz says so; requests for other models still run
                log.warning("could not preload %s: %s", key, exc.message)
            except Exception:  # a bug in loading or warming up must not end the worker before it starts
                self.ready = False
                log.exception("could not preload %s", key)
        self.alive, self.starting = True, False
        try:
            while True:
                try:
                    if not self._step():
                        return
                except Exception:  # a broker hiccup (database locked, disk full) must not end the worker
                    log.exception("worker loop error; retrying in 1 s")
                    with self._cond:
                        self._cond.wait(timeout=1.0)
        finally:
            self.finishing.close()  # the jobs rendered here are recorded before the worker stops
            self.alive = False

    def _step(self) -> bool:
        """One pass: a waiting sync request, else one queued job, else a short wait. False: stop."""
        with self._cond:
            if self._stopping:
                return False
            item = self._sync.popleft() if self._sync else None
            if item is not None:
                item.started.set_result(None)
        if item is not None:
            self._run_sync_item(item)
            return True
        if self.remote is not None and self.remote.run_one(self):
            return True
        job = self.broker.claim(self.worker_id, holds=self.holdings())
        if job is not None:
            self._run_job(job)
            return True
        self._idle()
        return True

    def _idle(self) -> None:
        """Wait for work, at most IDLE_POLL_S: a remote sync request (run here), a job queued anywhere
        (the broker's bell), or a local sync request or stop (the condition, or the bell with Redis)."""
        if self.remote is not None:
            self.remote.run_one(self, block_s=IDLE_POLL_S)  # also returns when the broker's bell rings
            return
        wait_for_work = getattr(self.broker, "wait_for_work", None)
        if wait_for_work is not None:
            with self._cond:
                if self._sync or self._stopping:
                    return
            wait_for_work(self.worker_id, IDLE_POLL_S)
            return
        with self._cond:
            if not self._sync and not self._stopping:
                self._cond.wait(timeout=IDLE_POLL_S)

    def _warm_up(self, spec) -> None:
        """Run every shape the model will serve once (:meth:`Engine.warm_up`: each format of a compiled
        model, at each batch size this worker may form), so the first real request pays no compiling
        or lazy initialisation, and queued jobs get an ETA before anything else has run."""
        started = time.perf_counter()
        runs = self.engine.warm_up(spec, batch_sizes=tuple(range(1, self.engine.max_batch(spec) + 1)))
        if not runs:
            return
        if self.safety is not None:
            flag_outputs(self.safety, runs[-1].result.outputs)  # its first run pays one-time costs too
        last = runs[-1]  # compiled by then: the time a request of that shape takes
        self._measure(last.result, last.seconds / max(1, last.batch))
        log.info("%s warmed up in %.2f s (%d shapes)", spec.key, time.perf_counter() - started, len(runs))

    def _measure(self, result: GenerationResult, took: float) -> None:
        self.seconds_per_job = took if self.seconds_per_job is None else 0.8 * self.seconds_per_job + 0.2 * took
        if result.upscale or result.latent_upscale or result.detail_strength is not None:
            return  # refinement passes cost more than steps x megapixels says: they would skew every ETA
        per_unit = took / max(1e-9, work_units(result.steps, result.width, result.height,
                                                result.num_frames, len(result.outputs)))
        previous = self.seconds_per_unit.get(result.model)
        self.seconds_per_unit[result.model] = per_unit if previous is None else 0.8 * previous + 0.2 * per_unit

    def _run_sync_item(self, item: SyncTicket) -> None:
        busy = getattr(self.broker, "busy", None)
        if busy is not None:
            try:
                busy(self.worker_id)  # no job is routed to this worker as if it were free
            except KilnError:
                pass
        try:
            stored = self._generate(item.request, on_step=item.on_step, cancel=item.cancel, previews=item.previews,
                                    durable=False)
            if not item.done.done():
                item.done.set_result(stored)
        except BaseException as exc:  # handed to the waiting request, which maps it to HTTP
            if not item.done.done():
                item.done.set_exception(exc if isinstance(exc, KilnError) else GenerationError("generation failed"))

    def _generate(self, request: GenerationRequest, *, on_step=None, cancel=None, previews: bool = False,
                  durable: bool = True) -> Stored:
        """Render, encode and store (the sync tier's whole path). ``durable=False`` (the client gets the
        bytes in the response) lets the store write after answering."""
        started = time.perf_counter()
        rendered = self._render(request, on_step=on_step, cancel=cancel, previews=previews)
        return self._store(request, rendered.result, started, durable=durable, nsfw=rendered.nsfw)

    def _render(self, request: GenerationRequest, *, on_step=None, cancel=None, previews: bool = False) -> Rendered:
        """The device's part: the engine, then the safety classifier (which runs on the device too), before
        anything is stored, so a flagged output never gets a URL. Raises what the engine raises and
        :class:`NsfwDetected` for a refused output."""
        result = self.engine.generate(request, on_step=on_step, cancel=cancel, previews=previews, loras=self.loras)
        return Rendered(request, result, self._safety_verdicts(request, result))

    def _store(self, request: GenerationRequest, result: GenerationResult, started: float, *, durable: bool,
               batch: int = 1, nsfw: list[bool]) -> Stored:
        """Encode and store ``result`` (rendered since ``started``, in a batch of ``batch``), leaving out
        the outputs ``nsfw`` flags. A job's outputs are durable before it completes."""
        generated = time.perf_counter()
        assets, first = [], b""
        media_type = "application/octet-stream"
        encode_s = store_s = 0.0
        put = self.store.put if durable else self.store.put_soon
        for output, flagged in zip(result.outputs, nsfw, strict=True):
            if flagged:
                continue  # withheld (a refused request raised above)
            t0 = time.perf_counter()
            data, media_type, kind = _encode(output, request.encoding)
            t1 = time.perf_counter()
            assets.append(put(data, kind, media_type))
            encode_s += t1 - t0
            store_s += time.perf_counter() - t1
            first = first or data
        self._measure(result, (time.perf_counter() - started) / batch)  # a batch's time is shared
        return Stored(result=result, assets=assets, media_type=media_type, first_bytes=first,
                      generate_ms=(generated - started) * 1e3, encode_ms=encode_s * 1e3, store_ms=store_s * 1e3,
                      nsfw=nsfw)

    def _safety_verdicts(self, request: GenerationRequest, result: GenerationResult) -> list[bool]:
        """One verdict per output; :class:`NsfwDetected` if one is flagged and the request refuses them."""
        mode = request.safety_check or ("refuse" if self.safety_default else "off")
        if self.safety is None or mode == "off":
            return [False] * len(result.outputs)
        nsfw = flag_outputs(self.safety, result.outputs)
        if any(nsfw):
            flagged = [i for i, f in enumerate(nsfw) if f]
            log.info("safety classifier flagged output(s) %s of a %s request (%s)", flagged, result.model, mode)
            if mode == "refuse":
                raise NsfwDetected(
                    "Content policy violation: the safety classifier flagged the generated image; "
                    "try another prompt or seed", details={"outputs": flagged},
                )
        return nsfw


def work_units(steps: int, width: int, height: int, num_frames: int | None = None, outputs: int = 1) -> float:
    """What a run costs, in steps x megapixels of output (frames and outputs counted)."""
    return steps * width * height / 1e6 * (num_frames or 1) * max(1, outputs)


def _encode(output: Output, encoding: str = "webp") -> tuple[bytes, str, str]:
    from kiln.engine import VideoOutput

    if isinstance(output, VideoOutput):
        return output.encode("mp4"), "video/mp4", "v"
    return output.encode(encoding), output.media_type(encoding), "i"
