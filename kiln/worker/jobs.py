"""Queued jobs on the worker: claimed, rendered on the worker's thread (the GPU owner), finished on
the pool of :mod:`kiln.worker.finishing`; several compatible ones at once where the model batches.

A mixin of :class:`~kiln.worker.Worker`: it uses the worker's engine, broker, store, hooks and its
``_render`` / ``_store`` steps, which the sync tier shares.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.engine import GenerationRequest, GenerationResult, StepEvent
from kiln.engine.batch import BatchItem
from kiln.errors import GenerationCancelled, KilnError, LeaseLost
from kiln.queue import Job
from kiln.worker.heartbeat import Heartbeat
from kiln.worker.payload import from_payload

if TYPE_CHECKING:
    from kiln.worker.runner import Stored

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rendered:
    """What the engine made for a request, with the safety classifier's verdict per output: ready to
    encode and store (off the device's thread for queued jobs, :mod:`kiln.worker.finishing`)."""

    request: GenerationRequest
    result: GenerationResult
    nsfw: list[bool]


class _EveryEvent:
    """Sets every one of several events (a shutdown stopping a whole batch)."""

    def __init__(self, events: list[threading.Event]) -> None:
        self.events = events

    def set(self) -> None:
        for event in self.events:
            event.set()


class JobRuns:
    broker: Any
    engine: Any
    store: Any
    loras: Any
    finishing: Any
    on_terminal: Callable[[Job], None] | None
    current_job: str | None
    _job_cancel: Any
    _stopping: bool

    # --- one job ---------------------------------------------------------------------------------------

    def _run_job(self, job: Job) -> None:
        mates = self._batch_mates(job)
        if mates:
            self._run_batch([job, *mates])
            return
        cancel = threading.Event()
        beat = Heartbeat(self.broker, job, on_lost=cancel.set).__enter__()
        self.current_job, self._job_cancel = job.id, cancel
        started = time.perf_counter()
        try:
            request = from_payload(job.payload, self.store)
            outcome: Rendered | BaseException = self._render(request, on_step=self._progress(job, cancel), cancel=cancel)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
            outcome = exc
        finally:
            self.current_job, self._job_cancel = None, None
        self.finishing.submit(self._finish_job, job, beat, outcome, started, 1)

    def _finish_job(self, job: Job, beat: Heartbeat, outcome: Any, started: float, batch: int) -> None:
        """On the finishing pool: encode and store a rendered job, record how it ended (with its lease),
        then let its heartbeat go and tell the terminal hook."""
        try:
            if isinstance(outcome, Rendered):
                try:
                    outcome = self._store(outcome.request, outcome.result, started, durable=True, batch=batch,
                                          nsfw=outcome.nsfw)
                except Exception as exc:  # noqa: BLE001
                    outcome = exc
            try:
                finished = self._conclude(job, outcome)
            except LeaseLost as exc:
                # this worker was presumed dead (it stopped heartbeating) and the job is another's now
                log.warning("%s; this run's result is dropped", exc.message)
                return
        finally:
            beat.__exit__(None, None, None)
        self._announce(finished)

    def _announce(self, finished: Job | None) -> None:
        if finished is None or self.on_terminal is None:
            return
        try:
            self.on_terminal(finished)
        except Exception:  # a notification problem must never stop the worker
            log.exception("terminal-state hook failed for job %s", finished.id)

    def _progress(self, job: Job, cancel: threading.Event) -> Callable[[StepEvent], None]:
        """Each step: the job's progress in the broker (with its lease); cancel when asked to stop."""

        def on_step(event: StepEvent) -> None:
            try:
                if self.broker.report_progress(job.id, event.step, event.total, lease=job.lease):
                    cancel.set()
            except LeaseLost:
                cancel.set()  # stop now; the write after the engine returns says so again

        return on_step

    def _conclude(self, job: Job, outcome: Stored | BaseException) -> Job | None:
        """Store how a claimed job ended (every write carries its lease); None if it was handed back
        to the queue (a shutdown stopped it)."""
        if isinstance(outcome, GenerationCancelled):
            if self._stopping and not self.broker.get(job.id).cancel_requested:
                self.broker.requeue(job.id, lease=job.lease)  # shutdown, not the client: it runs again at next start
                log.info("job %s handed back to the queue", job.id)
                return None
            return self.broker.mark_cancelled(job.id, lease=job.lease)
        if isinstance(outcome, KilnError):
            return self.broker.fail(job.id, outcome.code, outcome.message, lease=job.lease)
        if isinstance(outcome, BaseException):
            log.error("job %s failed", job.id, exc_info=outcome)
            return self.broker.fail(job.id, "generation_failed", "the generation failed; see the server log",
                                    lease=job.lease)
        result = outcome.result
        paths = [f"/{a.kind}/{a.name}" for a in outcome.assets]
        return self.broker.complete(
            job.id,
            paths[0] if paths else "",  # every output withheld by the safety check
            {
                "outputs": paths,
                "seed": result.seed,
                "duration_ms": result.elapsed_ms,
                "width": result.width,
                "height": result.height,
                "nsfw": outcome.nsfw,
            },
            lease=job.lease,
        )

    # --- batches (kiln.engine.batch) -----------------------------------------------------------------

    def _batch_mates(self, job: Job) -> list[Job]:
        """Queued jobs that can share ``job``'s pipeline call, now claimed by this worker too: up to the
        model's ``max_batch`` (catalog) less one, none when the broker or the job cannot batch."""
        signature, request = job.payload.get("batch"), job.payload.get("request", {})
        claim_like = getattr(self.broker, "claim_like", None)
        if not signature or claim_like is None:
            return []
        try:
            spec = self.engine.catalog.resolve(request["family"], request["model"])
        except (KeyError, KilnError):
            return []
        room = self.engine.max_batch(spec) - 1
        return claim_like(self.worker_id, signature, room) if room > 0 else []

    def _run_batch(self, jobs: list[Job]) -> None:
        """Run claimed jobs as one pipeline call (``Engine.generate_batch``), each with its own lease,
        progress, cancellation, safety check, outputs and terminal state."""
        cancels = {job.id: threading.Event() for job in jobs}
        beats = {job.id: Heartbeat(self.broker, job, on_lost=cancels[job.id].set).__enter__() for job in jobs}
        self.current_job, self._job_cancel = jobs[0].id, _EveryEvent(list(cancels.values()))  # a shutdown stops all
        started = time.perf_counter()
        outcomes: dict[str, Any] = {}
        runnable: list[tuple[Job, GenerationRequest]] = []
        items: list[BatchItem] = []
        try:
            for job in jobs:
                try:
                    request = from_payload(job.payload, self.store)
                except Exception as exc:  # noqa: BLE001 - an input that cannot be read fails its own job
                    outcomes[job.id] = exc
                    continue
                runnable.append((job, request))
                items.append(BatchItem(request, on_step=self._progress(job, cancels[job.id]), cancel=cancels[job.id]))
            outcomes.update(self._render_batch(runnable, items))
        finally:
            self.current_job, self._job_cancel = None, None
        for job in jobs:
            self.finishing.submit(self._finish_job, job, beats[job.id], outcomes[job.id], started, max(1, len(runnable)))

    def _render_batch(self, runnable: list[tuple[Job, GenerationRequest]], items: list[BatchItem]) -> dict[str, Any]:
        """Each runnable job's :class:`Rendered` (or the error that ended it), from one pipeline call."""
        if not runnable:
            return {}
        out: dict[str, Any] = {}
        try:
            results = self.engine.generate_batch(items, loras=self.loras)
        except ValueError:
            # the signatures matched but the plans do not (another default filled in): one at a time
            log.info("batch of %d did not plan as one call; running them one by one", len(items))
            for (job, request), item in zip(runnable, items, strict=True):
                try:
                    out[job.id] = self._render(request, on_step=item.on_step, cancel=item.cancel)
                except Exception as exc:  # noqa: BLE001
                    out[job.id] = exc
            return out
        except Exception as exc:  # noqa: BLE001 - the call's own failure is every job's
            return {job.id: exc for job, _ in runnable}
        for (job, request), result in zip(runnable, results, strict=True):
            if isinstance(result, BaseException):
                out[job.id] = result
                continue
            try:
                out[job.id] = Rendered(request, result, self._safety_verdicts(request, result))
            except Exception as exc:  # noqa: BLE001 - a refused output fails its own job
                out[job.id] = exc
        return out
