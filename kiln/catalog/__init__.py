"""The model catalog: which models exist, where their weights come from, and their rules."""

from kiln.catalog.loader import DEFAULT_CATALOG, KNOWN_SAMPLERS, KNOWN_SCHEDULERS, Catalog, load_catalog, parse_catalog
from kiln.catalog.schema import TASK_MODALITY, TASKS_NEEDING_IMAGE, Guidance, ModelSpec, StepRange, VideoSpec

__all__ = [
    "DEFAULT_CATALOG",
    "KNOWN_SAMPLERS",
    "KNOWN_SCHEDULERS",
    "TASK_MODALITY",
    "TASKS_NEEDING_IMAGE",
    "Catalog",
    "Guidance",
    "ModelSpec",
    "StepRange",
    "VideoSpec",
    "load_catalog",
    "parse_catalog",
]
