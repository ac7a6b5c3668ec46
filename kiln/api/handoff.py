"""Handing a sync request to the worker without holding a thread while it waits or runs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kiln.worker import capacity_exhausted


async def run_sync(worker: Any, request: Any, *, wait_s: float, retry_after: int, **kwargs: Any) -> Any:
    """The worker's result for ``request``, or ``CapacityExhausted`` if it cannot start within ``wait_s``.

    A worker that is still ``starting`` (loading and warming up its default model) is waited for, up to
    ``STARTUP_WAIT_S``, before ``wait_s`` counts. Waiting happens on the event loop (the futures are
    shielded: a client that goes away does not cancel the worker's bookkeeping), so a thousand waiting
    requests cost no threads.
    """
    ticket = worker.submit_sync(request, **kwargs)
    started = asyncio.wrap_future(ticket.started)
    began, timeout = time.monotonic(), wait_s
    while True:
        try:
            await asyncio.wait_for(asyncio.shield(started), timeout)
            break
        except TimeoutError:
            # a worker still loading its default model is starting, not full: keep waiting (bounded)
            if worker.still_starting(began):
                timeout = max(wait_s, 0.1)  # wait_s may be 0: no busy loop on the event loop
                continue
            if worker.withdraw(ticket):
                raise capacity_exhausted(retry_after) from None
            break
    return await asyncio.shield(asyncio.wrap_future(ticket.done))
