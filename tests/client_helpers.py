"""Fakes and fixtures for the client tests (tests/test_client*.py): an engine whose steps a test can
hold and whose failure modes a prompt word picks, and a fake sleep that records the client's waits."""

from __future__ import annotations

import hashlib
import threading
import time

import httpx
from PIL import Image

from kiln.catalog import load_catalog
from kiln.engine import Engine, GenerationResult, ImageOutput, StepEvent, VideoOutput
from kiln.errors import GenerationCancelled, ModelLoadFailed, ModelNotInstalled, NsfwDetected, OutOfMemory

PUBLIC_URL = "http://kiln.test"  # the in-process server's public URL, which its TestClient answers


class StepEngine(Engine):
    """The real planner over the default catalog and no model: every step is reported, the output is a
    solid colour derived from the seed and prompt. A prompt word picks a behaviour:

    - ``hold``: each step waits until :attr:`hold` is set (cancellation still stops it); :attr:`held`
      is set when such a generation reaches its first step;
    - ``nsfw``: the safety check refuses the output (:class:`NsfwDetected`), ``oom``: out of memory,
      ``crash``: an unexpected exception (the worker's ``generation_failed``).

    ``flux/dev`` is not installed and ``flux/dev2`` does not load: what a server says for each.
    """

    def __init__(self) -> None:
        super().__init__(load_catalog(None), device="cpu")
        self.hold = threading.Event()
        self.held = threading.Event()
        self.hold.set()

    def load(self, spec):
        if spec.key == "flux/dev":
            raise ModelNotInstalled(f"{spec.key} is not installed: run `kiln pull {spec.key}`")
        if spec.key == "flux/dev2":
            raise ModelLoadFailed(f"{spec.key} could not be loaded (OSError); see the server log")
        return None

    def generate(self, request, *, on_step=None, cancel: threading.Event | None = None, previews=False, loras=None):
        plan = self.plan(request)
        self.load(plan.spec)
        words = plan.prompt.lower().split()
        if "oom" in words:
            raise OutOfMemory(f"{plan.spec.key} ran out of memory at {plan.width}x{plan.height}")
        if "crash" in words:
            raise RuntimeError("an engine bug")
        for step in range(1, plan.steps + 1):
            if "hold" in words:
                self.held.set()
                while not self.hold.wait(0.01):
                    if cancel is not None and cancel.is_set():
                        break
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("cancelled")
            if on_step is not None:
                on_step(StepEvent(step=step, total=plan.steps))
        if "nsfw" in words:
            raise NsfwDetected("Content policy violation: the safety classifier flagged the generated image",
                               details={"outputs": [0]})
        colour = tuple(hashlib.sha256(f"{plan.seed}:{plan.prompt}".encode()).digest()[:3])
        width, height = plan.output_size
        image = Image.new("RGB", (width, height), colour)
        if plan.spec.modality == "video":
            outputs = [VideoOutput([image] * (plan.num_frames or 2), fps=plan.fps or 24, seed=plan.seed)]
        else:
            outputs = [ImageOutput(image=image, seed=seed) for seed in plan.seeds]
        return GenerationResult(
            outputs=outputs, model=plan.spec.key, task=plan.task, width=width, height=height, seed=plan.seed,
            steps=plan.steps, guidance=plan.guidance, sampler=plan.sampler, scheduler=plan.scheduler,
            strength=plan.strength, num_frames=plan.num_frames, fps=plan.fps, elapsed_ms=1,
        )


class InProcess(httpx.BaseTransport):
    """An httpx transport onto the real app behind a Starlette ``TestClient`` (which is built on another
    HTTP library, httpx2): requests go through the app in process, responses stream back as the app
    sends them (an SSE stream arrives event by event)."""

    def __init__(self, test_client) -> None:
        self.test_client = test_client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        inner = self.test_client.build_request(request.method, str(request.url), headers=list(request.headers.raw),
                                               content=request.read())
        response = self.test_client.send(inner, stream=True, follow_redirects=False)
        return httpx.Response(response.status_code, headers=list(response.headers.raw), stream=_Body(response),
                              request=request)


class _Body(httpx.SyncByteStream):
    def __init__(self, response) -> None:
        self.response = response

    def __iter__(self):
        yield from self.response.iter_raw()

    def close(self) -> None:
        self.response.close()


class FakeSleep:
    """Stands in for ``time.sleep``: records each wait, moves ``clock`` (if given) on by it and runs
    ``then`` (if given) once, at the first wait — what the test wants to happen "meanwhile"."""

    def __init__(self, clock=None, then=None) -> None:
        self.waits: list[float] = []
        self.clock, self.then = clock, then

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.clock is not None:
            self.clock.now += seconds
        if self.then is not None:
            then, self.then = self.then, None
            then()


class MovableClock:
    """A monotonic clock that starts at the real one and moves only when told (``now += s``)."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def in_background(action) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


class AsyncFakeSleep(FakeSleep):
    """:class:`FakeSleep` for ``asyncio.sleep``'s place."""

    async def __call__(self, seconds: float) -> None:  # type: ignore[override]
        super().__call__(seconds)
