"""What the HTTP layer talks to, gathered in one object the composition root (kiln.server) builds.

Routes reach it as ``request.app.state.services``; they never import the engine or torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kiln.api.fetch import FetchPolicy
from kiln.loras import LoraStore
from kiln.loras.shared import SharedLoras
from kiln.api.metrics import Metrics
from kiln.api.policy import PromptFilter
from kiln.catalog import Catalog, ModelSpec
from kiln.keys import KeyBackend, Limiter, RateLimiter, Slots, TaskSlots
from kiln.queue import Broker
from kiln.queue.changes import ChangeFeed
from kiln.settings import Settings
from kiln.storage import AssetStore
from kiln.webhooks import Outbox

if TYPE_CHECKING:
    from kiln.engine.request import GenerationRequest


class WorkerHandle(Protocol):
    alive: bool
    current_job: str | None
    seconds_per_job: float | None

    def submit_sync(self, request: GenerationRequest, **kwargs: Any) -> Any: ...

    def withdraw(self, ticket: Any) -> bool: ...

    def still_starting(self, began: float) -> bool:
        """Whether a sync request waiting since ``began`` should keep waiting for this worker's start-up."""
        ...

    def wake(self) -> None: ...


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    broker: Broker
    store: AssetStore
    keys: KeyBackend
    worker: WorkerHandle
    # Validates a canonical request against the catalog and decodes its inputs (the engine's
    # planner); raises Kiln's user errors. Blocking: call it in a thread.
    validate: Callable[[GenerationRequest], Any]
    # What a model offers beyond its catalog ranges (the engine's precisions, strength tasks, upscale
    # and detail passes: Engine.offers), for GET /models; the API imports no engine itself.
    offers: Callable[[ModelSpec], dict[str, Any]] = lambda spec: {}
    limiter: Limiter = field(default_factory=RateLimiter)
    upload_limiter: Limiter = field(default_factory=RateLimiter)
    task_slots: Slots = field(default_factory=TaskSlots)  # each key's unfinished WaveSpeed-style tasks
    backends: tuple[str, ...] = ("torch",)
    outbox: Outbox | None = None  # webhook deliveries; None: webhooks are refused
    loras: LoraStore | None = None  # LoRA files by content hash; None: requests with loras are refused
    lora_share: SharedLoras | None = None  # with Redis: adapters published for workers on other machines
    # notices of job changes that SSE streams wait on; an in-process broker (SQLite) is wired to it
    # here, the Redis one through kiln.queue.changes.RedisChangeListener (kiln.server starts it)
    changes: ChangeFeed = field(default_factory=ChangeFeed)
    fetch_policy: FetchPolicy = field(init=False)
    lora_policy: FetchPolicy = field(init=False)  # the same checks, a LoRA's size and time
    prompt_filter: PromptFilter = field(init=False)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        # built once, so a bad setting fails at start-up rather than on every request
        self.fetch_policy = FetchPolicy(
            max_bytes=self.settings.max_upload_bytes, allow_private=self.settings.allow_private_fetch
        )
        self.lora_policy = FetchPolicy(
            max_bytes=self.settings.lora_max_bytes, timeout_s=self.settings.lora_fetch_timeout_s,
            allow_private=self.settings.allow_private_fetch,
        )
        self.prompt_filter = PromptFilter.from_file(self.settings.prompt_filter_file)
        self.metrics = Metrics(self.broker)
        if getattr(self.broker, "changes", False) is None:
            self.broker.changes = self.changes  # type: ignore[attr-defined]
