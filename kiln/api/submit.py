"""Running a canonical request for a caller, whichever door it came through: on the sync tier now, or
as a queued job. Credits are spent here and refunded here when nothing was made, so every door
charges the same way."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Request

from kiln.api.auth import refund_credit, services, spend_credit
from kiln.api.errors import ApiError
from kiln.api.handoff import run_sync
from kiln.api.services import Services
from kiln.engine.request import GenerationRequest
from kiln.keys import KeyRecord
from kiln.queue import Job, Priority
from kiln.worker import Stored, to_payload


async def run_now(request: Request, canonical: GenerationRequest, key: KeyRecord | None, *, label: str) -> Stored:
    """Run on the sync tier (ahead of queued jobs), charged to ``key``; refunded if nothing was made
    (including :class:`~kiln.errors.CapacityExhausted`). ``label`` names the model in the metrics."""
    svc = services(request)
    spend_credit(request, key)
    started = time.perf_counter()
    try:
        stored = await run_sync(svc.worker, canonical, wait_s=svc.settings.sync_wait_s,
                                retry_after=svc.settings.retry_after_s)
    except BaseException:
        refund_credit(svc, key)
        raise
    svc.metrics.observe_sync(label, time.perf_counter() - started)
    return stored


def queue_job(svc: Services, canonical: GenerationRequest, key: KeyRecord | None, *,
              priority: Priority = Priority.NORMAL, idempotency_key: str | None = None,
              request_hash: str | None = None, webhook: str | None = None,
              extra: dict[str, Any] | None = None) -> Job:
    """Queue the job (``extra`` joins its payload: the door it came through, for one); a new job costs
    a metered key one credit, and the same idempotent request again returns the existing job at no
    cost, even with no credit left."""
    payload = to_payload(canonical, svc.store)
    payload.update(extra or {})
    if webhook is not None:
        payload["webhook"] = webhook
    job, created = svc.broker.submit(
        payload, priority=priority, key_id=key.id if key else None, idempotency_key=idempotency_key,
        request_hash=request_hash, max_depth=svc.settings.queue_max_depth,
    )
    if created and key is not None and key.metered and not svc.keys.spend(key.id):
        svc.broker.cancel(job.id)
        raise ApiError(402, "insufficient_credits", "this API key has no credits left")
    if created:
        svc.worker.wake()
    return job
