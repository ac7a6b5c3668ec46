"""A Python client for Kiln's render API, usable on its own: it needs only ``httpx``.

>>> from kiln.client import Client
>>> with Client("http://127.0.0.1:8080", api_key="kiln_sk_…") as kiln:
...     out = kiln.generate("a red circle on a blue background", model="flux/mini", format="512", seed=7)
...     out.save("circle.webp"), out.seed, out.url, out.timing

:class:`Client` blocks, :class:`AsyncClient` is the same for asyncio. Errors are the render API's
vocabulary as exceptions (:mod:`kiln.client.errors`), results are small records
(:mod:`kiln.client.records`). Nothing here imports the server, the engine or torch.
"""

from kiln.client.aio import AsyncClient
from kiln.client.errors import (
    AuthenticationError,
    CapacityExhausted,
    ConnectionFailed,
    GenerationError,
    GenerationFailed,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidImage,
    InvalidParameters,
    InvalidPrompt,
    InvalidToken,
    JobCancelled,
    KilnAPIError,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotInstalled,
    ModelUnavailable,
    NotFound,
    NsfwDetected,
    OutOfMemory,
    PromptFiltered,
    QueueFull,
    QueueUnavailable,
    RateLimitExceeded,
    ServerError,
    StorageUnavailable,
    TokenExpired,
    UnavailableError,
    UnsupportedFormat,
    UnsupportedTask,
    UserError,
)
from kiln.client.protocol import RetryPolicy
from kiln.client.records import (
    Aliases,
    Cancelled,
    Completed,
    Failed,
    Generation,
    Job,
    JobError,
    JobEvent,
    Model,
    Position,
    Progress,
    Started,
)
from kiln.client.sync import Client

__all__ = [
    "Aliases", "AsyncClient", "AuthenticationError", "Cancelled", "CapacityExhausted", "Client", "Completed",
    "ConnectionFailed", "Failed", "Generation", "GenerationError", "GenerationFailed", "IdempotencyConflict",
    "InsufficientCredits", "InvalidImage", "InvalidParameters", "InvalidPrompt", "InvalidToken", "Job",
    "JobCancelled", "JobError", "JobEvent", "KilnAPIError", "Model", "ModelLoadFailed", "ModelNotFound",
    "ModelNotInstalled", "ModelUnavailable", "NotFound", "NsfwDetected", "OutOfMemory", "Position", "Progress",
    "PromptFiltered", "QueueFull", "QueueUnavailable", "RateLimitExceeded", "RetryPolicy", "ServerError", "Started",
    "StorageUnavailable", "TokenExpired", "UnavailableError", "UnsupportedFormat", "UnsupportedTask", "UserError",
]
