"""``kiln models`` (what the catalog holds and what is installed) and ``kiln pull MODEL``."""

from __future__ import annotations

import json
import sys

from kiln.catalog import Catalog, ModelSpec, load_catalog


def add_parsers(sub) -> None:
    p = sub.add_parser("models", help="list the catalog's models and whether each is installed")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_models)
    p = sub.add_parser("pull", help="download a model's weights into the Hugging Face cache")
    p.add_argument("model", help="FAMILY/MODEL, for example flux/schnell (aliases work)")
    p.set_defaults(run=run_pull)


def availability(spec: ModelSpec) -> str:
    from kiln.engine import weights  # torch: imported by the commands that need it, not by every kiln command

    path = weights.locate(spec)
    if path is None:
        if spec.local_path is not None and not spec.toy:
            return f"not installed: no checkpoint at {spec.local_path}"
        return f"not installed: {weights.install_hint(spec)}"
    return "installed, RANDOM WEIGHTS (pictures are noise)" if spec.random_weights else "installed"


def rows(catalog: Catalog) -> list[dict]:
    out = []
    for spec in catalog:
        aliases = [a for a, t in catalog.aliases.items() if t == spec.key and a != spec.model]
        out.append(
            {
                "model": spec.key,
                "aliases": aliases,
                "modality": spec.modality,
                "tasks": spec.tasks,
                "status": spec.status,
                "default": spec.key == catalog.default_model,
                "availability": availability(spec),
                "source": spec.source,
                "info": spec.info,
            }
        )
    return out


def run_models(args) -> int:
    catalog = load_catalog(args.catalog)
    table = rows(catalog)
    if args.json:
        json.dump(table, sys.stdout, indent=2, default=str)
        print()
        return 0
    header = ("MODEL", "ALIASES", "TASKS", "STATUS", "PARAMS", "AVAILABILITY")
    lines = [header]
    for r in table:
        name = r["model"] + (" (default)" if r["default"] else "")
        lines.append((name, ",".join(r["aliases"]) or "-", ",".join(r["tasks"]), r["status"], str(r["info"].get("parameters", "?")), r["availability"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1])
    return 0


def run_pull(args) -> int:
    from kiln.engine import weights

    catalog = load_catalog(args.catalog)
    spec = catalog.resolve_key(args.model)
    what = "building toy checkpoint" if spec.toy else f"downloading {spec.source}"
    print(f"{spec.key}: {what} ...", file=sys.stderr)
    path = weights.pull(spec)
    print(f"{spec.key}: installed at {path}")
    return 0
