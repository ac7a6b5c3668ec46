"""The engine's CUDA path (bfloat16 weights) on the toy checkpoints.

Run on a machine with a GPU: ``scripts/test -m gpu``. Without CUDA these are skipped with the
reason shown in the summary; CI has no GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.engine import Engine, GenerationRequest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (run scripts/test -m gpu on a GPU machine)"),
]

CASES = [("flux", "dev", "t2i"), ("flux", "dev", "edit"), ("flux", "dev2", "t2i"), ("zimage", "turbo", "i2i"), ("wan", "default", "t2v")]


@pytest.fixture(scope="module")
def cuda_engine(catalog) -> Engine:
    return Engine(catalog, device="cuda")


def _request(family, model, task, seed):
    from helpers import mask_png, png

    extra = {"duration": 0.5} if family == "wan" else {}
    if task in ("i2i", "edit"):
        extra["image"] = png(64, 64)
    if task == "edit":
        extra["mask"] = mask_png(64, 64)
    return GenerationRequest.create(family=family, model=model, task=task, format="toy-64", prompt="a red circle", seed=seed, **extra)


@pytest.mark.parametrize(("family", "model", "task"), CASES)
def test_cuda_bf16_runs_and_is_deterministic(cuda_engine, family, model, task):
    spec = cuda_engine.catalog.resolve(family, model)
    assert cuda_engine.dtype_for(spec) == torch.float32  # the toy catalog asks for float32 weights
    a = cuda_engine.generate(_request(family, model, task, 5)).outputs[0]
    b = cuda_engine.generate(_request(family, model, task, 5)).outputs[0]
    frames = (lambda o: o.frames) if family == "wan" else (lambda o: [o.image])
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(frames(a), frames(b)))
    loaded = cuda_engine.load(spec)
    assert next(iter(loaded.pipelines.values())).transformer.device.type == "cuda"


def test_catalog_dtype_applies_on_cuda(toys_dir):
    from kiln.catalog import parse_catalog
    from kiln.testing.catalog import toy_catalog_dict

    raw = toy_catalog_dict(toys_dir, small_formats=True)
    for entry in raw["models"]:
        entry["dtype"] = "bfloat16"
    engine = Engine(parse_catalog(raw, base_dir=toys_dir), device="cuda")
    result = engine.generate(_request("flux", "dev", "t2i", 1))
    assert result.outputs[0].image.size == (64, 64)
    assert next(iter(engine.load(engine.catalog.models["flux/dev"]).pipelines.values())).transformer.dtype == torch.bfloat16
