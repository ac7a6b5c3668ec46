"""Does the embedded model follow prompts it never saw? And how fast is it on this CPU?

Usage::

    python bench/mini_quality.py            # ~2 min on 2 cores; writes bench/results/mini-quality-<date>.{json,md}
    python bench/mini_quality.py --quick    # 60 held-out prompts, prints only

Quality: ``--n`` (default 240) scenes that each contain an attribute combination training never
showed (``kiln.training.world.HELD_OUT_SHAPES`` / ``HELD_OUT_ON``: a purple triangle, a red shape on
yellow, ...), one group of one to three shapes, asked with their canonical prompt
(``world.prompt``: "two small green squares at the top left on a white background"), generated
through the engine exactly as the server does (``Engine.generate``, catalog model ``flux/mini``,
512x512, its default steps, seed = index), and read back by ``world.classify`` (border colour,
dominant other colour, connected regions, where that colour stands). Targets: background right
>= 90 %, shape colour right >= 80 %; the count is reported too, and the position (of the prompts that
name one: the read centre within 0.15 of the image of the shapes' own, ``world.at_position``), and the
shape (the largest region of that colour, ``world.read_shape``). A control set of in-distribution
prompts (combinations training
did show) is scored the same way, and the checker is scored on the ground-truth renders of the
held-out scenes (it must be ~100 %, or the numbers above mean nothing).

Speed: ``Engine.generate`` at 512x512 and 1024x1024, the model's default steps, median of
``--speed-runs`` after one warm-up, torch on every core (the server's setting).
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import load_average, machine, write_results  # noqa: E402

MODEL = ("flux", "mini")
TARGETS = {"background": 0.90, "colour": 0.80}


def scenes(n: int, seed: int, held_out: bool):
    from kiln.training import world

    rng = random.Random(seed)
    return [world.sample_scene(rng, held_out=held_out, two_groups=0.0) for _ in range(n)]


def score(scene, reading) -> dict:
    from kiln.training import world

    group = scene.groups[0]
    return {
        "background": reading.background == scene.background,
        "colour": reading.colour == group.colour,
        "count": reading.count == group.count,
        "shape": reading.shape == group.shape,
        "position": world.at_position(scene, reading),  # None: the prompt names no position
    }


def held_out_kind(scene) -> str:
    from kiln.training import world

    g = scene.groups[0]
    kinds = []
    if (g.colour, g.shape) in world.HELD_OUT_SHAPES:
        kinds.append("colour+shape")
    if (g.colour, scene.background) in world.HELD_OUT_ON:
        kinds.append("colour-on-background")
    return " & ".join(kinds) or "none"


def run_set(engine, items, steps: int | None, size: str, guidance: float | None = None) -> list[dict]:
    from kiln.engine import GenerationRequest
    from kiln.training import world

    rows = []
    for i, scene in enumerate(items):
        request = GenerationRequest.create(family=MODEL[0], model=MODEL[1], task="t2i", format=size,
                                           prompt=world.prompt(scene), steps=steps, guidance=guidance, seed=i)
        result = engine.generate(request)
        reading = world.classify(result.outputs[0].image)
        truth = world.classify(world.render(scene, result.width, result.height))
        rows.append({
            "prompt": world.prompt(scene), "seed": i, "held_out": held_out_kind(scene),
            "expected": {"background": scene.background, "colour": scene.groups[0].colour,
                         "count": scene.groups[0].count, "shape": scene.groups[0].shape},
            "read": {"background": reading.background, "colour": reading.colour, "count": reading.count,
                     "colours": list(reading.colours), "centre": reading.centre, "shape": reading.shape},
            "ok": score(scene, reading), "checker_on_truth": score(scene, truth),
        })
    return rows


def rates(rows: list[dict], key: str = "ok") -> dict[str, float]:
    n = max(1, len(rows))
    out = {k: sum(r[key][k] for r in rows) / n for k in ("background", "colour", "count", "shape")}
    placed = [r[key]["position"] for r in rows if r[key].get("position") is not None]
    out["position"] = sum(placed) / max(1, len(placed))  # of the prompts that name a position
    return out


def speed(engine, runs: int, steps: int | None = None, guidance: float | None = None) -> dict:
    """Median time per picture at 512 and 1024, with the run's steps and guidance (None: the model's)."""
    from kiln.engine import GenerationRequest

    out = {}
    for fmt in ("512", "1024"):
        times = []
        for i in range(runs + 1):
            req = GenerationRequest.create(family=MODEL[0], model=MODEL[1], task="t2i", format=fmt,
                                           prompt="a yellow star at the center on a blue background", seed=i,
                                           steps=steps, guidance=guidance)
            t = time.perf_counter()
            engine.generate(req)
            if i:  # the first is a warm-up
                times.append((time.perf_counter() - t) * 1e3)
        out[fmt] = {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
                    "max_ms": round(max(times), 1), "runs": times}
    return out


def render_md(res: dict) -> str:
    m, pk = res["machine"], res["machine"]["packages"]
    held, ctrl, truth = res["rates"]["held_out"], res["rates"]["control"], res["rates"]["checker_on_truth"]
    lines = [
        f"# flux/mini quality and speed {res['date']}{' (quick)' if res['quick'] else ''}", "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} cores, torch {pk.get('torch')}, diffusers "
        f"{pk.get('diffusers')}; load average at start {m.get('load_average_start')}, at end {m.get('load_average')}.",
        "",
        f"Command: `python bench/mini_quality.py{' --quick' if res['quick'] else ''}`: {res['n']} held-out prompts "
        f"and {res['n_control']} in-distribution ones, 512x512, {res['steps']} steps, guidance {res['guidance']} "
        f"({res['settings']}), seed = "
        "index, through `Engine.generate`; read back with `kiln.training.world.classify`.", "",
        "| set | n | background right | shape colour right | count right | position right | shape right |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| **held out** (never in training) | {res['n']} | **{held['background']:.1%}** | **{held['colour']:.1%}** | "
        f"{held['count']:.1%} | {held['position']:.1%} | {held['shape']:.1%} |",
        f"| in distribution (control) | {res['n_control']} | {ctrl['background']:.1%} | {ctrl['colour']:.1%} | "
        f"{ctrl['count']:.1%} | {ctrl['position']:.1%} | {ctrl['shape']:.1%} |",
        f"| checker on the true renders of the held-out scenes | {res['n']} | {truth['background']:.1%} | "
        f"{truth['colour']:.1%} | {truth['count']:.1%} | {truth['position']:.1%} | {truth['shape']:.1%} |",
        "", "Position right: of the prompts that name a position, the read centre of the shape colour within "
        "0.15 of the image of the shapes' own centre (`world.at_position`). Shape right: the largest region "
        "of the shape colour read as the prompt's shape (`world.read_shape`: solidity, then roundness); "
        "a model that drew one kind of blob every time would score about 25%, so the table below says "
        "what each shape was read as.", "",
        "Held out, shape asked (rows) against shape read (columns):", "",
        "| asked | " + " | ".join(res["shape_names"]) + " | none |", "|---|" + "---:|" * (len(res["shape_names"]) + 1),
        *(f"| {asked} | " + " | ".join(str(row.get(read, 0)) for read in [*res["shape_names"], "none"]) + " |"
          for asked, row in res["shapes_read"].items()),
        "", f"Targets: background >= {TARGETS['background']:.0%}, shape colour >= {TARGETS['colour']:.0%}: "
        f"**{'met' if res['targets_met'] else 'NOT met'}**.", "",
        "By kind of held-out combination:", "", "| kind | n | background | colour | count |", "|---|---:|---:|---:|---:|",
    ]
    for kind, r in res["by_kind"].items():
        lines.append(f"| {kind} | {r['n']} | {r['background']:.1%} | {r['colour']:.1%} | {r['count']:.1%} |")
    lines += ["", f"Speed (`Engine.generate`, in process, {res['steps']} steps, guidance {res['guidance']}, median of the runs after a warm-up):", "",
              "| format | median ms | min | max |", "|---|---:|---:|---:|"]
    for fmt, s in res["speed"].items():
        lines.append(f"| {fmt} | {s['median_ms']} | {s['min_ms']} | {s['max_ms']} |")
    lines += ["", f"Target: 512x512 median <= 500 ms: **{'met' if res['speed']['512']['median_ms'] <= 500 else 'NOT met'}**.",
              "", "Most common misreadings (held out): " + ", ".join(f"{k} x{v}" for k, v in res["misreadings"]) , ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=240, help="held-out prompts (default 240)")
    ap.add_argument("--control", type=int, default=80, help="in-distribution prompts (default 80)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--speed-runs", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="60 held-out, 20 control, 3 speed runs; prints only")
    ap.add_argument("--write", action="store_true", help="write results even with --quick")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance (default: the model's)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.control, args.speed_runs = 60, 20, 3

    from kiln.catalog import load_catalog
    from kiln.engine import Engine
    from kiln.training import world

    load_start = load_average()
    engine = Engine(load_catalog())
    spec = engine.catalog.resolve(*MODEL)
    t0 = time.perf_counter()
    held = run_set(engine, scenes(args.n, args.seed, True), args.steps, "512", args.guidance)
    control = run_set(engine, scenes(args.control, args.seed + 1, False), args.steps, "512", args.guidance)
    quality_s = time.perf_counter() - t0
    by_kind: dict[str, dict] = {}
    for kind in sorted({r["held_out"] for r in held}):
        rows = [r for r in held if r["held_out"] == kind]
        by_kind[kind] = {"n": len(rows), **rates(rows)}
    miss = Counter()
    for r in held:
        if not r["ok"]["colour"]:
            miss[f"{r['expected']['colour']} read as {r['read']['colour']}"] += 1
        if not r["ok"]["background"]:
            miss[f"background {r['expected']['background']} read as {r['read']['background']}"] += 1
    shapes_read: dict[str, Counter] = {name: Counter() for name in world.SHAPES}
    for r in held:
        shapes_read[r["expected"]["shape"]][r["read"]["shape"] or "none"] += 1
    res = {
        "shape_names": list(world.SHAPES), "shapes_read": {k: dict(v) for k, v in shapes_read.items()},
        "date": dt.date.today().strftime("%Y%m%d"), "quick": args.quick, "n": len(held), "n_control": len(control),
        "steps": args.steps or spec.steps.default, "guidance": args.guidance or spec.guidance.value,
        "settings": "the model's defaults" if args.steps is None and args.guidance is None else "set on the command line",
        "seed": args.seed,
        "rates": {"held_out": rates(held), "control": rates(control), "checker_on_truth": rates(held, "checker_on_truth")},
        "by_kind": by_kind, "misreadings": miss.most_common(8), "quality_s": round(quality_s, 1),
        "speed": speed(engine, args.speed_runs, args.steps, args.guidance), "held_out_rows": held, "control_rows": control,
    }
    hr = res["rates"]["held_out"]
    res["targets_met"] = hr["background"] >= TARGETS["background"] and hr["colour"] >= TARGETS["colour"]
    res["machine"] = machine(extra={"load_average_start": load_start, "bench_args": vars(args)},
                             packages=("torch", "diffusers", "transformers", "numpy", "pillow", "scipy"))
    md = render_md(res)
    print(md)
    if not args.quick or args.write:
        write_results(f"mini-quality-{res['date']}" + ("-quick" if args.quick else ""), res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
