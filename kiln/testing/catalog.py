"""A catalog with the default catalog's rules whose sources are the toy checkpoints.

Tests and ``python -m kiln.testing.toys DIR`` use it, so every range, sampler list and task of the
real catalog is exercised against weights built offline, through the same loading code.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w

from kiln.catalog import DEFAULT_CATALOG, Catalog, parse_catalog

# Which toy checkpoint stands in for each model of the default catalog.
TOY_FOR_MODEL = {
    "flux/dev2": "flux2-dev",
    "flux/dev": "flux1-dev",
    "flux/schnell": "flux1-schnell",
    "zimage/turbo": "zimage-turbo",
    "wan/default": "wan22-ti2v",
    "flux/toy": "flux1-dev",
}


# Small formats that keep toy runs fast; tests add them with ``small_formats=True``.
SMALL_FORMATS = {"image": {"toy-64": [64, 64], "toy-96x64": [96, 64]}, "video": {"toy-64": [64, 64]}}


def toy_catalog_dict(toys_dir: Path, *, small_formats: bool = False) -> dict:
    raw = tomllib.loads(DEFAULT_CATALOG.read_text(encoding="utf-8"))
    if small_formats:
        for modality, table in SMALL_FORMATS.items():
            raw["formats"][modality].update(table)
    for entry in raw["models"]:
        key = f"{entry['family']}/{entry['model']}"
        if key not in TOY_FOR_MODEL:  # ships with Kiln (flux/mini): its own small, real weights
            entry["source"] = str((DEFAULT_CATALOG.parent / entry["source"]).resolve())
            if small_formats:  # its sizes are multiples of 64 (VAE 32 x packing 2)
                small = SMALL_FORMATS[entry["modality"]]
                entry["formats"] = list(entry["formats"]) + [f for f, (w, h) in small.items() if w % 64 == h % 64 == 0]
            continue
        entry["source"] = str((Path(toys_dir) / TOY_FOR_MODEL[key]).resolve())
        entry.pop("toy", None)
        entry["random_weights"] = True
        entry["dtype"] = "float32"
        if small_formats:
            entry["formats"] = list(entry["formats"]) + list(SMALL_FORMATS[entry["modality"]])
    return raw


def toy_catalog(toys_dir: Path, *, small_formats: bool = False) -> Catalog:
    return parse_catalog(toy_catalog_dict(toys_dir, small_formats=small_formats), base_dir=Path(toys_dir))


def write_toy_catalog(toys_dir: Path, dest: Path | None = None, *, small_formats: bool = False) -> Path:
    dest = dest or Path(toys_dir) / "catalog.toml"
    header = "# Written by kiln.testing: the default catalog's rules over toy checkpoints (random weights).\n"
    raw = toy_catalog_dict(toys_dir, small_formats=small_formats)
    dest.write_text(header + tomli_w.dumps(raw), encoding="utf-8")
    return dest
