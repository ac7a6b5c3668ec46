"""Batching on purpose: compatible requests waiting together run as one pipeline call.

Two requests are compatible when one pipeline call can serve both and give each what it would get
alone: the same model, task, size, steps, guidance, sampler, scheduler, precision, adapters and
negative-prompt use; only prompts, negative prompts, seeds and the number of outputs may differ. Only text-to-image requests batch: an input image is encoded with the first
generator only (see ``_parts`` in :mod:`kiln.engine.engine`), refinement passes run per output, and a
video is one output per request.

In the batched call every output is one prompt of the batch with its own generator, seeded as it
would be alone, so output *i* of request *r* starts from the same noise as when *r* runs alone. The
pictures are the same function of the same inputs; whether they are the same bits depends on the
device's kernels for a larger batch (on the CPU the latents differ in the last float32 places, about
1e-7 relative, and the 8-bit pixels by at most 1; the tests bound it).

The worker decides what waits together (it owns the queue): :func:`batch_key` / :func:`compatible`
say what may, ``Engine.max_batch`` how many, ``Engine.generate_batch`` runs them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.engine.request import GenerationRequest

if TYPE_CHECKING:
    from kiln.engine.plan import Plan


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch, with its own progress callback, cancellation and previews."""

    request: GenerationRequest
    on_step: Callable[[Any], None] | None = None
    cancel: threading.Event | None = None
    previews: bool = False


def batch_key(plan: Plan) -> Hashable | None:
    """What must be equal for two plans to share one pipeline call; None: this plan runs alone."""
    if (
        plan.spec.modality != "image"
        or plan.task != "t2i"
        or plan.image is not None
        or plan.refinement is not None
    ):
        return None
    return (
        plan.spec.key,
        plan.task,
        plan.gen_width,
        plan.gen_height,
        plan.width,
        plan.height,
        plan.steps,
        plan.guidance,
        plan.sampler,
        plan.scheduler,
        plan.precision,
        plan.loras,
        # FLUX.1 runs true CFG only with a negative prompt: a batch has one or none for every prompt.
        plan.negative_prompt is not None,
    )


def compatible(a: Plan, b: Plan) -> bool:
    """Whether ``a`` and ``b`` can run in one pipeline call (each getting what it would alone)."""
    key = batch_key(a)
    return key is not None and key == batch_key(b)


class AllSet:
    """An event-like view of several cancellation events: set when every one of them is."""

    def __init__(self, events: list[threading.Event | None]) -> None:
        self.events = events

    def is_set(self) -> bool:
        return all(e is not None and e.is_set() for e in self.events)
