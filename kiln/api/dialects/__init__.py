"""Compatible front doors: other image APIs' shapes over Kiln's one canonical request.

Each door (:mod:`.openai`, :mod:`.wavespeed`, :mod:`.vyro`) translates its requests into a
:class:`~kiln.engine.request.GenerationRequest` and runs it on the same worker, queue, keys, limits
and storage as the render API; none holds generation logic. Each maps Kiln's error vocabulary to
its own error shape in one function. Other APIs' model names map to catalog models through the
catalog's ``[dialects.*]`` tables.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from kiln.api.dialects import openai, vyro, wavespeed
from kiln.api.services import Services
from kiln.queue import Job


def install(app: FastAPI) -> None:
    """Add every door's routes (after the render API's, whose paths they never share)."""
    for module in (openai, wavespeed, vyro):
        app.include_router(module.router)


def webhook_body(svc: Services, job: Job) -> dict[str, Any]:
    """What a job's webhook carries when it came through a door that has webhooks."""
    dialect = job.payload.get("dialect") or {}
    if dialect.get("name") == wavespeed.NAME:
        return wavespeed.envelope(svc, job, dialect.get("version", "v3"))
    raise ValueError(f"no webhook shape for dialect {dialect.get('name')!r}")
