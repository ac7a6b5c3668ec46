"""Architecture adapters, chosen by the diffusers pipeline classes a catalog entry names."""

from __future__ import annotations

from kiln.catalog import ModelSpec
from kiln.engine.families.base import Adapter
from kiln.engine.families.flux import FluxAdapter
from kiln.engine.families.flux2 import Flux2Adapter
from kiln.engine.families.wan import WanAdapter
from kiln.engine.families.zimage import ZImageAdapter
from kiln.errors import CatalogError

ADAPTERS: tuple[Adapter, ...] = (FluxAdapter(), Flux2Adapter(), ZImageAdapter(), WanAdapter())


def adapter_for(spec: ModelSpec) -> Adapter:
    """The adapter whose pipelines the model's catalog entry names (all of them must share one)."""
    classes = set(spec.pipelines.values())
    for adapter in ADAPTERS:
        if classes <= adapter.pipeline_classes:
            return adapter
    known = sorted(c for a in ADAPTERS for c in a.pipeline_classes)
    raise CatalogError(f"{spec.key}: pipelines {sorted(classes)} are not one supported architecture; known: {known}")


__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
