"""What upscaling and detail add to a generation's latency, next to the render API reference's table.

Usage::

    python bench/controls.py            # ~2 min on 2 cores; writes bench/results/controls-<date>.{json,md}
    python bench/controls.py --quick    # 3 rounds, prints only (add --write to save)

Setup: the default catalog's ``flux/mini`` (the embedded model, the CPU default), ``t2i`` at
``--format`` (default ``512``), its default steps and guidance, a fixed prompt, through
``Engine.generate`` in process (what the worker calls; no encode, no HTTP). Arms: a plain generation,
``upscale`` 1.5 / 2 / 4, ``latent_upscale`` 1.5 / 2 and ``detail_enhance`` (``detail_strength``
0.5, the default). Every arm runs once untimed (load, warm-up), then ``--rounds`` rounds each run
every arm once in a shuffled order with the round's seed, so machine noise falls on all arms alike.

Reported per arm: output size, the steps its passes add (``Refinement.steps``), the median / min / max
latency, and the added latency two ways: ``median(arm) / median(plain) - 1`` and the median over
rounds of the paired ratio ``arm / plain - 1`` (the same round, the same seed). The reference
(``000_…``, "Detail Enhancement", "Performance Impact") states +20 % (1.5x), +40 % (2x), +150 % (4x)
and +15 % (detail enhance) for its hosted FLUX on GPUs; its numbers are printed beside ours.
Torch uses every core (the server's setting).
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import load_average, machine, write_results  # noqa: E402

MODEL = ("flux", "mini")
PROMPT = "a large red circle at the center on a blue background"
# (arm, request controls, the reference's stated latency increase or None where it states none)
ARMS: list[tuple[str, dict, float | None]] = [
    ("plain", {}, None),
    ("upscale 1.5", {"upscale": 1.5}, 0.20),
    ("upscale 2", {"upscale": 2}, 0.40),
    ("upscale 4", {"upscale": 4}, 1.50),
    ("latent_upscale 1.5", {"latent_upscale": 1.5}, None),
    ("latent_upscale 2", {"latent_upscale": 2}, None),
    ("detail_enhance", {"detail_enhance": True}, 0.15),
]


def make_request(fmt: str, seed: int, controls: dict, steps: int | None):
    from kiln.engine import GenerationRequest

    return GenerationRequest.create(family=MODEL[0], model=MODEL[1], task="t2i", format=fmt, prompt=PROMPT,
                                    seed=seed, steps=steps, **controls)


def measure(engine, fmt: str, rounds: int, steps: int | None, seed: int) -> dict[str, list[float]]:
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name, _, _ in ARMS}
    for _, controls, _ in ARMS:  # warm-up: load, first-call costs at every size
        engine.generate(make_request(fmt, seed, controls, steps))
    for r in range(rounds):
        order = list(ARMS)
        rng.shuffle(order)
        for name, controls, _ in order:
            request = make_request(fmt, seed + 1 + r, controls, steps)
            started = time.perf_counter()
            engine.generate(request)
            times[name].append((time.perf_counter() - started) * 1e3)
    return times


def vae_costs(engine, sizes: list[str], reps: int = 3) -> dict[str, dict[str, float]]:
    """Median ms of one VAE decode and one encode at each output size ("WxH"): what a pass pays besides its steps."""
    import torch

    pipe = engine.load(engine.catalog.resolve(*MODEL)).pipelines["i2i"]
    vae, scale = pipe.vae, pipe.vae_scale_factor
    out = {}
    for size in sizes:
        w, h = (int(v) for v in size.split("x"))
        latents = torch.randn(1, pipe.latent_channels, -(-h // scale), -(-w // scale))
        image = torch.rand(1, 3, latents.shape[2] * scale, latents.shape[3] * scale) * 2 - 1
        decode, encode = [], []
        with torch.inference_mode():
            for _ in range(reps):
                t = time.perf_counter()
                vae.decode(latents)
                decode.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                vae.encode(image)
                encode.append((time.perf_counter() - t) * 1e3)
        out[size] = {"decode_ms": round(statistics.median(decode), 1), "encode_ms": round(statistics.median(encode), 1)}
    return out


def summarise(engine, fmt: str, times: dict[str, list[float]], steps: int | None) -> list[dict]:
    plain = times["plain"]
    plain_median = statistics.median(plain)
    rows = []
    for name, controls, reference in ARMS:
        plan = engine.plan(make_request(fmt, 0, controls, steps))
        ts = times[name]
        rows.append({
            "arm": name, "controls": controls, "output": "x".join(map(str, plan.output_size)),
            "steps": plan.steps, "extra_steps": plan.refinement.steps(plan.steps, 1) if plan.refinement else 0,
            "passes": [{"kind": p.kind, "size": [p.width, p.height], "generated": [p.gen_width, p.gen_height],
                        "strength": p.strength, "sharpen": p.sharpen} for p in plan.refinement.passes]
            if plan.refinement else [],
            "median_ms": round(statistics.median(ts), 1), "min_ms": round(min(ts), 1), "max_ms": round(max(ts), 1),
            "added": statistics.median(ts) / plain_median - 1,
            "added_paired": statistics.median(t / p - 1 for t, p in zip(ts, plain, strict=True)),
            "reference_added": reference, "runs_ms": [round(t, 2) for t in ts],
        })
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0%}"


def render_md(res: dict) -> str:
    m, pk = res["machine"], res["machine"]["packages"]
    lines = [
        f"# Upscaling and detail latency {res['date']}{' (quick)' if res['quick'] else ''}", "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} cores, torch {pk.get('torch')}, diffusers {pk.get('diffusers')}; "
        f"load average at start {m.get('load_average_start')}, at end {m.get('load_average')}.", "",
        f"Command: `python bench/controls.py{' --quick' if res['quick'] else ''}`: `{res['model']}` t2i at "
        f"{res['format']}, {res['steps']} steps, guidance {res['guidance']}, `Engine.generate` in process, "
        f"{res['rounds']} rounds of every arm in shuffled order after a warm-up.", "",
        "| operation | output | steps added | median ms | min | max | added (medians) | added (paired) | reference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        added = "-" if r["arm"] == "plain" else _pct(r["added"])
        paired = "-" if r["arm"] == "plain" else _pct(r["added_paired"])
        lines.append(f"| {r['arm']} | {r['output']} | {r['extra_steps']} | {r['median_ms']} | {r['min_ms']} | "
                     f"{r['max_ms']} | {added} | {paired} | {_pct(r['reference_added'])} |")
    lines += ["", "Passes (kiln/engine/refinement.py): upscale = the base decoded, Lanczos resize, VAE encode, "
              "img2img from strength 0.3, decode at the new size; latent_upscale = the base's latents "
              "enlarged (bicubic), img2img from strength 0.55, one decode at the new size; detail = img2img "
              "from the base's latents (FLUX.1: no extra VAE work) at 0.1 + 0.3 x detail_strength, then an "
              "unsharp mask. A pass runs `n - int(n - n x strength)` of the model's n steps, each with its "
              "prompt encoded again.", "",
              "One VAE call of the model, by output size (median ms; flux/mini's decoder is most of a plain "
              "512 generation):", "", "| size | decode | encode |", "|---|---:|---:|"]
    for size, c in res["vae_ms"].items():
        lines.append(f"| {size} | {c['decode_ms']} | {c['encode_ms']} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", default="512", help="catalog format of the base generation (default 512)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds of every arm (default 9; 3 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--quick", action="store_true", help="3 rounds unless --rounds says otherwise; prints only")
    ap.add_argument("--write", action="store_true", help="write results even with --quick")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 9

    from kiln.catalog import load_catalog
    from kiln.engine import Engine

    load_start = load_average()
    engine = Engine(load_catalog())
    spec = engine.catalog.resolve(*MODEL)
    started = time.perf_counter()
    times = measure(engine, args.format, args.rounds, args.steps, args.seed)
    res = {
        "date": dt.date.today().strftime("%Y%m%d"), "quick": args.quick, "model": spec.key, "format": args.format,
        "steps": args.steps or spec.steps.default, "guidance": spec.guidance.value, "rounds": args.rounds,
        "seed": args.seed, "wall_s": round(time.perf_counter() - started, 1),
        "rows": summarise(engine, args.format, times, args.steps),
    }
    res["vae_ms"] = vae_costs(engine, sorted({r["output"] for r in res["rows"]}, key=lambda s: int(s.split("x")[0])))
    res["machine"] = machine(extra={"load_average_start": load_start, "bench_args": vars(args),
                                    "device": str(engine.device)},
                             packages=("torch", "diffusers", "transformers", "numpy", "pillow"))
    md = render_md(res)
    print(md)
    if not args.quick or args.write:
        write_results(f"controls-{res['date']}" + ("-quick" if args.quick else ""), res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
