"""Webhooks for the async tier: a durable outbox, a dispatcher that sends from it, Standard Webhooks signatures.

When a job reaches a terminal state the API enqueues the job's JSON in the :class:`Outbox`; the
:class:`Dispatcher` posts it to the job's webhook URL, signed (:func:`sign`), and retries with
backoff for 24 hours. Receivers check messages with :func:`verify`.
"""

from kiln.webhooks.delivery import (
    DEFAULT_SCHEDULE,
    GIVE_UP_AFTER,
    Delivery,
    DeliveryState,
    Outbox,
    message_id,
    validate_webhook_url,
)
from kiln.webhooks.dispatcher import Dispatcher, SecretResolver, UrlCheck
from kiln.webhooks.signing import (
    WebhookVerificationError,
    new_secret,
    secret_key,
    sign,
    verify,
)

__all__ = [
    "DEFAULT_SCHEDULE",
    "GIVE_UP_AFTER",
    "Delivery",
    "DeliveryState",
    "Dispatcher",
    "Outbox",
    "SecretResolver",
    "UrlCheck",
    "WebhookVerificationError",
    "message_id",
    "new_secret",
    "secret_key",
    "sign",
    "validate_webhook_url",
    "verify",
]
