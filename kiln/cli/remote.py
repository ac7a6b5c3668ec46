"""``kiln generate --server URL``: the same generation on a Kiln server, through :mod:`kiln.client`.

The request is queued (``POST /queue``) and followed over SSE, so the progress bar moves with the
server's steps; local ``--image``/``--mask`` files are uploaded first. ``-n N`` queues N jobs with
seeds ``seed``, ``seed + 1`` …, which is what a local ``-n N`` makes too. The server's errors leave
as Kiln's own (a request error exits 2, a model the server cannot serve 3, anything else 1), and
Ctrl-C (or one job failing) cancels the jobs before exiting.
"""

from __future__ import annotations

import io
import random
import sys
import time
from pathlib import Path

from kiln.errors import InvalidImage, InvalidParameters, KilnError, UnavailableError, UserError

MAX_SEED = 2**32 - 1
URL_PREFIXES = ("http://", "https://", "data:")


def run_remote(args) -> int:
    from kiln import client as kc

    try:
        with kc.Client(args.server, args.api_key) as client:
            return _generate(client, args)
    except kc.KilnAPIError as exc:
        raise _local_error(exc) from exc


def _generate(client, args) -> int:
    from kiln.cli.generate import _default_task, _output_format, _paths

    model = _model_key(args)
    if args.num_outputs < 1 or args.num_outputs > 4:
        raise InvalidParameters("--num-outputs: 1 to 4")
    info = _model_info(client, model)
    has_image = args.image is not None
    if args.task:
        task = args.task
    elif info is not None:
        task = _default_task(list(info.tasks), has_image=has_image)
    else:  # the server knows no such model: its answer to the request will say so
        task = "i2i" if has_image else "t2i"
    modality = info.modality if info else ("video" if task in ("t2v", "i2v") else "image")
    fmt_out = _output_format(Path(args.output) if args.output else None, modality)
    if args.output is not None and not Path(args.output).parent.is_dir():
        raise InvalidParameters(f"cannot write {args.output}: {Path(args.output).parent} is not a directory")
    params = {
        "negative_prompt": args.negative_prompt, "steps": args.steps, "guidance": args.guidance,
        "sampler": args.sampler, "scheduler": args.scheduler, "strength": args.strength, "duration": args.duration,
        "loras": _loras(args.lora) or None,
        "image": _input(client, args.image, "image"), "mask": _input(client, args.mask, "mask"),
    }
    count = args.num_outputs
    seed = args.seed if args.seed is not None or count == 1 else random.randint(0, MAX_SEED)
    seeds = [None] * count if seed is None else [(seed + i) % (MAX_SEED + 1) for i in range(count)]

    started = time.perf_counter()
    jobs = [client.submit(args.prompt, model=model, task=task, format=args.fmt, seed=s, **params) for s in seeds]
    bar = _RemoteProgress(disabled=args.quiet, jobs=count)
    try:
        for index, job in enumerate(jobs):
            for event in client.stream(job):
                bar.update(index, event)
        done = [client.wait(job) for job in jobs]
    except BaseException:  # Ctrl-C, or one job failed: the others would run on for nothing
        for job in jobs:
            _cancel_quietly(client, job)
        raise
    finally:
        bar.close()
    outputs = [client.download(job.output) for job in done]
    took = time.perf_counter() - started

    first_seed = done[0].seed if done[0].seed is not None else 0
    paths = _paths(Path(args.output) if args.output else None, first_seed, fmt_out, len(outputs))
    for data, path in zip(outputs, paths, strict=True):
        path.write_bytes(_converted(data, fmt_out))
    print(_summary(done[0].seed, model, task, outputs[0], _steps(args, info), took, modality))
    for path in paths:
        print(path)
    return 0


def _model_key(args) -> str:
    if args.model:
        model = args.model
    else:
        from kiln.catalog import load_catalog

        model = load_catalog(args.catalog).default_model
    family, sep, name = model.partition("/")
    if not sep or not family or not name:
        raise InvalidParameters(f"--model: FAMILY/MODEL (e.g. flux/dev), not {model!r}")
    return model


def _model_info(client, model: str):
    """The server's entry for ``model`` (an alias resolved within its family); None if it has none, in
    which case the server's answer to the request says why."""
    family, name = model.split("/", 1)
    by_name = {m.model: m for m in client.models(family=family)}
    if name not in by_name:
        name = client.aliases().aliases.get(name, name)
    return by_name.get(name)


def _loras(items: list[str]) -> list[dict[str, object]]:
    """``URL[:WEIGHT]`` adapters; a local file cannot reach a remote server, so it is refused."""
    loras = []
    for item in items:
        url, sep, weight = item.rpartition(":")
        if not sep or not weight.replace(".", "", 1).isdigit():  # no weight given (a URL holds ':')
            url, weight = item, "1.0"
        if not url.startswith(("http://", "https://")):
            raise InvalidParameters(
                f"--lora {item}: with --server a LoRA must be an http(s) URL the server can download; "
                "a local file stays on this machine (put it where the server can fetch it)"
            )
        loras.append({"url": url, "weight": float(weight)})
    return loras


def _input(client, value: str | None, what: str) -> str | None:
    """A URL or data URI as given; a local file uploaded to the server (its URL)."""
    if value is None or value.startswith(URL_PREFIXES):
        return value
    path = Path(value)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImage(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    return client.upload(data, filename=path.name)


def _converted(data: bytes, fmt: str) -> bytes:
    """The server's bytes (WebP images, MP4 video) in the format the output file's name asks for."""
    if fmt in ("webp", "mp4"):
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        (img.convert("RGB") if fmt == "jpeg" else img).save(out, fmt.upper())
        return out.getvalue()


def _steps(args, info) -> int | None:
    if args.steps is not None:
        return args.steps
    if info is None:
        return None
    return info.info.get("fixed_steps") or info.info.get("default_steps")


def _summary(seed, model: str, task: str, first: bytes, steps: int | None, took: float, modality: str) -> str:
    parts = [f"seed {seed}", f"{model} {task}"]
    if modality == "image":
        from PIL import Image

        with Image.open(io.BytesIO(first)) as img:
            parts[-1] += f" {img.width}x{img.height}"
    if steps is not None:
        parts.append(f"{steps} steps")
    parts.append(f"{took:.2f}s")
    return "  ".join(parts)


def _cancel_quietly(client, job) -> None:
    from kiln.client import KilnAPIError

    try:
        client.cancel(job)
    except KilnAPIError:
        pass  # already finished, or the server is gone: nothing left to stop


def _local_error(exc) -> KilnError:
    """The server's error as Kiln's own, so ``kiln``'s exit codes mean the same with or without --server."""
    from kiln import client as kc

    message = exc.message if exc.job_id is None else f"{exc.message} (job {exc.job_id})"
    if isinstance(exc, kc.UserError):
        local: KilnError = UserError(message, details=exc.details)
    elif isinstance(exc, kc.UnavailableError):
        local = UnavailableError(message, details=exc.details)
    else:
        local = KilnError(message, details=exc.details)
    local.code = exc.code
    return local


class _RemoteProgress:
    """The progress bar of ``kiln generate``, fed by the jobs' events: queue position while waiting,
    then the steps of every job on one bar."""

    def __init__(self, *, disabled: bool, jobs: int) -> None:
        self.disabled, self.jobs = disabled, jobs
        self.bar = None

    def update(self, index: int, event) -> None:
        from kiln.client import Position, Progress, Started

        if self.disabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="step", file=sys.stderr, leave=False)
        if isinstance(event, Position):
            eta = f", about {event.eta_seconds:.0f}s" if event.eta_seconds is not None else ""
            self.bar.set_description(f"queued at {event.position}{eta}")
        elif isinstance(event, Started):
            self.bar.set_description("running" if self.jobs == 1 else f"job {index + 1}/{self.jobs}")
        elif isinstance(event, Progress) and event.total_steps:
            self.bar.total = event.total_steps * self.jobs
            self.bar.update(index * event.total_steps + event.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
