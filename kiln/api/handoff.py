"""Handing a sync request to the worker without holding a thread while it waits or runs."""

from __future__ import annotations

import asyncio
from typing import Any

from kiln.worker import capacity_exhausted


async def run_sync(worker: Any, request: Any, *, wait_s: float, retry_after: int, **kwargs: Any) -> Any:
    """The worker's result for ``request``, or ``CapacityExhausted`` if it cannot start within ``wait_s``.

    Waiting happens on the event loop (the futures are shielded: a client that goes away does not
    cancel the worker's bookkeeping), so a thousand waiting requests cost no threads.
    """
    ticket = worker.submit_sync(request, **kwargs)
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(ticket.started)), wait_s)
    except TimeoutError:
        if worker.withdraw(ticket):
            raise capacity_exhausted(retry_after) from None
    return await asyncio.shield(asyncio.wrap_future(ticket.done))
