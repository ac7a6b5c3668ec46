"""How a generation request travels through the queue: JSON, with input images stored as uploads.

Image bytes never sit in the job table: the API stores them as ``u`` assets (content-addressed, so
a repeated input costs nothing) and the payload names them; the worker reads them back.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kiln.engine.request import GenerationRequest
from kiln.errors import InvalidImage
from kiln.storage import AssetStore
from kiln.worker.routing import needs_of

INPUT_FIELDS = ("image", "mask")


def to_payload(request: GenerationRequest, store: AssetStore) -> dict[str, Any]:
    """``{"request": {...}, "needs": [...]}`` (``needs``: what the worker that runs it should hold,
    :mod:`kiln.worker.routing`); the API may add job-level entries (a webhook) beside them."""
    data = request.model_dump(exclude=set(INPUT_FIELDS), exclude_none=True)
    for field in INPUT_FIELDS:
        value = getattr(request, field)
        if value is not None:
            data[f"{field}_asset"] = store.put(value, "u", _sniff(value)).name
    payload = {"request": data, "needs": needs_of(data)}
    signature = batch_signature(data)
    if signature is not None:
        payload["batch"] = signature
    return payload


# What may differ between requests that share one pipeline call (kiln.engine.batch); post-processing
# (encoding, the safety check) is per request anyway.
PER_REQUEST = frozenset({"prompt", "negative_prompt", "seed", "num_outputs", "encoding", "safety_check"})


def batch_signature(data: dict[str, Any]) -> str | None:
    """A name shared by requests (payload ``request`` dicts) that one pipeline call can serve, as the
    engine's ``batch_key`` would decide before defaults are filled in; None for those that run alone
    (an input image, a refinement pass, a video). Two requests that differ only in a default left out
    get different names and just run apart; the worker checks the engine's key before batching."""
    if (data.get("task") != "t2i" or any(f"{f}_asset" in data for f in INPUT_FIELDS) or data.get("upscale")
            or data.get("latent_upscale") or data.get("detail_enhance")):
        return None
    common = {k: v for k, v in data.items() if k not in PER_REQUEST}
    common["loras"] = [(lora["sha256"], lora.get("weight", 1.0)) for lora in data.get("loras", ())]
    common["negative"] = data.get("negative_prompt") is not None
    return hashlib.sha256(json.dumps(common, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def from_payload(payload: dict[str, Any], store: AssetStore) -> GenerationRequest:
    data = payload["request"]
    fields = {k: v for k, v in data.items() if not k.endswith("_asset")}
    for field in INPUT_FIELDS:
        name = data.get(f"{field}_asset")
        if name is not None:
            fields[field] = store.read("u", name)
    return GenerationRequest.create(**fields)


def _sniff(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise InvalidImage("input images must be PNG, JPEG or WebP")
