"""The engine's failure modes: a pipeline that raises, runs out of memory, a callback that raises,
a corrupt checkpoint. Each becomes a typed error; the model stays usable afterwards."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from kiln.engine import Engine, GenerationRequest
from kiln.engine.families.base import Adapter
from kiln.engine.previews import LatentPreviewer, calibration_image
from kiln.errors import GenerationError, ModelLoadFailed, ModelNotInstalled, OutOfMemory
from kiln.testing.catalog import toy_catalog

pytestmark = pytest.mark.slow


def request(**kw) -> GenerationRequest:
    fields = dict(family="flux", model="dev", task="t2i", format="toy-64", prompt="a red circle", steps=15, seed=1)
    fields.update(kw)
    return GenerationRequest.create(**fields)


class RaisingPipeline:
    """Stands in for a diffusers pipeline whose call fails."""

    def __init__(self, real, exc: BaseException) -> None:
        self.real, self.exc, self.scheduler, self.calls = real, exc, None, 0

    def __call__(self, **kwargs):
        self.calls += 1
        raise self.exc


@pytest.fixture
def fresh_engine(toys_dir) -> Engine:
    return Engine(toy_catalog(toys_dir, small_formats=True), device="cpu")


@pytest.mark.parametrize(("exc", "error", "code"), [
    (RuntimeError("CUDA error: an illegal memory access at 0xdeadbeef"), GenerationError, "generation_failed"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), OutOfMemory, "out_of_memory"),
])
def test_pipeline_failures_become_typed_errors_and_the_model_recovers(fresh_engine, exc, error, code):
    loaded = fresh_engine.load(fresh_engine.catalog.models["flux/dev"])
    real = loaded.pipelines["t2i"]
    loaded.pipelines["t2i"] = RaisingPipeline(real, exc)
    with pytest.raises(error) as info:
        fresh_engine.generate(request())
    assert info.value.code == code
    assert "0xdeadbeef" not in info.value.message and "20.00 GiB" not in info.value.message  # no internals
    loaded.pipelines["t2i"] = real
    assert fresh_engine.generate(request()).outputs  # the lock was released


def test_a_callback_that_raises_fails_the_generation_cleanly(engine):
    def on_step(event):
        raise ValueError("client went away")

    with pytest.raises(GenerationError):
        engine.generate(request(), on_step=on_step)
    assert engine.generate(request()).outputs


def test_a_corrupt_checkpoint_is_a_load_failure(toys_dir, tmp_path):
    broken = tmp_path / "flux1-dev"
    shutil.copytree(toys_dir / "flux1-dev", broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"\x00" * 64)
    catalog = toy_catalog(toys_dir, small_formats=True)
    spec = catalog.models["flux/dev"].model_copy(update={"source": str(broken)})
    engine = Engine(catalog, device="cpu")
    with pytest.raises(ModelLoadFailed, match="flux/dev could not be loaded"):
        engine.load(spec)


def test_a_checkpoint_missing_a_component_is_not_installed(toys_dir, tmp_path):
    partial = tmp_path / "flux1-dev"
    shutil.copytree(toys_dir / "flux1-dev", partial)
    shutil.rmtree(partial / "vae")
    catalog = toy_catalog(toys_dir, small_formats=True)
    spec = catalog.models["flux/dev"].model_copy(update={"source": str(partial)})
    with pytest.raises(ModelNotInstalled, match="flux/dev is not installed on this server") as info:
        Engine(catalog, device="cpu").load(spec)
    assert str(tmp_path) not in info.value.message  # server paths stay in the log


class LinearVae(Adapter):
    """A 'VAE' that is an exactly known linear map of 8x8-pooled RGB into 16 channels."""

    name = "linear"
    pipeline_classes = frozenset()

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.mix = torch.randn(16, 3, generator=gen)
        self.offset = torch.randn(16, generator=gen)

    def encode_for_preview(self, pipe, image):
        pooled = torch.nn.functional.avg_pool2d((image + 1) / 2, 8)  # (1, 3, h, w) in [0, 1]
        return torch.einsum("bchw,kc->bkhw", pooled, self.mix) + self.offset.view(1, -1, 1, 1)


class _Pipe:
    class vae:  # noqa: N801 - mimics pipe.vae
        device = torch.device("cpu")
        dtype = torch.float32


def test_preview_fit_inverts_a_linear_latent_space():
    adapter = LinearVae()
    previewer = LatentPreviewer.fit(adapter, _Pipe())
    for colour in [(1.0, 0.0, 0.0), (0.1, 0.8, 0.3), (0.5, 0.5, 0.5)]:
        image = torch.tensor(colour).view(1, 3, 1, 1).expand(1, 3, 64, 64) * 2 - 1
        rendered = np.asarray(previewer.render(adapter.encode_for_preview(None, image))[0]).reshape(-1, 3)
        assert np.abs(rendered.mean(axis=0) - np.array(colour) * 255).max() < 2
    assert calibration_image().shape == (256, 256, 3)
