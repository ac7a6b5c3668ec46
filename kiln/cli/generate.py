"""``kiln generate "prompt"``: one generation on this machine, with a progress bar over the steps
(or, with ``--server URL``, on a Kiln server: :mod:`kiln.cli.remote`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kiln.catalog import load_catalog
from kiln.errors import InvalidImage, InvalidParameters, ModelNotInstalled

EXTENSIONS = {".webp": "webp", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".mp4": "mp4"}


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate an image or a video on this machine (or on a server: --server)")
    p.add_argument("prompt", help="what to make")
    p.add_argument("--model", "-m", help="FAMILY/MODEL or FAMILY/ALIAS (default: the catalog's default model)")
    p.add_argument("--task", "-t", help="t2i, i2i, edit, t2v or i2v (default: t2i/t2v, or i2i/i2v with --image)")
    p.add_argument("--format", "-f", dest="fmt", help="output format name, e.g. 1024, 512, portrait, 480p")
    p.add_argument("--seed", type=int, help="0..4294967295 (default: random, printed)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance / cfg (default: the model's)")
    p.add_argument("--sampler", help="euler, euler_a, dpmpp_2m or heun")
    p.add_argument("--scheduler", help="simple, normal or sgm")
    p.add_argument("--strength", type=float, help="i2i/edit: 0..1, how much to change the image")
    p.add_argument("--negative-prompt", help="what to avoid (models that use one)")
    p.add_argument("--image", help="input image for i2i, edit, i2v (with --server also a URL)")
    p.add_argument("--mask", help="edit: white is regenerated, black is kept (with --server also a URL)")
    p.add_argument("--duration", type=float, help="video length in seconds")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a local .safetensors LoRA (with --server: its URL) and its weight (default 1.0); "
                        "repeat to stack")
    p.add_argument("--num-outputs", "-n", type=int, default=1, help="how many images (1-4)")
    p.add_argument("-o", "--output", type=Path, help="output file (.webp .png .jpg .mp4; default kiln-SEED.webp/.mp4)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--server", metavar="URL", help="generate on this Kiln server instead of this machine")
    p.add_argument("--api-key", metavar="KEY", help="the server's API key (default: KILN_API_KEY)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.server:
        from kiln.cli.remote import run_remote

        return run_remote(args)
    from kiln.engine import Engine, GenerationRequest, weights

    if not args.verbose:
        _quiet_libraries()
    catalog = load_catalog(args.catalog)
    spec = catalog.resolve_key(args.model or catalog.default_model)
    fmt_out = _output_format(args.output, spec.modality)
    if args.output is not None and not args.output.parent.is_dir():
        raise InvalidParameters(f"cannot write {args.output}: {args.output.parent} is not a directory")
    request = GenerationRequest.create(
        family=spec.family,
        model=spec.model,
        task=args.task or _default_task(spec.tasks, has_image=args.image is not None),
        format=args.fmt or spec.formats[0],
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        sampler=args.sampler,
        scheduler=args.scheduler,
        strength=args.strength,
        image=_read(args.image, "image"),
        mask=_read(args.mask, "mask"),
        num_outputs=args.num_outputs,
        duration=args.duration,
    )
    engine = Engine(catalog)
    engine.plan(request)  # every user error surfaces before anything is built or loaded
    store = None
    if args.lora:
        request, store = _with_loras(request, args.lora, spec, catalog)
    if not engine.installed(spec):
        if spec.toy:
            print(f"{spec.key}: building the toy checkpoint on first use (random weights) ...", file=sys.stderr)
            weights.pull(spec)
        elif spec.local_path is not None:
            raise ModelNotInstalled(f"{spec.key} is not installed: no checkpoint at {spec.local_path}")
    if spec.random_weights:
        print(f"note: {spec.key} has random weights; its pictures are noise", file=sys.stderr)

    bar = _ProgressBar(disabled=args.quiet)
    started = time.perf_counter()
    try:
        result = engine.generate(request, on_step=bar.update, loras=store)
    finally:
        bar.close()
    took = time.perf_counter() - started

    paths = _paths(args.output, result.seed, fmt_out, len(result.outputs))
    for output, path in zip(result.outputs, paths, strict=True):
        path.write_bytes(output.encode(fmt_out))
    size = f"{result.width}x{result.height}" + (f", {result.num_frames} frames at {result.fps} fps" if result.num_frames else "")
    print(f"seed {result.seed}  {result.model} {result.task} {size}  {result.steps} steps  {took:.2f}s")
    for path in paths:
        print(path)
    return 0


def _with_loras(request, specs: list[str], spec, catalog):
    """The request with the ``FILE[:WEIGHT]`` adapters, checked and held in a throwaway LoRA store."""
    import tempfile

    from kiln.engine.plan import check_lora_support
    from kiln.engine.request import LoraRef
    from kiln.loras import LoraStore

    check_lora_support(spec, catalog, field="--lora")
    store = LoraStore(Path(tempfile.mkdtemp(prefix="kiln-loras-")))
    refs = []
    for item in specs:
        name, sep, weight = item.rpartition(":")
        if not sep or not weight.replace(".", "", 1).isdigit():  # no weight given (a path may hold ':')
            name, weight = item, "1.0"
        path = Path(name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidParameters(f"--lora: cannot read {path}: {exc.strerror}") from exc
        sha = store.add_bytes(data, field=f"--lora {path}")
        refs.append(LoraRef.model_validate({"sha256": sha, "weight": float(weight), "source": str(path)}))
    return request.model_copy(update={"loras": tuple(refs)}), store


def _default_task(tasks: list[str], *, has_image: bool) -> str:
    """The model's first task that matches whether an input image was given."""
    from kiln.catalog import TASKS_NEEDING_IMAGE

    matching = [t for t in tasks if (t in TASKS_NEEDING_IMAGE) == has_image]
    return (matching or tasks)[0]


def _output_format(path: Path | None, modality: str) -> str:
    if path is None:
        return "mp4" if modality == "video" else "webp"
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None or (fmt == "mp4") != (modality == "video"):
        allowed = ".mp4" if modality == "video" else ".webp, .png, .jpg"
        raise InvalidParameters(f"cannot write {modality} to {path.name!r}; use {allowed}")
    return fmt


def _read(name: str | None, what: str) -> bytes | None:
    if name is None:
        return None
    path = Path(name)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidImage(f"cannot read the {what} file {path}: {exc.strerror}") from exc


def _paths(output: Path | None, seed: int, fmt: str, count: int) -> list[Path]:
    ext = {"jpeg": ".jpg"}.get(fmt, f".{fmt}")
    base = output or Path(f"kiln-{seed}{ext}")
    if count == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i + 1}{base.suffix}") for i in range(count)]


def _quiet_libraries() -> None:
    """diffusers and transformers log load-time advice meant for library users, not for kiln's."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


class _ProgressBar:
    def __init__(self, disabled: bool) -> None:
        self.disabled = disabled
        self.bar = None

    def update(self, event) -> None:
        if self.disabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.total, unit="step", file=sys.stderr, leave=False)
        self.bar.update(event.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
