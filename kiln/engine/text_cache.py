"""Text-encoder outputs kept for repeated prompts: the second request with a prompt skips the encoders.

Every diffusers pipeline Kiln drives encodes its prompt through ``pipe.encode_prompt(...)`` (FLUX.1's
CLIP + T5, FLUX.2's Mistral, Z-Image's Qwen3, WAN's UMT5), whose result depends only on its arguments
and on the text encoders' weights. :meth:`TextEncoderCache.install` shadows that method on a pipeline
instance with one that looks the arguments up first. The key is every argument that is text or a
number (prompts, negative prompts, ``max_sequence_length``, ``num_images_per_prompt``, CFG flags, the
device), the pipeline class, plus a *salt* the engine sets for the call: the request's LoRA adapters,
which may hold text-encoder layers. A call that passes tensors (precomputed embeddings) or anything
else the key cannot hold goes straight through.

Lossless by construction: a hit returns the very tensors the encoders produced the first time (fresh
containers, shared tensors; the pipelines never write into them). Bounded by entries and bytes, least
recently used first out. One cache per loaded model; the engine calls a model's pipelines one at a
time (its lock), and the cache's own lock keeps its bookkeeping consistent anyway.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Any

import torch

_MARK = "_kiln_text_cache"


class TextEncoderCache:
    """LRU of ``encode_prompt`` results for one model, at most ``max_entries`` and ``max_bytes``."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.bypassed = 0  # calls whose arguments cannot be a key (precomputed embeddings)
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._salt: Hashable = ()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @contextlib.contextmanager
    def scope(self, salt: Hashable) -> Iterator[None]:
        """Calls inside use ``salt`` in their keys: whatever beside the arguments changes the encoders'
        output for this request (its LoRA adapters)."""
        previous, self._salt = self._salt, salt
        try:
            yield
        finally:
            self._salt = previous

    def install(self, pipe: Any) -> None:
        """Look ``pipe.encode_prompt`` calls up here first (once per pipeline instance)."""
        original = pipe.encode_prompt
        if getattr(original, _MARK, None) is self:
            return
        signature = inspect.signature(original)
        owner = type(pipe).__qualname__

        @functools.wraps(original)
        def encode_prompt(*args: Any, **kwargs: Any) -> Any:
            key = _key(owner, signature, args, kwargs)
            if key is None:
                self.bypassed += 1
                return original(*args, **kwargs)
            key = (self._salt, key)
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return _fresh(entry[0])
                self.misses += 1
            result = original(*args, **kwargs)
            self._store(key, result)
            return _fresh(result)

        setattr(encode_prompt, _MARK, self)
        pipe.encode_prompt = encode_prompt

    def _store(self, key: Hashable, result: Any) -> None:
        size = _nbytes(result)
        if self.max_entries <= 0 or size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (result, size)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self._bytes -= freed


def _key(owner: str, signature: inspect.Signature, args: tuple, kwargs: dict) -> Hashable | None:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    parts: list[tuple[str, Hashable]] = [("", owner)]
    for name, value in bound.arguments.items():
        frozen = _freeze(value)
        if frozen is _UNKEYABLE:
            return None
        parts.append((name, frozen))
    return tuple(parts)


_UNKEYABLE = object()


def _freeze(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, (list, tuple)):
        items = tuple(_freeze(v) for v in value)
        return _UNKEYABLE if any(i is _UNKEYABLE for i in items) else (type(value).__name__, items)
    return _UNKEYABLE  # tensors (precomputed embeddings), dtypes, objects: not a prompt's identity


def _fresh(result: Any) -> Any:
    """New containers around the same tensors: a pipeline that appends to a returned list does not
    change what the next hit returns."""
    if isinstance(result, tuple):
        return tuple(_fresh(r) for r in result)
    if isinstance(result, list):
        return [_fresh(r) for r in result]
    return result


def _nbytes(result: Any) -> int:
    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    if isinstance(result, (tuple, list)):
        return sum(_nbytes(r) for r in result)
    return 0
