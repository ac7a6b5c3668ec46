"""An ASGI guard in front of the app: request bodies are capped while they are read, and the JSON
routes read their body as JSON whatever the Content-Type says (``curl -d`` sends a form type, and
the reference's examples rely on it).
"""

from __future__ import annotations

import json

MB = 2**20
JSON_LIMIT = 64 * MB  # two images as 20 MB data URIs, base64-inflated, fit


class BodyTooLarge(Exception):
    pass


class BodyGuard:
    def __init__(self, app, *, upload_limit: int) -> None:
        self.app = app
        self.upload_limit = upload_limit + 64 * 1024  # the multipart envelope around the file

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        upload = scope["path"] == "/uploads"
        limit = self.upload_limit if upload else JSON_LIMIT
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _too_large(send, limit)
        if not upload and not headers.get(b"content-type", b"").startswith((b"application/json", b"multipart/form-data")):
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _too_large(send, limit)


async def _too_large(send, limit: int) -> None:
    body = json.dumps(
        {"error": "invalid_parameters", "message": f"request body too large (at most {limit // MB} MB)"}
    ).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
