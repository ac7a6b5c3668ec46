"""``GET /jobs/{id}/events``: a job's progress as Server-Sent Events.

Events (reference: Async Tier, SSE): ``position`` {position, eta_seconds}, ``started`` {},
``progress`` {progress, step, total_steps}, then one of ``complete`` {output, ...},
``failed`` {error}, ``cancelled`` {}. Each event has an id that orders the job's history
(``0`` position, ``1`` started, ``1 + step`` progress, ``1000000`` terminal), so a client that
reconnects with ``Last-Event-ID`` gets only what it has not seen, and a finished job replays its
terminal event. A comment line every 15 s keeps proxies from closing the stream.

The stream follows the broker (it works the same whichever process or machine runs the job): it
reads the job when the node's :class:`~kiln.queue.changes.ChangeFeed` says it changed (Redis: a
pub/sub notice), and at least every second in case a notice was lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import StreamingResponse

from kiln.api.auth import authenticate, services
from kiln.api.jobs import job_json, own_job
from kiln.keys import KeyRecord
from kiln.queue import Job, JobStatus

router = APIRouter(tags=["async"])

POLL_S = 1.0  # the longest a stream goes without reading its job, notices or not
KEEPALIVE_S = 15.0
TERMINAL_ID = 1_000_000


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(
    job_id: str, request: Request, key: KeyRecord | None = Depends(authenticate),
    last_event_id: str | None = Header(default=None),
) -> StreamingResponse:
    """Follow a job until it finishes (resumable with ``Last-Event-ID``)."""
    own_job(services(request), job_id, key)  # 404 before the stream starts
    try:
        seen = int(last_event_id) if last_event_id is not None else -1
    except ValueError:
        seen = -1
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_stream(request, job_id, seen), media_type="text/event-stream", headers=headers)


async def _stream(request: Request, job_id: str, seen: int) -> AsyncIterator[str]:
    svc = services(request)
    with svc.changes.subscribe(job_id) as changes:  # before the first read: no change slips between
        async for chunk in _follow(request, svc, changes, job_id, seen):
            yield chunk


async def _follow(request: Request, svc, changes, job_id: str, seen: int) -> AsyncIterator[str]:
    last_position: int | None = None
    last_beat = time.monotonic()
    while True:
        job = svc.broker.get(job_id)
        for event_id, name, data in _events(svc, job, seen, last_position):
            if name == "position":
                last_position = data["position"]
            else:
                seen = event_id
            yield _format(event_id, name, data)
            last_beat = time.monotonic()
        if job is None or job.status.terminal:
            return
        if await request.is_disconnected():
            return
        if time.monotonic() - last_beat > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_beat = time.monotonic()
        await changes.next(POLL_S)


def _events(svc, job: Job | None, seen: int, last_position: int | None) -> list[tuple[int, str, dict[str, Any]]]:
    if job is None:
        return []
    out: list[tuple[int, str, dict[str, Any]]] = []
    body = job_json(svc, job)
    if job.status is JobStatus.QUEUED:
        if body["position"] != last_position and seen < 1:
            out.append((0, "position", {"position": body["position"], "eta_seconds": body["eta_seconds"]}))
        return out
    if job.status is JobStatus.RUNNING or (job.started is not None and job.status.terminal):
        if seen < 1:
            out.append((1, "started", {}))
        if job.status is JobStatus.RUNNING and job.step and 1 + job.step > seen:
            out.append((1 + job.step, "progress",
                        {"progress": body["progress"], "step": job.step, "total_steps": job.total_steps}))
    if job.status.terminal and seen < TERMINAL_ID:
        if job.status is JobStatus.COMPLETE:
            data = {k: body[k] for k in ("output", "outputs", "seed", "duration_ms") if k in body}
        elif job.status is JobStatus.FAILED:
            data = {"error": body["error"]}
        else:
            data = {}
        out.append((TERMINAL_ID, job.status.value, data))
    return out


def _format(event_id: int, name: str, data: dict[str, Any]) -> str:
    return f"id: {event_id}\nevent: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
