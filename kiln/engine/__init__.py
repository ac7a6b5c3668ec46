"""The bottom layer: diffusers pipelines behind one typed request. Knows nothing of HTTP or jobs."""

from kiln.engine.batch import BatchItem, batch_key, compatible
from kiln.engine.engine import Engine, GenerationResult, LoadedModel, StepEvent, WarmUpRun
from kiln.engine.outputs import ImageOutput, Output, VideoOutput
from kiln.engine.plan import Plan, plan_request
from kiln.engine.request import GenerationRequest

__all__ = [
    "BatchItem",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "ImageOutput",
    "LoadedModel",
    "Output",
    "Plan",
    "StepEvent",
    "VideoOutput",
    "WarmUpRun",
    "batch_key",
    "compatible",
    "plan_request",
]
