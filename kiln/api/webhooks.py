"""Webhooks from the render API's point of view: which URL may be called, and what is sent when.

The sending itself (durable outbox, signatures, retries) is :mod:`kiln.webhooks`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket

import httpx

from kiln.api.fetch import FetchPolicy, is_address_allowed
from kiln.api.jobs import job_json
from kiln.api.services import Services
from kiln.errors import InvalidParameters
from kiln.queue import Job
from kiln.webhooks import validate_webhook_url


def checked_webhook(url: str) -> str:
    try:
        return validate_webhook_url(url)
    except ValueError as exc:
        raise InvalidParameters(f"webhook: {exc}") from exc


def address_check(policy: FetchPolicy):
    """The dispatcher's ``check_url``: the same address rules as image fetching, pinned addresses back."""

    async def check(url: str) -> list[str]:
        parsed = httpx.URL(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        infos = await asyncio.get_running_loop().getaddrinfo(parsed.host, port, type=socket.SOCK_STREAM)
        ips = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if not ips or not all(is_address_allowed(ip, policy) for ip in ips):
            raise ValueError("the webhook URL points to a private or local network address")
        return [ip.compressed for ip in ips]

    return check


def notify_terminal(svc: Services, job: Job) -> None:
    """Queue the job's webhook, if it has one; cheap and non-blocking (one insert, one wake-up)."""
    url = job.payload.get("webhook")
    if url and svc.outbox is not None:
        if job.payload.get("dialect"):  # submitted through a compatible door: its shape, as its result route shows it
            # imported here: the dialects import this module
            from kiln.api.dialects import webhook_body

            shown = webhook_body(svc, job)
        else:
            shown = job_json(svc, job)
        body = json.dumps(shown, separators=(",", ":")).encode()
        svc.outbox.enqueue(job.id, url, body, job.key_id or "")


def webhook_state(svc: Services, job: Job) -> dict | None:
    """The job's webhook delivery as ``GET /jobs/{id}`` shows it: from this node's outbox, else (Redis:
    another node sends it) from the copy that node shares, else waiting."""
    if svc.outbox is None or not job.payload.get("webhook"):
        return None
    deliveries = svc.outbox.state_for_job(job.id)
    shared = getattr(svc.broker, "webhook_record", None)
    record = deliveries[-1].record() if deliveries else shared(job.id) if shared is not None else None
    if record is None:
        return {"state": "waiting"}  # sent once the job finishes
    from kiln.api.jobs import iso

    return {
        "id": record["msg_id"],
        "state": record["state"],
        "attempts": record["attempts"],
        "last_status": record["last_status"],
        "last_error": record["last_error"],
        "next_attempt_at": iso(record["next_attempt_at"]),
        "delivered_at": iso(record["delivered_at"]),
    }
