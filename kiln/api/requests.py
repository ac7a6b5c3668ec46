"""Render-API bodies -> the canonical :class:`GenerationRequest` (inputs fetched, controls checked)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from kiln.api.fetch import resolve_image_input
from kiln.api.loras import resolve_loras
from kiln.api.schemas import GenerateBody
from kiln.api.services import Services
from kiln.catalog import ModelSpec
from kiln.engine.plan import check_lora_support
from kiln.engine.request import GenerationRequest
from kiln.errors import InvalidParameters


async def build_request(
    svc: Services, body: GenerateBody, spec: ModelSpec, task: str, fmt: str | None
) -> GenerationRequest:
    """Resolve inputs, map names (``cfg`` is video guidance), validate against the catalog."""
    svc.prompt_filter.check(body.prompt, body.negative_prompt)
    if body.cfg is not None and body.guidance is not None:
        raise InvalidParameters("send cfg or guidance, not both")
    if body.cfg is not None and spec.modality != "video":
        raise InvalidParameters("cfg is the video guidance; image models take guidance")
    image = await _input(svc, body.image, "image") if body.image else None
    mask = await _input(svc, body.mask, "mask") if body.mask else None
    canonical = GenerationRequest.create(
        family=spec.family,
        model=spec.model,
        task=task,
        format=fmt or spec.formats[0],
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.steps,
        guidance=body.cfg if body.cfg is not None else body.guidance,
        seed=body.seed,
        sampler=body.sampler,
        scheduler=body.scheduler,
        strength=body.strength,
        image=image,
        mask=mask,
        duration=body.duration,
        upscale=body.upscale,
        latent_upscale=body.latent_upscale,
        detail_enhance=bool(body.detail_enhance),
        detail_strength=body.detail_strength,
        precision=body.precision,
    )
    if image is None and mask is None:
        svc.validate(canonical)  # no image to decode: cheaper than a hop to the threadpool and back
    else:
        await run_in_threadpool(svc.validate, canonical)
    if body.loras:
        # every other check passed first, so nothing is downloaded for a request that would fail anyway
        check_lora_support(spec, svc.catalog)
        refs = await resolve_loras(svc, [(lora.url, lora.weight) for lora in body.loras], field="loras", repo_ids=False)
        canonical = canonical.model_copy(update={"loras": refs})
    return canonical


async def _input(svc: Services, value: str, what: str) -> bytes:

    def own_upload(name: str) -> bytes | None:
        # the fetcher validated the name; a concurrent expiry raises AssetNotFound, read as missing
        return svc.store.read("u", name)

    return await resolve_image_input(
        value, policy=svc.fetch_policy, own_upload=own_upload, public_url=svc.settings.base_url(), field=what
    )
