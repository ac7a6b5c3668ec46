"""``/ws``: generations over one WebSocket, with step previews streamed as they happen.

Client messages: ``{"type": "auth", "token"}`` (first, unless the upgrade carried an
``Authorization`` header), ``{"type": "generate", "id"?, "modality", "family", "model", "task",
"format", "stream_frames"?, …generation parameters}`` (several may run on one connection; each
reply carries the generation's ``id``), ``{"type": "cancel", "id"}``. A generate message takes what
``POST /queue`` takes except ``priority``, ``webhook`` and ``idempotency_key`` (it runs now and
answers on the connection); those are refused with an error frame, never ignored.
Server messages: ``frame`` {id, step, total_steps, data: base64 WebP preview}, ``complete``
{id, output, latency_ms, seed}, ``error`` {id?, error, message}.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import threading
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError, create_model

from kiln.api.auth import authenticate_token, refund_credit
from kiln.api.errors import ApiError
from kiln.api.handoff import run_sync
from kiln.api.jobs import absolute
from kiln.api.requests import build_request
from kiln.api.schemas import GenerateBody, QueueBody
from kiln.engine.request import describe_validation_error
from kiln.errors import InvalidParameters, KilnError

router = APIRouter()

WS_PROTOCOL_ERROR = 1008

# What only a queued job has: a WebSocket generation runs at once (no priority), answers on its
# connection (no webhook), and a repeat is a new generation (no idempotency key).
QUEUE_ONLY = ("priority", "webhook", "idempotency_key")

# A generate message's fields: the queue body's, less QUEUE_ONLY (unknown keys are refused by the
# render API's body model; the bounds stay declared once, on QueueBody).
GenerateMessage = create_model(
    "GenerateMessage",
    __base__=GenerateBody,
    __doc__="The generation fields of a WebSocket ``generate`` message.",
    **{name: (field.annotation, field) for name, field in QueueBody.model_fields.items()
       if name not in GenerateBody.model_fields and name not in QUEUE_ONLY},
)


@router.websocket("/ws")
async def websocket(ws: WebSocket) -> None:
    await ws.accept()
    svc = ws.app.state.services
    send_lock = asyncio.Lock()

    async def send(message: dict[str, Any]) -> None:
        async with send_lock:
            await ws.send_json(message)

    try:
        key = await _authenticate(ws, svc)
    except (ApiError, WebSocketDisconnect) as exc:
        if isinstance(exc, ApiError):
            await send({"type": "error", "error": exc.code, "message": exc.message})
            await ws.close(code=WS_PROTOCOL_ERROR)
        return
    running: dict[str, threading.Event] = {}
    tasks: set[asyncio.Task] = set()
    try:
        while True:
            raw = await ws.receive()
            if raw["type"] == "websocket.disconnect":
                break
            message = _parse(raw)
            kind = message.get("type") if message is not None else None
            if kind == "generate":
                gen_id = str(message.get("id") or "g_" + secrets.token_hex(6))
                problem = _refuse(svc, key, gen_id, running)
                if problem is not None:
                    await send(problem)
                    continue
                cancel = threading.Event()
                running[gen_id] = cancel
                task = asyncio.create_task(_generate(ws, svc, key, gen_id, message, cancel, send, running))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif kind == "cancel":
                event = running.get(str(message.get("id")))
                if event is None:
                    await send({"type": "error", "id": message.get("id"), "error": "not_found",
                                "message": "no such generation running on this connection"})
                else:
                    event.set()
            else:
                await send({"type": "error", "error": "invalid_parameters",
                            "message": "messages are JSON objects of type generate or cancel"})
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        for event in running.values():
            event.set()  # the client is gone: stop its generations between steps


MAX_IN_FLIGHT = 4


def _parse(raw: dict) -> dict | None:
    text = raw.get("text")
    if text is None and raw.get("bytes") is not None:
        try:
            text = raw["bytes"].decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        message = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _refuse(svc, key, gen_id: str, running: dict) -> dict | None:
    """Why this generate message cannot start now (each one counts against the key's rate), or None."""
    if gen_id in running:
        return {"type": "error", "id": gen_id, "error": "invalid_parameters",
                "message": f"generation {gen_id} is already running on this connection"}
    if len(running) >= MAX_IN_FLIGHT:
        return {"type": "error", "id": gen_id, "error": "rate_limit_exceeded",
                "message": f"at most {MAX_IN_FLIGHT} generations at once per connection"}
    if key is not None:
        current = svc.keys.get(key.id)
        if current is None or not current.active(svc.keys.clock()):
            return {"type": "error", "id": gen_id, "error": "token_expired", "message": "API key has been revoked or has expired"}
        rate = svc.limiter.hit(key.id, current.rate_per_min)
        if not rate.allowed:
            return {"type": "error", "id": gen_id, "error": "rate_limit_exceeded",
                    "message": f"Rate limit: {rate.limit}/min", "retry_after": rate.reset_s}
    return None


async def _authenticate(ws: WebSocket, svc):
    if not svc.settings.auth:
        return None
    header = ws.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return authenticate_token(svc, token.strip())
    try:
        first = await asyncio.wait_for(ws.receive_json(), timeout=30)
    except (TimeoutError, ValueError) as exc:
        raise ApiError(401, "invalid_token", "send {\"type\": \"auth\", \"token\": <key>} first") from exc
    if not isinstance(first, dict) or first.get("type") != "auth" or not isinstance(first.get("token"), str):
        raise ApiError(401, "invalid_token", "send {\"type\": \"auth\", \"token\": <key>} first")
    return authenticate_token(svc, first["token"])


async def _generate(ws, svc, key, gen_id, message, cancel, send, running) -> None:
    loop = asyncio.get_running_loop()
    stream = bool(message.get("stream_frames"))
    fields = {k: v for k, v in message.items() if k not in ("type", "id", "stream_frames")}
    started = time.perf_counter()
    charged = False
    try:
        queue_only = [name for name in QUEUE_ONLY if name in fields]
        if queue_only:
            raise InvalidParameters(
                f"{', '.join(queue_only)}: only POST /queue takes {'them' if len(queue_only) > 1 else 'it'}; "
                "a WebSocket generation runs at once and answers on this connection",
                details={"field": queue_only[0]},
            )
        body = GenerateMessage.model_validate(fields)
        spec = svc.catalog.resolve(body.family, body.model)
        if spec.modality != body.modality:
            raise ApiError(400, "invalid_parameters", f"{spec.key} makes {spec.modality}s")
        canonical = await build_request(svc, body, spec, body.task, body.format)
        if key is not None and key.metered and not svc.keys.spend(key.id):
            raise ApiError(402, "insufficient_credits", "this API key has no credits left")
        charged = True

        def on_step(event) -> None:
            if stream and event.preview is not None:
                buf = io.BytesIO()
                event.preview.save(buf, "WEBP", quality=80, method=0)
                frame = {"type": "frame", "id": gen_id, "step": event.step, "total_steps": event.total,
                         "data": base64.b64encode(buf.getvalue()).decode()}
                asyncio.run_coroutine_threadsafe(send(frame), loop)

        stored = await run_sync(
            svc.worker, canonical, wait_s=svc.settings.sync_wait_s, retry_after=svc.settings.retry_after_s,
            on_step=on_step, cancel=cancel, previews=stream,
        )
        asset = stored.assets[0]
        await send({"type": "complete", "id": gen_id, "output": absolute(svc, f"/{asset.kind}/{asset.name}"),
                    "latency_ms": round((time.perf_counter() - started) * 1000), "seed": stored.result.seed})
    except ValidationError as exc:
        await _send_error(send, gen_id, "invalid_parameters", describe_validation_error(exc))
    except KilnError as exc:
        if charged:
            refund_credit(svc, key)
        await _send_error(send, gen_id, exc.code, exc.message, getattr(exc, "retry_after", None))
    except Exception:  # noqa: BLE001 - never a stack trace to the client
        if charged:
            refund_credit(svc, key)
        await _send_error(send, gen_id, "internal_error", "internal server error")
    finally:
        running.pop(gen_id, None)


async def _send_error(send, gen_id, code, message, retry_after=None) -> None:
    body = {"type": "error", "id": gen_id, "error": code, "message": message}
    if retry_after is not None:
        body["retry_after"] = retry_after
    try:
        await send(body)
    except (WebSocketDisconnect, RuntimeError):
        pass
