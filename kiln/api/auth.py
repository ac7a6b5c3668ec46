"""``Authorization: Bearer <key>``: who is asking, and whether they may ask now."""

from __future__ import annotations

from fastapi import Request

from kiln.api.errors import ApiError
from kiln.keys import KeyRecord, looks_like_a_key


def services(request: Request):
    return request.app.state.services


async def authenticate(request: Request) -> KeyRecord | None:
    """The caller's key, counted against its rate; None when the server runs without auth."""
    svc = services(request)
    if not svc.settings.auth:
        return None
    return authenticate_token(svc, required_token(request), request)


def required_token(request: Request) -> str:
    """The bearer token, or the render API's 401 (each door maps it to its own shape)."""
    token = bearer_token(request)
    if token is None:
        raise ApiError(401, "invalid_token", "missing API key: send Authorization: Bearer <key>")
    return token


def authenticate_token(svc, token: str, request: Request | None = None) -> KeyRecord:
    """Check a presented key and count the request against its rate (HTTP and WebSocket alike)."""
    record = identify(svc, token)
    count_request(svc, record.id, record.rate_per_min, request)
    return record


def bearer_token(request: Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``; None when the header is missing or another scheme."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def identify(svc, token: str) -> KeyRecord:
    """The active key ``token`` is, without counting anything against it."""
    if not looks_like_a_key(token):
        raise ApiError(401, "invalid_token", "API key format invalid")
    record = svc.keys.lookup(token)
    if record is None:
        raise ApiError(401, "invalid_token", "API key not recognised")
    if not record.active(svc.keys.clock()):
        raise ApiError(401, "token_expired", "API key has been revoked or has expired")
    return record


def count_request(svc, bucket: str, limit: int, request: Request | None = None) -> None:
    """One request against ``bucket``'s per-minute ``limit``; 429 past it (the headers say where it stands)."""
    rate = svc.limiter.hit(bucket, limit)
    if request is not None:
        request.state.rate = rate
    if not rate.allowed:
        raise ApiError(429, "rate_limit_exceeded", f"Rate limit: {rate.limit}/min", retry_after=rate.reset_s)


def spend_credit(request: Request, key: KeyRecord | None) -> None:
    """Charge one generation to a metered key; 402 when its balance is spent."""
    if key is not None and key.metered and not services(request).keys.spend(key.id):
        raise ApiError(402, "insufficient_credits", "this API key has no credits left")


def refund_credit(svc, key: KeyRecord | None) -> None:
    """Give back the credit of a generation that was charged but not made."""
    if key is not None and key.metered:
        svc.keys.refund(key.id)
