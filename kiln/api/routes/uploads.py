"""``POST /uploads``: store an input image and answer with its permanent (24 h) URL."""

from __future__ import annotations

import io

from fastapi import APIRouter, Depends, Request, UploadFile
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from kiln.api.auth import authenticate, services
from kiln.api.errors import ApiError
from kiln.errors import InvalidImage
from kiln.keys import KeyRecord

router = APIRouter(tags=["uploads"])

MAX_SIDE = 4096
UPLOADS_PER_MIN = 100
TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}
CHUNK = 1 << 16


@router.post("/uploads")
async def upload(file: UploadFile, request: Request, key: KeyRecord | None = Depends(authenticate)) -> dict[str, str]:
    """Upload a JPEG, PNG or WebP (at most 20 MB and 4096x4096) for i2i, edit and i2v."""
    svc = services(request)
    if key is not None and not svc.upload_limiter.hit(key.id, UPLOADS_PER_MIN).allowed:
        raise ApiError(429, "rate_limit_exceeded", f"Rate limit: {UPLOADS_PER_MIN} uploads/min", retry_after=60)
    limit = svc.settings.max_upload_bytes
    data = bytearray()
    while chunk := await file.read(CHUNK):
        data += chunk
        if len(data) > limit:
            raise InvalidImage(f"the upload is larger than {limit // 2**20} MB")
    media_type = _check(bytes(data))
    asset = await run_in_threadpool(svc.store.put, bytes(data), "u", media_type)  # S3: round trips
    return {"url": f"{svc.settings.base_url()}/u/{asset.name}"}


def _check(data: bytes) -> str:
    """The media type sniffed from the bytes; the size read from the header before any decoding."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            media_type = TYPES.get(img.format or "")
            if media_type is None:
                raise InvalidImage(f"uploads are JPEG, PNG or WebP, not {img.format or 'this type'}")
            if max(img.size) > MAX_SIDE:
                raise InvalidImage(f"the image is {img.width}x{img.height}; at most {MAX_SIDE}x{MAX_SIDE}")
            img.verify()
    except InvalidImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImage("the upload is not a readable JPEG, PNG or WebP image") from exc
    return media_type
