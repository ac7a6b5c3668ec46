"""API keys and their limits."""

from kiln.keys.ratelimit import RateLimiter, RateState
from kiln.keys.store import KEY_PREFIX, KeyRecord, KeyStore, NewKey, looks_like_a_key

__all__ = ["KEY_PREFIX", "KeyRecord", "KeyStore", "NewKey", "RateLimiter", "RateState", "looks_like_a_key"]
