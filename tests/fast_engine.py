"""``kiln`` with a fast fake engine: ``python tests/fast_engine.py --catalog FILE worker --redis URL …``.

For tests that run many jobs through real ``kiln worker`` processes (tests/test_chaos.py), where even
the toy model (~50 ms a job on 2 CPU cores) would make a thousand jobs too slow. Requests are planned
against the catalog as the real engine plans them (a bad one fails the same way); no model is loaded,
and the output is a solid-colour image derived from the seed and prompt, so one job always yields the
same bytes (and content-addressed name) and two jobs with different seeds never do. ``KILN_FAKE_STEP_S``
(default 0.005) is how long its single step takes, so a SIGKILL can land mid-job.

``python tests/fast_engine.py --zygote`` imports all that once, then forks a ``kiln worker`` per line
``{"argv": [...], "env": {...}, "log": PATH}`` read on stdin and writes the child's pid on stdout:
a restarted worker is up in a fraction of a second instead of the ~5 s (CPU) its imports take, which
is what lets the chaos test restart twenty of them in its time. Children are reaped by the zygote.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback

from PIL import Image

import kiln.engine
from kiln.engine import Engine, GenerationResult, ImageOutput, StepEvent
from kiln.errors import GenerationCancelled


class FastEngine(Engine):
    def load(self, spec):  # nothing to load
        return None

    def generate(self, request, *, on_step=None, cancel: threading.Event | None = None, previews=False, loras=None):
        plan = self.plan(request)
        started = time.perf_counter()
        if cancel is not None and cancel.wait(float(os.environ.get("KILN_FAKE_STEP_S", "0.005"))):
            raise GenerationCancelled("cancelled")
        if on_step is not None:
            on_step(StepEvent(step=1, total=1))
        colour = hashlib.sha256(f"{plan.seed}:{plan.prompt}".encode()).digest()
        width, height = plan.output_size
        # three bytes of colour give 16M images; the seed in the top row keeps distinct seeds distinct
        image = Image.new("RGB", (width, height), tuple(colour[:3]))
        for i, byte in enumerate(plan.seed.to_bytes(8, "big")):
            image.putpixel((i, 0), (byte, byte, byte))
        return GenerationResult(
            outputs=[ImageOutput(image=image, seed=plan.seed)], model=plan.spec.key, task=plan.task,
            width=width, height=height, seed=plan.seed, steps=plan.steps, guidance=plan.guidance,
            sampler=plan.sampler, scheduler=plan.scheduler, strength=plan.strength, num_frames=None, fps=None,
            elapsed_ms=round((time.perf_counter() - started) * 1000),
        )


def zygote(main) -> None:
    import kiln.cli.worker
    import kiln.engine.safety
    import kiln.loras
    import kiln.server
    import kiln.worker
    import kiln.worker.process  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers; nobody waits for them
    for line in sys.stdin:
        order = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_RDWR)
            log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(devnull, 0), os.dup2(devnull, 1), os.dup2(log, 2)
            os.environ.update(order["env"])
            code = 1
            try:
                code = main(order["argv"])
            except BaseException:
                traceback.print_exc()  # os._exit below would lose it
                raise
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)


if __name__ == "__main__":
    kiln.engine.Engine = FastEngine  # kiln.cli.worker imports it when it runs
    from kiln.cli.main import main

    if sys.argv[1:] == ["--zygote"]:
        zygote(main)
    else:
        sys.exit(main())
