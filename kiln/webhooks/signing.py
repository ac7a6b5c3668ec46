"""Standard Webhooks signatures (https://www.standardwebhooks.com): sign what we send, verify it.

A message carries three headers:

- ``webhook-id``: the message id, the same on every retry of one message (receivers dedupe on it);
- ``webhook-timestamp``: integer seconds since the epoch at which this attempt was signed;
- ``webhook-signature``: space-separated ``v1,<base64 HMAC-SHA256>`` entries, one per secret the
  sender currently signs with (two while a secret is being rotated).

The signed content is ``f"{id}.{timestamp}.".encode() + body``, the body exactly as sent. A secret
is shown as ``whsec_<base64>``; the HMAC key is the base64-decoded part after the prefix.

A receiver (in Python, with Kiln installed)::

    from kiln.webhooks import WebhookVerificationError, verify

    try:
        verify(secret, request.headers, raw_body)      # raw bytes, before any JSON parsing
    except WebhookVerificationError:
        return 400
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 24  # the spec's lower bound
MAX_SIGNATURES = 16  # entries read from one header; a sender rotating secrets needs two


class WebhookVerificationError(ValueError):
    """The message is not proven to come from the holder of the secret (or is too old, or from the future)."""


def new_secret(nbytes: int = SECRET_BYTES) -> str:
    """A fresh signing secret, ``whsec_`` followed by the base64 of ``nbytes`` random bytes."""
    if nbytes < MIN_SECRET_BYTES:
        raise ValueError(f"a webhook secret needs at least {MIN_SECRET_BYTES} random bytes, not {nbytes}")
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret (the prefix is optional). ``ValueError`` names what is wrong."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is 'whsec_' followed by base64; this one is not valid base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"a webhook secret needs at least {MIN_SECRET_BYTES} bytes of key, this one has {len(key)}")
    return key


def sign(secret: str | Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one ``v1,…`` entry per secret, space-separated."""
    secret_list = [secret] if isinstance(secret, str) else list(secret)
    if not secret_list:
        raise ValueError("signing needs at least one secret")
    return " ".join(f"v1,{_digest(secret_key(s), msg_id, int(timestamp), body)}" for s in secret_list)


def verify(
    secret: str | Sequence[str],
    headers: Mapping[str, str],
    body: bytes | str,
    tolerance_s: float = 300,
    now: float | None = None,
) -> None:
    """Raise :class:`WebhookVerificationError` unless ``body`` and ``headers`` carry a valid signature.

    ``headers`` may use any letter case. ``secret`` may be several secrets (a receiver in the middle
    of a rotation): one valid ``v1`` entry for any of them is enough. The timestamp must be within
    ``tolerance_s`` of ``now`` (default: the current time) in either direction, which bounds replays.
    A malformed ``secret`` raises a plain ``ValueError``: that is a configuration error, not a bad message.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id", "")
    stamp = lowered.get("webhook-timestamp", "")
    header = lowered.get("webhook-signature", "")
    if not (msg_id and stamp and header):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
        raise WebhookVerificationError(f"webhook-timestamp is not integer seconds: {stamp[:20]!r}")
    timestamp = int(stamp)
    now = time.time() if now is None else now
    if timestamp < now - tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > now + tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is in the future")

    data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    keys = [secret_key(s) for s in ([secret] if isinstance(secret, str) else secret)]
    expected = [_digest(key, msg_id, timestamp, data).encode("ascii") for key in keys]
    for entry in header.split()[:MAX_SIGNATURES]:
        version, _, candidate = entry.partition(",")
        if version != "v1":
            continue  # other schemes (v1a: asymmetric) are not ours to check
        presented = candidate.encode("ascii", "replace")
        # compare_digest: the time taken does not reveal how much of a forged signature was right
        if any(hmac.compare_digest(presented, e) for e in expected):
            return
    raise WebhookVerificationError("no valid v1 signature for this secret")


def _digest(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
