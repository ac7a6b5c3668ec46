"""``GET /models`` and ``GET /models/aliases``, rendered from the catalog."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from kiln.api.auth import authenticate, services
from kiln.catalog import ModelSpec
from kiln.keys import KeyRecord

router = APIRouter(tags=["discovery"])


@router.get("/models")
async def list_models(
    request: Request,
    family: str | None = Query(default=None, max_length=64),
    modality: Literal["image", "video"] | None = None,
    key: KeyRecord | None = Depends(authenticate),
) -> dict[str, Any]:
    """Every model this server serves, optionally filtered by family or modality; ``default`` marks
    the one served when none is named (the playground preselects it)."""
    svc = services(request)
    models = [
        {**_model(spec, svc.backends, svc.offers(spec)), "default": spec.key == svc.catalog.default_model}  # as `kiln models`
        for spec in svc.catalog
        if (family is None or spec.family == family) and (modality is None or spec.modality == modality)
    ]
    return {"models": models}


@router.get("/models/aliases")
async def aliases(request: Request, key: KeyRecord | None = Depends(authenticate)) -> dict[str, Any]:
    """Stable names and the model each points at now."""
    catalog = services(request).catalog
    updated = datetime.fromtimestamp(catalog.path.stat().st_mtime, UTC) if catalog.path else datetime.now(UTC)
    return {
        "aliases": {alias: target.split("/", 1)[1] for alias, target in catalog.aliases.items()},
        "updated_at": updated.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _model(spec: ModelSpec, backends: tuple[str, ...], offers: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = dict(spec.info)
    if spec.steps.fixed:
        info["fixed_steps"] = spec.steps.default
    else:
        info.update(default_steps=spec.steps.default, steps_range=[spec.steps.min, spec.steps.max])
    guidance = spec.guidance
    if guidance.mode == "range":
        info.update(default_guidance=guidance.default, guidance_range=[guidance.min, guidance.max])
    elif guidance.mode == "fixed":
        info["fixed_guidance"] = guidance.value
    else:
        info["guidance"] = "ignored"
    if spec.samplers:
        info.update(samplers=spec.samplers, schedulers=spec.schedulers)
    info["loras"] = spec.lora  # takes LoRA adapters (else lora_refusal says why)
    if not spec.lora and spec.lora_refusal:
        info["lora_refusal"] = spec.lora_refusal
    info["negative_prompt"] = spec.negative_prompt
    if spec.sizes is not None:  # what the doors that name pixel sizes (WaveSpeed, OpenAI) accept
        info["size_range"] = [spec.sizes.min, spec.sizes.max]
    if spec.video is not None:
        info.update(fps=spec.video.fps, duration_range=[spec.video.duration.min, spec.video.duration.max])
    # from the engine: precision values (fp8 only where this server's card runs it), which tasks take a
    # strength, which upscale and detail passes (README: "Upscaling and detail")
    if "precisions" in offers:
        info["precisions"] = offers["precisions"]
    if "strength_tasks" in offers:
        info["strength_tasks"] = offers["strength_tasks"]
    if "refinements" in offers:
        info["refinements"] = offers["refinements"]
    return {
        "family": spec.family,
        "model": spec.model,
        "modality": spec.modality,
        "tasks": spec.tasks,
        "backends": list(backends),
        "default_backend": backends[0],
        "formats": spec.formats,
        "status": spec.status,
        "info": info,
    }
