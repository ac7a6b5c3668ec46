"""The asyncio client: :class:`AsyncClient`, the same calls as :class:`~kiln.client.Client` awaited."""

from __future__ import annotations

import os
import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Unpack

import httpx

from kiln.client import protocol as p
from kiln.client.errors import CapacityExhausted, ConnectionFailed, KilnAPIError
from kiln.client.records import Aliases, Generation, Job, JobEvent, Model, Position


class AsyncClient:
    """A Kiln (render API) server, from asyncio code: :class:`~kiln.client.Client`'s calls, awaited
    (and :meth:`stream` an async iterator).

    ``api_key`` defaults to ``KILN_API_KEY``. Refusals that waiting can cure (429, 503 capacity) are
    retried up to ``max_retries`` times with exponential backoff from ``backoff`` seconds (capped at
    ``max_backoff``) plus jitter, never sooner than ``Retry-After``. With ``fallback_to_async``, a
    sync request the server has no capacity for runs as a queued job instead, and :meth:`generate`
    returns the same :class:`Generation` once it is done. Every error is a
    :class:`~kiln.client.errors.KilnAPIError` subclass named after the server's error code.

    ``http`` is an ``httpx.AsyncClient`` to send through (closed by its owner, not by this client);
    ``sleep``, ``clock`` and ``rng`` are what the waits use, for tests that must not really wait.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 300.0,
                 max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 30.0,
                 fallback_to_async: bool = False, http: httpx.AsyncClient | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("KILN_API_KEY")
        self.timeout = timeout
        self.fallback_to_async = fallback_to_async
        self.retry = p.RetryPolicy(max_retries=max_retries, backoff=backoff, max_backoff=max_backoff, rng=rng)
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=p.timeout(timeout))
        self._sleep, self._clock = sleep, clock

    # --- generation ----------------------------------------------------------------------------------

    async def generate(self, prompt: str, *, model: str, task: str = "t2i", format: str | None = None,
                       fallback_to_async: bool | None = None, **params: Unpack[p.Params]) -> Generation:
        """Generate on the sync tier and return the output's bytes, seed, permanent URL and timing.

        ``model`` is ``FAMILY/MODEL`` (an alias works: ``flux/latest``); ``task`` picks image or video
        (``t2v``/``i2v``); ``params`` are the render API's (``steps``, ``seed``, ``image`` …).
        """
        started = self._clock()
        fallback = self.fallback_to_async if fallback_to_async is None else fallback_to_async
        params = await self._with_uploads(p.checked_params(params))
        headers = {"Prefer": "respond-async"} if fallback else {}
        url = self.base_url + p.sync_path(model, task)
        try:
            response = await self._send("POST", url, params={"format": format} if format else None,
                                  json=p.generation_body(prompt, params), headers=headers,
                                  retry_if=lambda error: not (fallback and isinstance(error, CapacityExhausted)))
        except CapacityExhausted:
            if not fallback:
                raise
            # a server that does not take Prefer: respond-async answers 503 all the same: queue it here
            job = await self._submit(p.queue_body(prompt, model, task, format, params,
                                                  idempotency_key=f"kiln-client-{uuid.uuid4().hex}"))
            return await self._result_of(job, started)
        if response.status_code == 202:  # the server queued it for us (Prefer: respond-async)
            return await self._result_of(p.job_of(response), started)
        return p.generation_of(response, self._clock() - started)

    async def submit(self, prompt: str, *, model: str, task: str = "t2i", format: str | None = None,
                     priority: str | None = None, webhook: str | None = None, idempotency_key: str | None = None,
                     **params: Unpack[p.Params]) -> Job:
        """Queue a generation on the async tier; the job as queued (id, position, eta_seconds).

        The same ``idempotency_key`` with the same request returns the job it made the first time."""
        params = await self._with_uploads(p.checked_params(params))
        return await self._submit(p.queue_body(prompt, model, task, format, params, priority=priority,
                                               webhook=webhook, idempotency_key=idempotency_key))

    async def _submit(self, body: dict[str, Any]) -> Job:
        return p.job_of(await self._send("POST", self.base_url + "/queue", json=body))

    async def _result_of(self, job: Job, started: float) -> Generation:
        done = await self.wait(job)
        data, media_type = await self._fetch(done.output or "")
        return p.generation_of_job(done, data, media_type, self._clock() - started)

    # --- jobs ----------------------------------------------------------------------------------------

    async def job(self, job: str | Job) -> Job:
        """The job's state now."""
        return p.job_of(await self._send("GET", self._job_url(job)))

    async def wait(self, job: str | Job, *, timeout: float | None = None) -> Job:
        """Follow the job's events until it ends; the complete job (output URLs, seed, duration).

        Raises the error the job failed with (e.g. :class:`~kiln.client.errors.NsfwDetected`),
        :class:`~kiln.client.errors.JobCancelled`, or ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else self._clock() + timeout
        async for _ in self._events(p.job_id_of(job), None, deadline):
            pass  # the stream ends after the terminal event
        return p.finished(await self.job(job))

    def stream(self, job: str | Job, *, last_event_id: int | None = None) -> AsyncIterator[JobEvent]:
        """The job's events as they happen (:class:`~kiln.client.records.Position`, ``Started``,
        ``Progress``, then one of ``Completed``, ``Failed``, ``Cancelled``), ending after the last.

        A connection that drops is opened again with ``Last-Event-ID``, so no event is lost or
        repeated; ``max_retries`` reconnections in a row without an event in between give up."""
        return self._events(p.job_id_of(job), last_event_id, None)

    async def _events(self, job_id: str, last_event_id: int | None,
                      deadline: float | None) -> AsyncIterator[JobEvent]:
        url = f"{self._job_url(job_id)}/events"
        failures = 0
        position: int | None = None
        while True:
            read_s = p.STREAM_READ_TIMEOUT_S
            if deadline is not None:
                read_s = min(read_s, deadline - self._clock())
                if read_s <= 0:
                    raise TimeoutError(f"job {job_id} did not finish in time")
            try:
                response = await self._send("GET", url, headers=p.stream_headers(last_event_id), stream=True,
                                            read_timeout=read_s)
                try:
                    decoder = p.SSEDecoder()
                    async for line in response.aiter_lines():
                        event = p.decoded(job_id, decoder, line)
                        if event is None:
                            continue
                        if p.news(event, last_event_id, position):
                            failures = 0  # the connection brought something: its drop is not a failure streak
                        if isinstance(event, Position):
                            position = event.position
                        if event.event_id is not None:
                            last_event_id = event.event_id
                        yield event
                        if event.terminal:
                            return
                        if deadline is not None and self._clock() >= deadline:
                            # a stream that keeps bringing news never times out a read: check here too
                            raise TimeoutError(f"job {job_id} did not finish in time")
                finally:
                    await response.aclose()
                lost: KilnAPIError = ConnectionFailed(f"the event stream of job {job_id} ended before the job did")
            except ConnectionFailed as exc:
                lost = exc
            except httpx.TransportError as exc:
                lost = p.connection_failed(exc, url)
            if deadline is not None and self._clock() >= deadline:
                raise TimeoutError(f"job {job_id} did not finish in time") from lost
            if failures >= self.retry.max_retries:
                raise lost
            await self._sleep(self.retry.delay(failures))
            failures += 1

    async def cancel(self, job: str | Job) -> Job:
        """Cancel a queued job, or stop a running one between steps; the job as it is then."""
        return p.job_of(await self._send("DELETE", self._job_url(job)))

    def _job_url(self, job: str | Job) -> str:
        return f"{self.base_url}/jobs/{p.job_id_of(job)}"

    # --- inputs, discovery, outputs ------------------------------------------------------------------

    async def upload(self, file: str | bytes | os.PathLike[str], *, filename: str | None = None) -> str:
        """Upload a JPEG, PNG or WebP (a path or bytes) for i2i, edit and i2v; its URL (kept 24 hours)."""
        name, data = p.upload_file(file, filename)
        response = await self._send("POST", self.base_url + "/uploads", files={"file": (name, data)})
        return response.json()["url"]

    async def models(self, *, family: str | None = None, modality: str | None = None) -> list[Model]:
        """Every model the server serves, optionally of one family or modality."""
        query = {k: v for k, v in {"family": family, "modality": modality}.items() if v is not None}
        data = (await self._send("GET", self.base_url + "/models", params=query or None)).json()
        return [Model.from_json(m) for m in data["models"]]

    async def aliases(self) -> Aliases:
        """Stable model names (``latest``, ``fast`` …) and what each points at now."""
        data = (await self._send("GET", self.base_url + "/models/aliases")).json()
        return Aliases(dict(data["aliases"]), data.get("updated_at"))

    async def download(self, url: str) -> bytes:
        """The bytes at an output URL the server handed out (no API key is sent with it)."""
        return (await self._fetch(url))[0]

    async def _fetch(self, url: str) -> tuple[bytes, str]:
        response = await self._send("GET", p.absolute(self.base_url, url), auth=False)
        return response.content, response.headers.get("content-type", "application/octet-stream").split(";")[0]

    async def _with_uploads(self, params: dict[str, Any]) -> dict[str, Any]:
        for field in ("image", "mask"):
            if p.needs_upload(params.get(field)):
                params[field] = await self.upload(params[field])
        return params

    # --- sending -------------------------------------------------------------------------------------

    async def _send(self, method: str, url: str, *, headers: dict[str, str] | None = None, auth: bool = True,
                    stream: bool = False, read_timeout: float | None = None,
                    retry_if: Callable[[KilnAPIError], bool] = lambda error: True, **kwargs: Any) -> httpx.Response:
        """Send, retrying what :class:`~kiln.client.protocol.RetryPolicy` allows; a 2xx or 303 response
        (open when ``stream``), else the error it stands for."""
        headers = p.request_headers(self.api_key, headers, auth=auth)
        limit = p.timeout(self.timeout, read=read_timeout)
        attempt = 0
        while True:
            request = self._http.build_request(method, url, headers=headers, timeout=limit, **kwargs)
            try:
                response = await self._http.send(request, stream=stream, follow_redirects=False)
            except httpx.TransportError as exc:
                raise p.connection_failed(exc, url) from exc
            if p.answered(response):
                return response
            try:
                await response.aread()
            finally:
                await response.aclose()
            error = p.error_of(response)
            if not (retry_if(error) and self.retry.should_retry(error, attempt)):
                raise error
            await self._sleep(self.retry.delay(attempt, error))
            attempt += 1

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
