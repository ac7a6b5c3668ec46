"""What a job needs and what a worker holds, as the strings the Redis broker routes by.

A job *needs* ``m:<family>/<model>`` (as the request names it, alias or not) and ``l:<sha256>`` for
each of its LoRA adapters; a worker *holds* ``m:<key>`` for every model it has loaded, under its
catalog key and every alias that names it, and ``l:<sha256>`` for the adapters in its LoRA cache.
The broker gives a job to a free worker that holds its model (and, better, its adapters) when there
is one, and to any worker otherwise (:mod:`kiln.queue.redis_scripts`, "Routing").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MAX_LORAS_ADVERTISED = 256  # the most recently used; an adapter further back is cheap to fetch again


def needs_of(request: Mapping[str, Any]) -> list[str]:
    """What the request (a payload's ``request`` dict) needs of the worker that runs it; the model first."""
    needs = [f"m:{request['family']}/{request['model']}"]
    needs += [f"l:{lora['sha256']}" for lora in request.get("loras") or ()]
    return needs


def holdings(models: Iterable[str], aliases: Mapping[str, str], loras: Iterable[str] = ()) -> list[str]:
    """What a worker with ``models`` loaded (catalog keys), the catalog's ``aliases`` (alias -> key)
    and ``loras`` cached (SHA-256s) holds."""
    loaded = list(models)
    out = [f"m:{key}" for key in loaded]
    out += [f"m:{key.split('/', 1)[0]}/{alias}" for alias, key in aliases.items() if key in loaded]
    out += [f"l:{sha}" for sha in loras]
    return out
