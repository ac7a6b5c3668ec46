"""A safetensors file judged by parsing it, never by its name.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name ->
``{dtype, shape, data_offsets}``, plus an optional ``__metadata__`` of strings), then the raw
tensor bytes, back to back. Nothing in it is executed when it is loaded, which is why it is the
only format accepted: a pickled checkpoint (``.ckpt``, ``.pt``, ``.bin``) can run code on load.
A pickle, a zip, an HTML error page or a truncated download all fail these checks.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from kiln.errors import InvalidLora

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


def read_header(path: Path, *, field: str = "lora") -> dict[str, dict[str, Any]]:
    """The tensors of the safetensors file at ``path`` (name -> dtype, shape, data_offsets), after
    checking that the file is exactly one well-formed safetensors file; :class:`InvalidLora` if not."""

    def refuse(problem: str) -> InvalidLora:
        return InvalidLora(f"{field}: not a safetensors file ({problem}); only .safetensors adapters are accepted",
                           details={"field": field})

    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise refuse("it is shorter than a header")
        (length,) = struct.unpack("<Q", prefix)
        if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
            raise refuse("its first 8 bytes are not a plausible header length")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise refuse("its header is not JSON") from None
    if not isinstance(header, dict):
        raise refuse("its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise refuse("its __metadata__ is not a map of strings")
    if not header:
        raise refuse("it holds no tensors")
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise refuse(f"tensor {name[:80]!r} is not described by dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ITEM_BYTES:
            raise refuse(f"tensor {name[:80]!r} has an unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise refuse(f"tensor {name[:80]!r} has an invalid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise refuse(f"tensor {name[:80]!r} has invalid data_offsets")
        if offsets[1] - offsets[0] != math.prod(shape) * ITEM_BYTES[dtype]:
            raise refuse(f"tensor {name[:80]!r} does not hold as many bytes as its shape needs")
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    end = 0
    for start, stop in spans:
        if start != end:
            raise refuse("its tensors overlap or leave gaps")
        end = stop
    if 8 + length + end != size:
        raise refuse(f"it is {size} bytes, its header describes {8 + length + end}")
    return header
