"""The bottom layer: diffusers pipelines behind one typed request. Knows nothing of HTTP or jobs."""

from kiln.engine.engine import Engine, GenerationResult, LoadedModel, StepEvent
from kiln.engine.outputs import ImageOutput, Output, VideoOutput
from kiln.engine.plan import Plan, plan_request
from kiln.engine.request import GenerationRequest

__all__ = [
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "ImageOutput",
    "LoadedModel",
    "Output",
    "Plan",
    "StepEvent",
    "VideoOutput",
    "plan_request",
]
