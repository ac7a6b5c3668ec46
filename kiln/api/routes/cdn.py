"""The CDN: immutable, content-addressed assets at permanent URLs (``/i``, ``/v``, ``/u``).

No auth: the URLs are unguessable content hashes. ``ETag``/``If-None-Match`` and single byte
ranges (video seeking) are served without reading whole files into memory.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from kiln.api.auth import services
from kiln.api.errors import ApiError

router = APIRouter(tags=["cdn"])

IMMUTABLE = "public, max-age=31536000, immutable"
RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")


@router.get("/i/{name}")
@router.head("/i/{name}", include_in_schema=False)
async def image_asset(name: str, request: Request) -> Response:
    """A generated image."""
    return await run_in_threadpool(_serve, request, "i", name)


@router.get("/v/{name}")
@router.head("/v/{name}", include_in_schema=False)
async def video_asset(name: str, request: Request) -> Response:
    """A generated video (byte ranges supported)."""
    return await run_in_threadpool(_serve, request, "v", name)


@router.get("/u/{name}")
@router.head("/u/{name}", include_in_schema=False)
async def upload_asset(name: str, request: Request) -> Response:
    """An uploaded input image (kept 24 hours)."""
    return await run_in_threadpool(_serve, request, "u", name)


def _serve(request: Request, kind: str, name: str) -> Response:
    # in a worker thread: stat and open are network round trips when the store is S3
    store = services(request).store
    asset = store.stat(kind, name)  # a malformed name raises InvalidAssetName: 404 like a missing one
    if asset is None:
        raise ApiError(404, "not_found", f"no asset /{kind}/{name}")
    headers = {
        "ETag": asset.etag,
        "Cache-Control": IMMUTABLE,
        "Accept-Ranges": "bytes",
        "X-Content-Type-Options": "nosniff",
    }
    if _matches(request.headers.get("if-none-match"), asset.etag):
        return Response(status_code=304, headers=headers)
    start, end, status = 0, asset.size, 200
    wanted = request.headers.get("range")
    if wanted and _well_formed(wanted):  # other forms (multi-range, other units, last < first): whole asset
        parsed = _parse_range(wanted, asset.size)
        if parsed is None:
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{asset.size}"})
        start, end = parsed
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{asset.size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=asset.media_type)
    body = store.open_range(kind, name, start, end)
    return StreamingResponse(iter(body), status_code=status, headers=headers, media_type=asset.media_type)


def _matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _well_formed(header: str) -> bool:
    match = RANGE.match(header.strip())
    if match is None or match.groups() == ("", ""):
        return False
    first, last = match.groups()
    return first == "" or last == "" or int(last) >= int(first)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range as [start, end); None if unsatisfiable."""
    match = RANGE.match(header.strip())
    if match is None or size == 0:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":
        length = int(last)
        return (max(0, size - length), size) if length > 0 else None
    start = int(first)
    end = size if last == "" else min(size, int(last) + 1)
    return (start, end) if start < size else None
