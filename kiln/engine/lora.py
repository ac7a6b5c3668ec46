"""LoRA adapters in a running pipeline: loaded once through diffusers' PEFT integration, switched
between requests without reloading the base model.

One :class:`LoraSlots` per loaded model. A model's pipelines (t2i, i2i, edit) share one
transformer, so an adapter loaded through any of them serves all. Before each run,
:meth:`LoraSlots.activate` makes exactly the request's adapters active with the request's weights;
a request without adapters runs with every adapter disabled, which is the base model's output to
the bit (PEFT's layers then call only the base layer). At most ``max_loaded`` adapters stay in
memory; the least recently used is deleted first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

from kiln.engine.request import LoraRef
from kiln.errors import InvalidLora

log = logging.getLogger(__name__)


class LoraFiles(Protocol):
    """Where the engine finds an adapter's file by its SHA-256 (:class:`kiln.loras.LoraStore`)."""

    def path(self, sha256: str) -> Path | None: ...


def adapter_name(ref: LoraRef) -> str:
    return f"kiln_{ref.sha256[:24]}"


class LoraSlots:
    def __init__(self, model_key: str, *, max_loaded: int = 8) -> None:
        self.model_key = model_key
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> sha256, least recent first

    def activate(self, pipe: Any, refs: tuple[LoraRef, ...], files: LoraFiles | None) -> None:
        """Make ``refs`` (each adapter once) the active adapters of ``pipe``, or none."""
        if not refs:
            if self.loaded:
                pipe.disable_lora()
            return
        if files is None:
            raise InvalidLora("loras: this server runs without a LoRA store; send the request without loras")
        names = []
        for ref in refs:
            name = adapter_name(ref)
            if name not in self.loaded:
                self._load(pipe, name, ref, files)
            self.loaded.move_to_end(name)
            names.append(name)
        self._evict(pipe, keep=set(names))
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=[ref.weight for ref in refs])

    def _load(self, pipe: Any, name: str, ref: LoraRef, files: LoraFiles) -> None:
        path = files.path(ref.sha256)
        shown = ref.source or ref.sha256
        if path is None:
            raise InvalidLora(f"loras: the adapter {shown[:200]} is no longer in this server's LoRA cache; "
                              "send the request again", details={"field": "loras"})
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Shapes that do not fit (an adapter for another model of the same layer names), or a
            # layout diffusers cannot convert: the adapter's fault, not the server's.
            log.info("LoRA %s does not fit %s: %s", shown, self.model_key, exc)
            self._forget(pipe, name)
            raise InvalidLora(f"loras: the adapter {shown[:200]} does not fit {self.model_key} "
                              "(its layers have other shapes); use an adapter trained for this model",
                              details={"field": "loras"}) from None
        attached = {n for names in pipe.get_list_adapters().values() for n in names}
        if name not in attached:
            self._forget(pipe, name)
            raise InvalidLora(f"loras: the adapter {shown[:200]} has no layer that {self.model_key} has "
                              "(its keys name another architecture); use an adapter trained for this model",
                              details={"field": "loras"})
        self.loaded[name] = ref.sha256
        log.info("LoRA %s loaded into %s as %s", shown, self.model_key, name)

    def _evict(self, pipe: Any, keep: set[str]) -> None:
        for name in list(self.loaded):
            if len(self.loaded) <= self.max_loaded:
                break
            if name not in keep:
                self._forget(pipe, name)

    def _forget(self, pipe: Any, name: str) -> None:
        self.loaded.pop(name, None)
        try:
            pipe.delete_adapters(name)
        except (ValueError, KeyError, AttributeError):
            pass  # it never got as far as being registered
