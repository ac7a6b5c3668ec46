"""How a job looks to a render-API client (reference: Async Job Status)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from kiln.api.errors import ApiError
from kiln.api.services import Services
from kiln.errors import KilnError
from kiln.keys import KeyRecord
from kiln.queue import Job, JobStatus
from kiln.worker.runner import work_units


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def absolute(svc: Services, path: str) -> str:
    return svc.settings.base_url() + path


def own_job(svc: Services, job_id: str, key: KeyRecord | None) -> Job:
    """The job, if it exists and belongs to ``key``; another key's job is as unknown as a missing one."""
    job = svc.broker.get(job_id)
    if job is None or (key is not None and job.key_id != key.id):
        raise ApiError(404, "not_found", f"no job {job_id}")
    return job


def job_json(svc: Services, job: Job) -> dict[str, Any]:
    """A job as ``GET /jobs/{id}`` shows it; a complete job has ``output`` only if one was stored."""
    body: dict[str, Any] = {"id": job.id, "status": job.status.value, "created_at": iso(job.created)}
    if job.status is JobStatus.QUEUED:
        position = svc.broker.position(job.id) or 1
        body.update(position=position, eta_seconds=_queued_eta(svc, job, position))
    elif job.status is JobStatus.RUNNING:
        body.update(
            progress=round(job.progress, 4),
            step=job.step,
            total_steps=job.total_steps,
            eta_seconds=_running_eta(job),
            started_at=iso(job.started),
        )
    elif job.status is JobStatus.COMPLETE:
        result = job.result or {}
        if job.output:  # none when the safety checker withheld every output (WaveSpeed's enable_safety_checker)
            body["output"] = absolute(svc, job.output)
        body.update(
            outputs=[absolute(svc, o) for o in result.get("outputs", [job.output]) if o],
            seed=result.get("seed"),
            duration_ms=result.get("duration_ms"),
            started_at=iso(job.started),
            completed_at=iso(job.finished),
        )
    elif job.status is JobStatus.FAILED:
        body.update(error={"code": job.error_code, "message": job.error_message}, failed_at=iso(job.finished))
    else:
        body.update(cancelled_at=iso(job.finished))
    from kiln.api.webhooks import webhook_state  # webhooks render jobs too: import here, not at the top

    webhook = webhook_state(svc, job)
    if webhook is not None:
        body["webhook"] = webhook
    return body


def _queued_eta(svc: Services, job: Job, position: int) -> int | None:
    """The measured time of every job ahead and this one: its steps x megapixels of output at the
    seconds per unit measured for its model (the worker's warm-up measures the default model at
    start; a model not run yet counts the average job time); None until something has run."""
    estimate = getattr(svc.worker, "estimate", None)
    fallback = svc.worker.seconds_per_job
    payloads = svc.broker.queued_through(job.id) if hasattr(svc.broker, "queued_through") else []
    if estimate is None or not payloads:
        return None if fallback is None else round(position * fallback)
    total = 0.0
    for payload in payloads:
        guess = None
        try:
            guess = _estimate(svc, estimate, payload.get("request", {}))
        except (KilnError, TypeError, ValueError):
            pass
        if guess is None:
            guess = fallback
        if guess is None:
            return None
        total += guess
    return round(total)


def _estimate(svc: Services, estimate, request: dict) -> float | None:
    spec = svc.catalog.resolve(request.get("family", ""), request.get("model", ""))
    width, height = request.get("width"), request.get("height")
    if not width or not height:
        width, height = svc.catalog.size_of(spec, request.get("format") or spec.formats[0])
    frames = None
    if spec.video is not None:
        duration = request.get("duration") or spec.video.duration.min
        frames = max(1, round(duration * spec.video.fps)) + 1
    megapixels = work_units(1, width, height, frames, request.get("num_outputs") or 1)
    return estimate(spec.key, request.get("steps") or spec.steps.default, megapixels)


def _running_eta(job: Job) -> int | None:
    """Remaining steps at the pace measured so far in this job."""
    if not job.step or not job.started or not job.total_steps:
        return None
    per_step = (time.time() - job.started) / job.step
    return round(per_step * (job.total_steps - job.step))
