"""The browser playground: ``GET /`` is its page, ``GET /playground/<file>`` its scripts and styles.

Plain HTML, CSS and JavaScript modules shipped in ``kiln/api/static/playground`` (no build step).
Everything the page shows comes from the render API itself (``/models``, ``/ws``, ``/queue``,
``/jobs``, ``/uploads``), with the key the user types, so the page needs no route of its own and
no privilege the API does not give any client.

Every response carries a Content-Security-Policy that lets the page run only its own files, talk
only to this origin (HTTP and WebSocket) and show images only from here, ``blob:``/``data:`` (step
previews, the local copy of an upload) and the origin this server hands out in its URLs
(``public_url``), which may be a CDN in front of it.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import Response

from kiln.api.auth import services
from kiln.api.errors import ApiError

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static" / "playground"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(html|js|css|svg|png)$")
# A Host header is the client's to choose: only a plain host[:port] is echoed into the policy.
HOST = re.compile(r"^([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?$")


@router.api_route("/", methods=["GET", "HEAD"])
async def page(request: Request) -> Response:
    """The playground's page."""
    return _serve(request, "index.html")


@router.api_route("/playground/{name}", methods=["GET", "HEAD"])
async def asset(name: str, request: Request) -> Response:
    """One of the playground's scripts, styles or images."""
    return _serve(request, name)


@lru_cache(maxsize=None)
def _load(name: str) -> tuple[bytes, str] | None:
    """The file's bytes and ETag; read once (the files ship inside the package and never change)."""
    if not NAME.match(name):
        return None
    path = STATIC / name
    if not path.is_file():
        return None
    data = path.read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _serve(request: Request, name: str) -> Response:
    found = _load(name)
    if found is None:
        raise ApiError(404, "not_found", f"no route {request.url.path}")
    data, etag = found
    headers = {
        "ETag": etag,
        # revalidate every time: after an upgrade the browser must not mix old and new modules
        "Cache-Control": "no-cache",
        "Content-Security-Policy": policy(request),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
    }
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else data
    response = Response(body, media_type=TYPES[Path(name).suffix], headers=headers)
    if request.method == "HEAD":
        response.headers["content-length"] = str(len(data))
    return response


def policy(request: Request) -> str:
    """The page's Content-Security-Policy for this request (its WebSocket origin is the Host it used)."""
    handed_out = _origin(services(request).settings.base_url())
    images = " ".join(dict.fromkeys(["'self'", "blob:", "data:", handed_out]))
    connect = ["'self'"]
    host = request.headers.get("host", "")
    if HOST.match(host):
        # CSP Level 2 browsers do not count ws: as 'self'; name this origin's WebSocket explicitly
        connect += [f"ws://{host}", f"wss://{host}"]
    return "; ".join([
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        f"img-src {images}",
        f"media-src {images}",
        f"connect-src {' '.join(connect)}",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
