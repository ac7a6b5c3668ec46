"""Kiln against plain diffusers on one GPU: FLUX.1-schnell, FLUX.1-dev and Z-Image-Turbo side by side.

Usage::

    python bench/gpu.py --models schnell,dev,zimage --runs 10     # a CUDA machine (bench/gpu.sh: offline)
    python bench/gpu.py --models schnell --precision native,fp8    # fp8 too (needs torchao, compute capability 8.9+)
    python bench/gpu.py --toy                                       # the same code path at toy size on a CPU, < 1 min
    python bench/gpu.py --models mini --arms batch --batch 1,2,4 --format 512   # batching on the shipped flux/mini

Per model, in one run (issue 8: "Speed on one GPU"):

1. Build the pipeline at its published full size with random weights (``bench/_architectures.py``
   cites the configurations; for a lossless optimisation the work is the same whatever the weights)
   and save it as a diffusers checkpoint in a temporary folder (``--workdir``; FLUX.1 takes ~34 GB);
   a catalog naming that folder lets Kiln load it through its normal path.
2. ``eager``: plain diffusers, ``from_pretrained`` in bf16 on the GPU, called as Kiln calls it (the
   same prompt arguments, steps, guidance and sequence length, from Kiln's own planner), no switch
   touched. Warm-up, then ``--runs`` timed calls. The transformer's FLOPs are counted on the first
   warm-up call (``torch.utils.flop_counter``), which gives the floor: FLOPs / the card's dense peak.
3. ``engine``: Kiln's engine with its optimisations (the catalog's defaults, ``--optimize`` on
   top): load, optimise, ``Engine.warm_up`` at ``--format`` (compiling is timed there, not in the
   runs), then ``Engine.generate`` + the WebP encode the server does, ``--runs`` times with a new
   prompt each (the text cache misses), plus a few runs repeating one prompt (it hits).
4. ``http``: the same engine behind Kiln's HTTP API in this process (``build_app`` + uvicorn on
   127.0.0.1), a sync ``POST /image/{family}/{model}/t2i?format=...``, request to bytes; the
   server's ``Server-Timing`` splits each request into generate, encode and store, and the rest is
   HTTP.
5. ``batch`` (with ``--batch``): images per second through ``Engine.generate_batch`` at each batch
   size against batch 1 (issue 8: keep batching only where it wins).

Every arm's calls get the per-stage breakdown (``bench/_gpu_measure.py``: text encoding, denoising,
VAE decode, postprocess, and for the engine the encode and the rest). One extra call per arm runs
with CUDA's sync debug mode on inside the denoising loop: the host synchronisations it reports
should be none. Equivalence: for ``--check-seeds`` seeds, the optimized pipeline's final latents
(called like the eager one, ``output_type="latent"``) against eager's, relative error
``||a - b|| / ||b||`` within the precision's tolerance (``TOLERANCE``; fp8 is lossy by design).
Times are medians with p10-p90 and min-max; the table is printed and the raw results, with the
machine (GPU, driver, CUDA, torch), go to ``bench/results/gpu-<date>[-toy|-cpu].{json,md}``.

Goals (issue 8, through HTTP, 1024², batch 1): schnell 4 steps <= 0.45 s and >= 2.5x eager; dev 28
steps <= 2.8 s and >= 2.3x; Z-Image-Turbo 8 steps <= 0.6 s and >= 1.8x. The table says whether each is
met; in ``--toy`` mode (a CPU, toy sizes) they do not apply and are not judged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from _architectures import CATALOG_KEY, MODELS, build  # noqa: E402
from _gpu_measure import STAGES, FlopCount, StageClock, gpu_info, peak_tflops, relative_error  # noqa: E402
from _machine import machine, write_results  # noqa: E402

PROMPT = "a lighthouse on a rocky coast at dusk, waves breaking below, warm light in its windows, film photograph"
GOALS = {"schnell": (450.0, 2.5), "dev": (2800.0, 2.3), "zimage": (600.0, 1.8)}  # ms through HTTP, x eager
# Relative error of the final latents against eager that still counts as "the same function": float32
# differs in the last places, bf16 kernels (fused projections, other attention kernels, compiled
# graphs) in the last of its ~3 significant digits, which steps of a random-weight model can grow;
# fp8 quantizes every matmul.
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2, "fp8": 2e-1}
TITLES = {"schnell": "FLUX.1-schnell", "dev": "FLUX.1-dev", "zimage": "Z-Image-Turbo", "mini": "The embedded model"}
ARMS = ("eager", "engine", "http", "batch")
TOY_FORMAT = "toy-64"  # added to the catalog in --toy mode: 64x64


# --- setup -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: schnell, dev, zimage, mini")
    p.add_argument("--toy", action="store_true", help="toy-size models on the CPU: the same code path in seconds")
    p.add_argument("--runs", type=int, help="timed runs per arm (default 10; --toy 2)")
    p.add_argument("--warmup", type=int, help="untimed runs per arm before them (default 2; --toy 1)")
    p.add_argument("--format", help=f"catalog format (default 1024; --toy {TOY_FORMAT})")
    p.add_argument("--arms", default="eager,engine,http", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--batch", help="batch sizes for the batch arm, e.g. 1,2,4 (adds the arm)")
    p.add_argument("--precision", default="native", help="engine precisions: native and/or fp8")
    p.add_argument("--optimize", default="", help="engine switches over the catalog's, as KILN_OPTIMIZE: compile=whole,...")
    p.add_argument("--check-seeds", type=int, help="seeds compared with eager's latents (default 2; --toy 1)")
    p.add_argument("--compile-cache", type=Path, help="torch.compile's cache (default: in --workdir, so cold)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="where checkpoints are built")
    p.add_argument("--peak-tflops", help="dense peak BF16[,FP8] TFLOP/s for the floor, for a card not in the table")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; --toy 1, as bench/overhead.py: "
                                               "on a shared 2-core VM two OpenMP threads stall whenever a core is taken)")
    p.add_argument("--floor", action="store_true", help="print only each model's FLOPs and its floor on the cards of "
                                                          "the table (counted on the meta device: no GPU, no weights)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in (*MODELS, "mini")]
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join((*MODELS, 'mini'))}")
    args.arms = {a.strip() for a in args.arms.split(",") if a.strip()}
    if args.batch:
        args.arms.add("batch")
        args.batch = [int(b) for b in args.batch.split(",")]
    elif "batch" in args.arms:
        args.batch = [1, 2, 4]
    if args.arms - set(ARMS):
        p.error(f"unknown arms {sorted(args.arms - set(ARMS))}")
    args.precision = [x.strip() for x in args.precision.split(",") if x.strip()]
    args.runs = args.runs or (2 if args.toy else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.toy else 2)
    args.check_seeds = args.check_seeds if args.check_seeds is not None else (1 if args.toy else 2)
    args.format = args.format or (TOY_FORMAT if args.toy else "1024")
    args.threads = args.threads or (1 if args.toy else None)
    from kiln.settings import Settings

    args.optimize = Settings.model_validate({"optimize": args.optimize}).optimize if args.optimize else None
    return args


def bench_catalog(name: str, path: Path, dtype: str, toy: bool) -> Any:
    """The default catalog's entry for ``name`` alone, its source the built checkpoint (with a 64x64
    format at toy size, where a second per call is all a CPU should spend)."""
    from kiln.catalog import DEFAULT_CATALOG, parse_catalog

    raw = tomllib.loads(DEFAULT_CATALOG.read_text(encoding="utf-8"))
    key = CATALOG_KEY[name]
    entry = dict(next(e for e in raw["models"] if f"{e['family']}/{e['model']}" == key))
    entry.update(source=str(path), dtype=dtype)
    if toy:
        raw["formats"]["image"][TOY_FORMAT] = [64, 64]
        entry["formats"] = [*entry["formats"], TOY_FORMAT]
    entry.pop("toy", None)
    if name != "mini":
        entry["random_weights"] = True
    # This model alone: the in-process server's worker preloads the catalog's default model.
    raw.update(models=[entry], default_model=key, dialects={},
               aliases={a: t for a, t in raw.get("aliases", {}).items() if t == key})
    return parse_catalog(raw, base_dir=path.parent)


def pipeline_kwargs(engine: Any, spec: Any, fmt: str, prompt: str, seed: int, precision: str = "native") -> dict[str, Any]:
    """What Kiln's engine passes the pipeline for this request (its planner and adapter decide)."""
    from kiln.engine import GenerationRequest
    from kiln.engine.families import adapter_for

    request = GenerationRequest.create(family=spec.family, model=spec.model, task="t2i", format=fmt, prompt=prompt,
                                       seed=seed, precision=precision)
    plan = engine.plan(request)
    kwargs = adapter_for(spec).call_kwargs(plan, None)
    kwargs.update(num_inference_steps=plan.steps, guidance_scale=plan.guidance,
                  generator=torch.Generator("cpu").manual_seed(seed))
    return kwargs


def stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {"median": statistics.median(ordered), "p10": pct(0.1), "p90": pct(0.9), "min": ordered[0],
            "max": ordered[-1], "n": len(ordered)}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_call(device: torch.device, call: Any) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - started) * 1000


# --- the arms ---------------------------------------------------------------------------------------


def eager_arm(spec: Any, path: Path, planner: Any, args: argparse.Namespace, device: torch.device,
              dtype: torch.dtype, prompts: list[str]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    import diffusers

    started = time.perf_counter()
    pipe = getattr(diffusers, spec.pipelines["t2i"]).from_pretrained(path, torch_dtype=dtype)
    if device.type != "cpu":
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - started
    clock = StageClock(pipe, device)

    def call(prompt: str, seed: int, **extra: Any) -> Any:
        return pipe(**pipeline_kwargs(planner, spec, args.format, prompt, seed), **extra)

    try:
        flops = FlopCount(pipe.transformer)
        try:
            call(PROMPT, 0)
        finally:
            flops.remove()
        for i in range(1, args.warmup):
            call(prompts[i % len(prompts)], i)
        runs = []
        for i in range(args.runs):
            clock.start()
            _, total = timed_call(device, lambda i=i: call(prompts[i], i))
            runs.append({"total_ms": total, "stages": clock.stop()})
        references = [call(PROMPT, 1000 + s, output_type="latent").images.float().cpu() for s in range(args.check_seeds)]
        syncs = clock.count_loop_syncs(lambda: call(PROMPT, 7))
    finally:
        clock.remove()
    del pipe
    free(device)
    result = {"load_s": load_s, "runs": runs, "flops_per_image": flops.total, "transformer_calls": len(flops.per_call),
              "loop_syncs": syncs}
    return result, references


def engine_arm(engine: Any, spec: Any, args: argparse.Namespace, device: torch.device, precision: str,
               prompts: list[str], references: list[torch.Tensor]) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from kiln.engine import GenerationRequest
    from kiln.engine.encode import encode_image

    started = time.perf_counter()
    loaded = engine.load(spec)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    engine.warm_up(spec, formats=[args.format], precisions=[precision])
    warm_s = time.perf_counter() - started
    pipe = loaded.pipelines_for(precision)["t2i"]
    clock = StageClock(pipe, device)

    def request(prompt: str, seed: int) -> Any:
        return GenerationRequest.create(family=spec.family, model=spec.model, task="t2i", format=args.format,
                                        prompt=prompt, seed=seed, precision=precision)

    def one(prompt: str, seed: int) -> dict[str, Any]:
        clock.start()
        result, total = timed_call(device, lambda: engine.generate(request(prompt, seed)))
        stages = clock.stop()
        _, encode = timed_call(torch.device("cpu"), lambda: encode_image(result.outputs[0].image, "webp"))
        other = total - sum(stages.values())
        return {"total_ms": total + encode, "generate_ms": total, "stages": {**stages, "other": other, "encode": encode}}

    try:
        for i in range(args.warmup):
            engine.generate(request(f"{PROMPT}, warm-up {i}", 500 + i))
        runs = [one(prompts[i], i) for i in range(args.runs)]
        engine.generate(request(PROMPT, 99))  # the repeated prompt below is then in the text cache
        cached = [one(PROMPT, 100 + i) for i in range(min(3, args.runs))]
        syncs = clock.count_loop_syncs(lambda: engine.generate(request(PROMPT, 7)))
        errors = []
        with loaded.lock:
            for s, reference in enumerate(references):
                pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(loaded.scheduler_config)
                kwargs = pipeline_kwargs(engine, spec, args.format, PROMPT, 1000 + s, precision)
                with torch.inference_mode():
                    latents = pipe(**kwargs, output_type="latent").images
                errors.append(relative_error(latents, reference))
    finally:
        clock.remove()
    return {
        "load_s": load_s, "warm_up_s": warm_s, "runs": runs, "cached_prompt_runs": cached, "loop_syncs": syncs,
        "latent_rel_errors": errors, "optimizations": loaded.report.as_dict(),
    }


def http_arm(engine: Any, spec: Any, args: argparse.Namespace, workdir: Path, prompts: list[str]) -> dict[str, Any]:
    import uvicorn

    from kiln.server import build_app
    from kiln.settings import Settings

    settings = Settings(data_dir=workdir / "data", auth=False, warmup=False)
    app = build_app(settings, engine=engine)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="bench-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the in-process Kiln server did not start")
        time.sleep(0.05)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    path = f"/image/{spec.family}/{spec.model}/t2i?format={args.format}"

    def post(prompt: str, seed: int) -> dict[str, Any]:
        body = json.dumps({"prompt": prompt, "seed": seed})
        started = time.perf_counter()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        latency = (time.perf_counter() - started) * 1000
        if response.status != 200 or not data:
            raise RuntimeError(f"POST {path}: {response.status} {data[:300]!r}")
        timing = {}
        for part in (response.getheader("Server-Timing") or "").split(","):
            name, _, dur = part.strip().partition(";dur=")
            if dur:
                timing[name] = float(dur)
        server_ms = sum(timing.get(k, 0.0) for k in ("generate", "encode", "store"))
        return {"total_ms": latency, "stages": {**{f"server_{k}": v for k, v in timing.items()},
                                                "http": latency - server_ms}, "bytes": len(data)}

    try:
        for i in range(args.warmup):
            post(f"{PROMPT}, http warm-up {i}", 600 + i)
        runs = [post(prompts[i], 200 + i) for i in range(args.runs)]
    finally:
        conn.close()
        server.should_exit = True
        thread.join(timeout=60)
    return {"runs": runs}


def batch_arm(engine: Any, spec: Any, args: argparse.Namespace, device: torch.device, precision: str) -> dict[str, Any]:
    from kiln.engine import BatchItem, GenerationRequest

    times: dict[int, list[float]] = {size: [] for size in args.batch}
    for size in args.batch:
        engine.warm_up(spec, formats=[args.format], precisions=[precision], batch_sizes=[size])
    order = random.Random(0)
    for r in range(args.runs):  # rounds, each size once in a shuffled order: drifting load hits all alike
        sizes = list(args.batch)
        order.shuffle(sizes)
        for size in sizes:
            items = [BatchItem(GenerationRequest.create(
                family=spec.family, model=spec.model, task="t2i", format=args.format,
                prompt=f"{PROMPT}, batch {size} run {r} item {j}", seed=10_000 + r * 100 + j, precision=precision,
            )) for j in range(size)]
            outcomes, ms = timed_call(device, lambda items=items: engine.generate_batch(items))
            failed = [o for o in outcomes if isinstance(o, BaseException)]
            if failed:
                raise failed[0]
            times[size].append(ms)
    rows = {size: {"ms": ms, "images_per_s": size / (statistics.median(ms) / 1000)} for size, ms in times.items()}
    base = rows[min(rows)]["images_per_s"]
    for row in rows.values():
        row["vs_smallest"] = row["images_per_s"] / base
    return rows


# --- one model ---------------------------------------------------------------------------------------


def bench_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from kiln.catalog import DEFAULT_CATALOG
    from kiln.engine import Engine

    workdir = Path(tempfile.mkdtemp(prefix=f"kiln-gpu-{name}-", dir=args.workdir))
    dtype_name = str(dtype).removeprefix("torch.")
    out: dict[str, Any] = {"title": TITLES[name], "key": CATALOG_KEY[name], "format": args.format}
    try:
        started = time.perf_counter()
        if name == "mini":
            path = (DEFAULT_CATALOG.parent / "../weights/flux-mini").resolve()
        else:
            path = build(name, workdir / "checkpoints", toy=args.toy, device=device, dtype=dtype)
        out["build_s"] = time.perf_counter() - started
        catalog = bench_catalog(name, path, dtype_name, args.toy)
        spec = catalog.models[CATALOG_KEY[name]]
        width, height = catalog.size_of(spec, args.format)
        out.update(size=[width, height], steps=spec.steps.default, dtype=dtype_name)
        prompts = [f"{PROMPT}, variation {i}" for i in range(args.runs)]
        engine = Engine(catalog, device=str(device), optimize=args.optimize,
                        compile_cache_dir=args.compile_cache or workdir / "compile-cache")
        references: list[torch.Tensor] = []
        if "eager" in args.arms:
            out["eager"], references = eager_arm(spec, path, engine, args, device, dtype, prompts)
        for precision in args.precision:
            arm: dict[str, Any] = {}
            if "engine" in args.arms:
                arm["engine"] = engine_arm(engine, spec, args, device, precision, prompts, references)
                arm["tolerance"] = TOLERANCE["fp8" if precision == "fp8" else dtype_name]
            if "http" in args.arms and precision == "native":  # the render API's body names no precision yet
                arm["http"] = http_arm(engine, spec, args, workdir, prompts)
            if "batch" in args.arms:
                arm["batch"] = batch_arm(engine, spec, args, device, precision)
            out[precision] = arm
        engine.unload(spec.key)
        del engine
        free(device)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# --- the report -------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.0f}" if value >= 100 else f"{value:.1f}")


def _stage(runs: list[dict[str, Any]], stage: str) -> str:
    values = [r["stages"][stage] for r in runs if stage in r["stages"]]
    return _ms(statistics.median(values)) if values else "-"


def summarise(results: dict[str, Any], toy: bool, peaks: tuple[float | None, float | None]) -> str:
    lines = []
    for name, m in results["models"].items():
        w, h = m["size"]
        lines += [f"## {m['title']} ({m['key']}), {m['format']} ({w}x{h}), {m['steps']} steps", ""]
        eager = m.get("eager")
        flops = eager["flops_per_image"] if eager else None
        floors = {}
        if flops:
            floors = {p: flops / (peak * 1e12) * 1000 for p, peak in (("native", peaks[0]), ("fp8", peaks[1])) if peak}
            lines.append(f"Transformer: {flops / max(1, eager['transformer_calls']):.3g} FLOP per call x "
                         f"{eager['transformer_calls']} calls = {flops:.3g} FLOP per image; floor "
                         + (", ".join(f"{_ms(v)} ms ({p})" for p, v in floors.items()) or "unknown (no peak for this device)")
                         + ".")
            lines.append("")
        if eager or any(k in m.get(p, {}) for p in ("native", "fp8") for k in ("engine", "http")):
            lines += ["Batch 1, ms per request:", "",
                      "| arm | precision | median ms | p10-p90 | min-max | text | denoise | decode | post | other "
                      "| encode | http | vs eager | latents rel. error (tolerance) |",
                      "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        eager_median = stats([r["total_ms"] for r in eager["runs"]])["median"] if eager else None

        def row(label: str, precision: str, runs: list[dict[str, Any]], errors: str = "") -> None:
            s = stats([r["total_ms"] for r in runs])
            ratio = f"{eager_median / s['median']:.2f}x" if eager_median else "-"
            lines.append(
                f"| {label} | {precision} | {_ms(s['median'])} | {_ms(s['p10'])}-{_ms(s['p90'])} | "
                f"{_ms(s['min'])}-{_ms(s['max'])} | " + " | ".join(_stage(runs, st) for st in (*STAGES, "other", "encode", "http"))
                + f" | {ratio} | {errors} |"
            )

        if eager:
            row("diffusers eager", m["dtype"], eager["runs"])
        for precision in ("native", "fp8"):
            arm = m.get(precision, {})
            if "engine" in arm:
                e = arm["engine"]
                errors = ", ".join(f"{x:.2e}" for x in e["latent_rel_errors"])
                ok = all(x <= arm["tolerance"] for x in e["latent_rel_errors"])
                verdict = f"{errors} ({arm['tolerance']:g}: {'ok' if ok else 'EXCEEDED'})" if errors else "-"
                row("kiln engine + encode", precision, e["runs"], verdict)
                row("kiln engine, repeated prompt", precision, e["cached_prompt_runs"])
            if "http" in arm:
                http_runs = arm["http"]["runs"]
                for r in http_runs:
                    r["stages"].setdefault("encode", r["stages"].get("server_encode", 0.0))
                row("kiln over HTTP", precision, http_runs)
        if lines[-1] != "":
            lines.append("")
        for precision in ("native", "fp8"):
            e = m.get(precision, {}).get("engine")
            if e:
                applied = [f"{k} ({v['detail']})" if v["detail"] else k for k, v in e["optimizations"].items()
                           if v["status"] == "applied"]
                lines.append(f"- kiln {precision}: load {e['load_s']:.1f} s, warm-up (compiling) {e['warm_up_s']:.1f} s; "
                             f"applied: {'; '.join(applied) or 'none'}; host syncs in the denoising loop: "
                             f"{len(e['loop_syncs'])}")
        if eager:
            lines.append(f"- eager: load {eager['load_s']:.1f} s; host syncs in the denoising loop: {len(eager['loop_syncs'])}")
        if lines[-1] != "":
            lines.append("")
        http_arm_ = m.get("native", {}).get("http")
        if name in GOALS and http_arm_ and not toy:
            goal_ms, goal_x = GOALS[name]
            got = stats([r["total_ms"] for r in http_arm_["runs"]])["median"]
            speed = eager_median / got if eager_median else None
            met = got <= goal_ms and speed is not None and speed >= goal_x
            lines.append(f"- goal (HTTP, batch 1): <= {goal_ms:.0f} ms and >= {goal_x}x eager; measured {_ms(got)} ms, "
                         f"{speed:.2f}x: {'met' if met else 'not met'}" if speed else f"- goal: {goal_ms:.0f} ms; measured {_ms(got)} ms")
        for precision in ("native", "fp8"):
            batch = m.get(precision, {}).get("batch")
            if batch:
                lines += [f"Batching ({precision}, Engine.generate_batch; one call makes `batch` images):", "",
                          "| batch | median ms per call | images/s | vs smallest |", "| ---: | ---: | ---: | ---: |"]
                for size, b in batch.items():
                    lines.append(f"| {size} | {_ms(statistics.median(b['ms']))} | {b['images_per_s']:.2f} | "
                                 f"{b['vs_smallest']:.2f}x |")
                lines.append("")
    return "\n".join(lines)


def floors(args: argparse.Namespace) -> str:
    """The compute floor of each full-size model: the transformer's FLOPs per image over each card's peak."""
    from kiln.catalog import load_catalog

    from _architectures import caption_tokens, transformer_flops
    from _gpu_measure import PEAKS

    catalog = load_catalog()
    fmt = args.format if args.format != TOY_FORMAT else "1024"
    cards = [(card, bf16, fp8) for card, bf16, fp8 in PEAKS]
    lines = [f"Transformer FLOPs per image at {fmt} and the floor they set (FLOPs / dense tensor-core peak, "
             "datasheet numbers; the text encoders and the VAE come on top)", "",
             "| model | steps | text tokens | FLOP per call | FLOP per image | "
             + " | ".join(f"{card} bf16 / fp8 ms" for card, _, _ in cards) + " |",
             "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in cards) + " |"]
    for name in (m for m in args.models if m in MODELS):
        spec = catalog.models[CATALOG_KEY[name]]
        width, height = catalog.size_of(spec, fmt)
        # FLUX pads its T5 prompt to max_sequence_length (the pipeline's default 512); Z-Image does not pad
        text = caption_tokens(PROMPT) if name == "zimage" else spec.max_sequence_length or 512
        per_call = transformer_flops(name, width, height, text)
        per_image = per_call * spec.steps.default
        cells = [f"{per_image / (bf16 * 1e12) * 1000:.0f} / " + (f"{per_image / (fp8 * 1e12) * 1000:.0f}" if fp8 else "-")
                 for _, bf16, fp8 in cards]
        lines.append(f"| {TITLES[name]} | {spec.steps.default} | {text} | {per_call:.3g} | {per_image:.3g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.floor:
        print(floors(args))
        return {}
    cuda = torch.cuda.is_available() and not args.toy
    if not args.toy and not cuda and any(m in MODELS for m in args.models):
        raise SystemExit("no CUDA device: the full-size models need a GPU; --toy runs the same code path on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cuda else torch.float32
    peaks = (None, None)
    if args.peak_tflops:
        values = [float(v) for v in args.peak_tflops.split(",")]
        peaks = (values[0], values[1] if len(values) > 1 else None)
    elif cuda:
        peaks = peak_tflops(torch.cuda.get_device_name(0))
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "bench": "gpu", "toy": args.toy, "device": str(device),
        "args": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else
                     v.model_dump(exclude_none=True) if hasattr(v, "model_dump") else v) for k, v in vars(args).items()},
        "peak_tflops": {"bf16": peaks[0], "fp8": peaks[1]},
        "machine": machine(extra={"gpu": gpu_info()}, packages=("torch", "diffusers", "transformers", "torchao", "numpy")),
        "models": {},
    }
    for name in args.models:
        print(f"[gpu bench] {name} ...", file=sys.stderr, flush=True)
        results["models"][name] = bench_model(name, args, device, dtype)
    gpu = results["machine"]["gpu"]
    where = f"{gpu['name']}, driver {gpu['driver']}, torch {gpu['torch']}" if gpu else f"CPU ({results['machine']['cpu_model']})"
    header = f"# bench/gpu.py, {dt.date.today().isoformat()}: {where}" + (" (toy sizes: timings are not GPU numbers)" if args.toy else "")
    md = header + "\n\n" + summarise(results, args.toy, peaks)
    print(md)
    if not args.no_write:
        tag = "-toy" if args.toy else ("" if cuda else "-cpu")
        write_results(f"gpu-{dt.date.today().strftime('%Y%m%d')}{tag}", results, md)
    return results


if __name__ == "__main__":
    main()
