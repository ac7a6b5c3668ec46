"""Describe the machine a benchmark ran on.

Shared by the scripts under ``bench/``: ``machine()`` returns a JSON-serialisable
dict (CPU model, core counts, RAM, OS, Python, library versions) that each bench
stores next to its raw timings, so results from different machines are never
compared by accident.  Everything is best-effort: a missing library or an
unreadable ``/proc`` file yields ``None``, never an exception.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import sys
from typing import Any

# Distributions whose versions matter for the benches in this folder.  Absent
# ones are reported as None.  Callers can add more via ``machine(extra=...)``.
DEFAULT_PACKAGES = (
    "torch",
    "numpy",
    "pillow",
    "av",
    "diffusers",
    "scikit-image",
    "imagecodecs",
    "webp",
)


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _hypervisor() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((ln for ln in fh if ln.startswith("flags")), "")
        if " hypervisor" in flags:
            return "yes"
        return "no" if flags else None
    except OSError:
        return None


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on a shared VM skews timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def package_versions(names: tuple[str, ...] | list[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            out[name] = None
    return out


def machine(extra: dict[str, Any] | None = None, packages: tuple[str, ...] | list[str] = DEFAULT_PACKAGES) -> dict[str, Any]:
    """Return a dict describing this machine and software stack."""
    info: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "virtualized": _hypervisor(),
        "ram_bytes": _ram_bytes(),
        "load_average": load_average(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "packages": package_versions(packages),
    }
    if extra:
        info.update(extra)
    return info


if __name__ == "__main__":  # pragma: no cover - convenience
    import json

    print(json.dumps(machine(), indent=2))


def write_results(stem: str, data: dict[str, Any], md: str) -> None:
    """Write ``bench/results/<stem>.json`` (raw numbers, indented) and ``<stem>.md`` (the printed table)."""
    import json
    from pathlib import Path

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(md, encoding="utf-8")
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)
