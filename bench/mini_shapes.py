"""Does flux/mini draw the shape a prompt names? Several weight directories, side by side.

Usage::

    python bench/mini_shapes.py                                   # the committed weights
    python bench/mini_shapes.py --weights A --weights B --name a --name b --write

Every directory draws the same 120 prompts with the same seeds: each shape of ``world.SHAPES`` x five
named positions x three sizes x two seeds, "a {size} blue {shape} at the {position} on a yellow
background", 512x512, 8 steps, true CFG 3 against the empty prompt (the catalog's defaults), through
``FluxPipeline`` itself (the weights load exactly as ``FluxPipeline.from_pretrained`` loads them, plus
Kiln's ``expose_latents``, which img2img needs and t2i ignores). Each picture's shape is read by
``world.classify`` (the largest region of the shape's colour: its solidity and roundness,
``world.read_shape``), which reads the true renders of the same scenes (``--check``) right.
Chance is 25%. It also writes, per directory, a picture sheet: one row a shape, small / medium / large
at the center, seed 100. With ``--write``: ``bench/results/mini-shapes-<date>.{json,md}`` and the sheets
as ``mini-shapes-<date>-<name>.webp``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _machine import load_average, machine, write_results

POSITIONS = ("center", "top left", "right", "bottom", "top right")
SIZES = ("small", "medium", "large")
SEEDS = (100, 101)


def prompts():
    """(shape, size, position, seed, prompt) for every picture, in a fixed order."""
    from kiln.training import world

    for shape in world.SHAPES:
        for position in POSITIONS:
            for size in SIZES:
                word = "" if size == "medium" else size + " "
                for seed in SEEDS:
                    yield shape, size, position, seed, f"a {word}blue {shape} at the {position} on a yellow background"


def truth(shape: str, size: str, position: str):
    """The world's own render of a prompt's scene (no tilt, no jitter)."""
    from kiln.training import world

    group = world.Group(shape, "blue", size, 1, position, (world.POSITIONS[position],))
    return world.render(world.Scene("yellow", (group,)), 512, 512)


def load(path: Path):
    import torch
    from diffusers import FluxPipeline

    from kiln.engine.families.base import expose_latents

    pipe = FluxPipeline.from_pretrained(path, torch_dtype=torch.float32)
    expose_latents(pipe.vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, prompt: str, seed: int):
    import torch

    with torch.no_grad():
        return pipe(prompt, negative_prompt="", true_cfg_scale=3.0, num_inference_steps=8, height=512, width=512,
                    max_sequence_length=32, generator=torch.Generator().manual_seed(seed)).images[0]


def run(pipe_or_none, name: str, sheet_path: Path | None) -> dict:
    """Read every prompt's picture; ``pipe_or_none`` None reads the true renders instead."""
    import numpy as np
    from PIL import Image

    from kiln.training import world

    right: dict[str, dict[str, int]] = {s: dict.fromkeys(SIZES, 0) for s in world.SHAPES}
    reads: list[dict] = []
    sheet: dict[tuple[str, str], Image.Image] = {}
    started = time.perf_counter()
    for shape, size, position, seed, prompt in prompts():
        image = truth(shape, size, position) if pipe_or_none is None else draw(pipe_or_none, prompt, seed)
        read = world.classify(image).shape
        right[shape][size] += read == shape
        reads.append({"prompt": prompt, "seed": seed, "read": read})
        if position == "center" and seed == SEEDS[0]:
            sheet[(shape, size)] = image.resize((128, 128))
    per = len(POSITIONS) * len(SEEDS)
    if sheet_path is not None:
        rows = [np.concatenate([np.asarray(sheet[(s, z)]) for z in SIZES], 1) for s in world.SHAPES]
        sheet_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(rows, 0)).save(sheet_path, quality=90)
    total = sum(sum(v.values()) for v in right.values())
    return {
        "name": name,
        "right": {s: {z: round(n / per, 3) for z, n in v.items()} for s, v in right.items()},
        "by_shape": {s: round(sum(v.values()) / (per * len(SIZES)), 3) for s, v in right.items()},
        "by_size": {z: round(sum(right[s][z] for s in right) / (per * len(right)), 3) for z in SIZES},
        "all": round(total / (per * len(SIZES) * len(right)), 3),
        "seconds": round(time.perf_counter() - started, 1),
        "reads": reads,
    }


def table(results: list[dict]) -> str:
    from kiln.training import world

    head = "| read right | " + " | ".join(r["name"] for r in results) + " |\n"
    head += "|---|" + "---:|" * len(results) + "\n"
    lines = [f"| **all ({sum(1 for _ in prompts())} pictures)** | " + " | ".join(f"**{r['all']:.1%}**" for r in results) + " |"]
    lines += [f"| {s} | " + " | ".join(f"{r['by_shape'][s]:.1%}" for r in results) + " |" for s in world.SHAPES]
    lines += [f"| {z} | " + " | ".join(f"{r['by_size'][z]:.1%}" for r in results) + " |" for z in SIZES]
    lines += [f"| {s}, {z} | " + " | ".join(f"{r['right'][s][z]:.0%}" for r in results) + " |"
              for s in world.SHAPES for z in SIZES]
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", action="append", type=Path, help="a FluxPipeline directory (repeatable)")
    ap.add_argument("--name", action="append", help="a column name per --weights")
    ap.add_argument("--check", action="store_true", help="also read the true renders (the checker's own score)")
    ap.add_argument("--write", action="store_true", help="write bench/results/mini-shapes-<date>.*")
    args = ap.parse_args(argv)
    weights = args.weights or [ROOT / "kiln" / "weights" / "flux-mini"]
    names = args.name or [p.name for p in weights]
    if len(names) != len(weights):
        ap.error("give one --name per --weights")

    import torch

    from kiln.training import world

    torch.set_num_threads(max(1, torch.get_num_threads()))
    date = dt.date.today().strftime("%Y%m%d")
    results = [run(None, "true renders", None)] if args.check else []
    for path, name in zip(weights, names, strict=True):
        sheet = HERE / "results" / f"mini-shapes-{date}-{name}.webp" if args.write else None
        results.append(run(load(path), name, sheet))
        print(f"{name}: {results[-1]['all']:.1%} in {results[-1]['seconds']} s", file=sys.stderr)
    md = (f"# flux/mini: shape read right ({date})\n\n`python bench/mini_shapes.py "
          + " ".join(sys.argv[1:] if argv is None else argv) + "`\n\n" + table(results)
          + "\nChance is 25%. Sheets (with --write): one row a shape (" + ", ".join(world.SHAPES)
          + "), small / medium / large, center, seed 100.\n")
    print(md)
    if args.write:
        write_results(f"mini-shapes-{date}", {"date": date, "machine": machine(), "load_average": load_average(),
                                               "weights": [str(p) for p in weights], "results": results}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
