"""The engine's speed switches on toy checkpoints: which path ran, and the same output as without it.

Compiling here uses a counting dynamo backend (it runs the captured graph as it is), which proves the
wiring in seconds; one test compiles with inductor for real (slow). What needs a GPU (CUDA graphs,
cuDNN attention, fp8 kernels) is checked here for its decisions, with the card mocked, and measured by
``bench/gpu.py`` on a GPU.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from kiln.catalog import parse_catalog
from kiln.catalog.schema import Optimizations
from kiln.engine import Engine, GenerationRequest, optimize
from kiln.engine.text_cache import TextEncoderCache
from kiln.errors import InvalidParameters
from kiln.testing.catalog import toy_catalog_dict

pytestmark = pytest.mark.slow


class CountingBackend:
    """A torch.compile backend that runs each captured graph unchanged and counts graphs and calls."""

    def __init__(self) -> None:
        self.graphs = 0
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


@pytest.fixture
def counting(monkeypatch):
    """A fresh counting backend registered under a name the catalog can give as compile_backend."""
    from torch._dynamo.backends import registry

    backend = CountingBackend()
    monkeypatch.setitem(registry._BACKENDS, "kiln_counting", None)
    monkeypatch.setitem(registry._COMPILER_FNS, "kiln_counting", backend)
    torch._dynamo.reset()
    yield backend
    torch._dynamo.reset()


def request(family="flux", model="schnell", fmt="toy-64", **kw) -> GenerationRequest:
    fields = dict(family=family, model=model, task="t2i", format=fmt, prompt="a red circle on a blue background", seed=7)
    fields.update(kw)
    return GenerationRequest.create(**fields)


def pixels(result) -> np.ndarray:
    return np.asarray(result.outputs[0].image).astype(int)


def statuses(engine, key) -> dict[str, str]:
    return {name: step["status"] for name, step in engine.optimizations(key).as_dict().items()}


# --- defaults and what each switch reports -----------------------------------------------------------


def test_on_a_cpu_only_the_text_cache_is_on_by_default_and_every_other_switch_says_why(catalog):
    engine = Engine(catalog, device="cpu")
    engine.load(catalog.models["flux/schnell"])
    report = engine.optimizations("flux/schnell")
    assert statuses(engine, "flux/schnell") == {
        "fuse_qkv": "off", "attention": "off", "cuda_graphs": "off", "compile": "off", "channels_last_vae": "off",
        "text_cache": "applied", "fp8": "skipped", "batching": "off",
    }
    assert "CUDA only" in report.get("compile").detail and "CUDA only" in report.get("fuse_qkv").detail
    assert "cpu" in report.get("attention").detail
    assert "compute capability 8.9" in report.get("fp8").detail  # schnell offers fp8; this device cannot run it


def test_switches_that_cannot_apply_here_are_skipped_with_the_reason(catalog, toys_dir):
    forced = Optimizations(cuda_graphs=True, attention="cudnn", fuse_qkv=True, channels_last_vae=True)
    engine = Engine(catalog, device="cpu", optimize=forced)
    engine.load(catalog.models["flux/dev"])
    report = engine.optimizations("flux/dev")
    assert report.get("cuda_graphs").status == "skipped" and "needs compile" in report.get("cuda_graphs").detail
    assert report.get("attention").status == "skipped" and "CUDA kernel" in report.get("attention").detail
    # flux/dev takes LoRAs: a fused projection would run without their layers
    assert report.get("fuse_qkv").status == "skipped" and "LoRA" in report.get("fuse_qkv").detail
    assert report.get("channels_last_vae").status == "applied"
    engine.load(catalog.models["wan/default"])
    assert engine.optimizations("wan/default").get("channels_last_vae").status == "skipped"  # a 3D VAE


def test_settings_override_the_catalog_per_switch(toys_dir):
    raw = toy_catalog_dict(toys_dir, small_formats=True)
    for entry in raw["models"]:
        if entry["model"] == "schnell":
            entry["optimize"] = {"text_cache": 8, "max_batch": 4}
    catalog = parse_catalog(raw, base_dir=toys_dir)
    engine = Engine(catalog, device="cpu", optimize=Optimizations(text_cache=0))
    spec = catalog.models["flux/schnell"]
    assert engine.switches(spec).text_cache == 0 and engine.max_batch(spec) == 4
    engine.generate(request())
    assert statuses(engine, "flux/schnell")["text_cache"] == "off"
    assert engine.load(spec).text_cache is None


# --- lossless switches: same output, and the path really ran -----------------------------------------


def test_fused_qkv_and_channels_last_vae_give_the_same_pixels(catalog, engine):
    fast = Engine(catalog, device="cpu", optimize=Optimizations(fuse_qkv=True, channels_last_vae=True))
    result = fast.generate(request())
    loaded = fast.load(catalog.models["flux/schnell"])
    transformer = loaded.pipelines["t2i"].transformer
    assert statuses(fast, "flux/schnell")["fuse_qkv"] == "applied"
    assert sum(1 for m in transformer.modules() if getattr(m, "fused_projections", False)) > 0
    conv = next(m for m in loaded.pipelines["t2i"].vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(pixels(result) - pixels(engine.generate(request()))).max() <= 1


def test_a_whole_compiled_transformer_runs_its_graph_and_matches_eager(catalog, engine, counting):
    compiled = Engine(catalog, device="cpu", optimize=Optimizations(compile="whole", compile_backend="kiln_counting"))
    result = compiled.generate(request())
    step = compiled.optimizations("flux/schnell").get("compile")
    assert step.status == "applied" and step.detail.startswith("whole") and "dynamic=False" in step.detail
    assert counting.graphs >= 1 and counting.calls >= 4  # at least one graph call per denoising step
    assert np.array_equal(pixels(result), pixels(engine.generate(request())))


def test_warm_up_compiles_every_shape_so_the_first_request_compiles_nothing(toys_dir, engine, counting):
    """Regional compilation: each repeated block is a graph, one per shape, all made at warm-up."""
    raw = toy_catalog_dict(toys_dir, small_formats=True)
    for entry in raw["models"]:
        if entry["model"] == "schnell":
            entry["formats"] = ["toy-64", "toy-96x64"]
            entry["optimize"] = {"compile": "regional", "compile_backend": "kiln_counting"}
    catalog = parse_catalog(raw, base_dir=toys_dir)
    eager = engine
    engine = Engine(catalog, device="cpu")
    runs = engine.warm_up(catalog.models["flux/schnell"])
    assert [(r.format, r.precision, r.batch) for r in runs] == [("toy-64", "native", 1), ("toy-96x64", "native", 1)]
    assert engine.optimizations("flux/schnell").get("compile").detail.startswith("regional (FluxTransformerBlock")
    graphs, calls = counting.graphs, counting.calls
    first = engine.generate(request(fmt="toy-96x64", seed=11))
    assert counting.graphs == graphs and counting.calls > calls  # compiled graphs ran; none was made now
    assert np.array_equal(pixels(first), pixels(eager.generate(request(fmt="toy-96x64", seed=11))))


def test_uncompiled_warm_up_runs_the_smallest_format_once(engine):
    runs = engine.warm_up(engine.catalog.models["flux/schnell"])
    assert [r.format for r in runs] == ["toy-64"] and runs[0].result.outputs


def test_inductor_compile_keeps_its_cache_on_disk_and_matches_eager(catalog, engine, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    compiled = Engine(catalog, device="cpu", optimize=Optimizations(compile="regional"), compile_cache_dir=tmp_path)
    try:
        result = compiled.generate(request("zimage", "turbo"))
    finally:
        torch._dynamo.reset()
    detail = compiled.optimizations("zimage/turbo").get("compile").detail
    assert "backend inductor" in detail and str(tmp_path / "inductor") in detail
    assert any((tmp_path / "inductor").rglob("*")), "inductor wrote nothing to the compile cache"
    assert np.abs(pixels(result) - pixels(engine.generate(request("zimage", "turbo")))).max() <= 2


def test_an_operator_chosen_inductor_cache_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert optimize.use_compile_cache(tmp_path / "settings") == str(tmp_path / "mine")


def test_compile_mode_follows_the_switches():
    assert optimize.compile_mode("inductor", cuda_graphs=True, autotune=False) == "reduce-overhead"
    assert optimize.compile_mode("inductor", cuda_graphs=True, autotune=True) == "max-autotune"
    assert optimize.compile_mode("inductor", cuda_graphs=False, autotune=True) == "max-autotune-no-cudagraphs"
    assert optimize.compile_mode("inductor", cuda_graphs=False, autotune=False) is None
    assert optimize.compile_mode("aot_eager", cuda_graphs=True, autotune=True) is None


def test_graph_outputs_are_copied_before_the_next_replay_can_overwrite_them():
    out = torch.ones(2, 3)
    copied = optimize.clone_tensors((out, [out], None))
    assert copied[0] is not out and copied[1][0] is not out and torch.equal(copied[0], out) and copied[2] is None


# --- text-encoder cache --------------------------------------------------------------------------------


def test_a_repeated_prompt_skips_the_text_encoders_and_gives_identical_pixels(catalog):
    engine = Engine(catalog, device="cpu")
    first = engine.generate(request(seed=3))
    loaded = engine.load(catalog.models["flux/schnell"])
    encoders = collections.Counter()
    pipe = loaded.pipelines["t2i"]
    hooks = [m.register_forward_hook(lambda *a, n=name: encoders.update([n]))
             for name, m in (("clip", pipe.text_encoder), ("t5", pipe.text_encoder_2))]
    try:
        again = engine.generate(request(seed=3))
        assert not encoders, "a repeated prompt ran the text encoders"
        engine.generate(request(seed=3, prompt="a green star at the top left"))
        assert encoders == {"clip": 1, "t5": 1}
    finally:
        for hook in hooks:
            hook.remove()
    assert np.array_equal(pixels(first), pixels(again))
    assert loaded.text_cache.hits >= 1 and loaded.text_cache.misses >= 2


class FakePipe:
    """``encode_prompt`` as the pipelines have it: text in, tensors out; counts real encodings."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode_prompt(self, prompt, device=None, num_images_per_prompt=1, prompt_embeds=None, max_sequence_length=512):
        if prompt_embeds is not None:
            return prompt_embeds, None
        self.encoded.append(prompt)
        return torch.full((num_images_per_prompt, 4, 8), float(len(prompt))), [torch.zeros(2)]


def test_cache_keys_on_every_text_argument_and_the_salt_and_bypasses_precomputed_embeddings():
    pipe, cache = FakePipe(), TextEncoderCache(max_entries=8, max_bytes=2**20)
    cache.install(pipe)
    cache.install(pipe)  # idempotent: one layer of caching
    a = pipe.encode_prompt("a cat", num_images_per_prompt=1)
    b = pipe.encode_prompt(prompt="a cat")
    assert pipe.encoded == ["a cat"] and a[0] is b[0] and a[1] is not b[1]  # same tensors, fresh containers
    pipe.encode_prompt("a cat", num_images_per_prompt=2)
    pipe.encode_prompt("a cat", max_sequence_length=256)
    with cache.scope(("lora", 1.0)):
        pipe.encode_prompt("a cat")
    assert pipe.encoded == ["a cat"] * 4
    pipe.encode_prompt("a cat", prompt_embeds=torch.zeros(1))
    assert cache.bypassed == 1 and len(cache) == 4


def test_cache_evicts_the_least_recently_used_by_entries_and_by_bytes():
    pipe, cache = FakePipe(), TextEncoderCache(max_entries=2, max_bytes=2**20)
    cache.install(pipe)
    for prompt in ("one", "two", "one", "three", "one", "two"):
        pipe.encode_prompt(prompt)
    assert pipe.encoded == ["one", "two", "three", "two"] and len(cache) == 2
    small = FakePipe()
    tiny = TextEncoderCache(max_entries=100, max_bytes=300)  # one entry is 4*8*4 + 2*4 = 136 bytes
    tiny.install(small)
    for prompt in ("one", "two", "three"):
        small.encode_prompt(prompt)
    assert len(tiny) == 2 and tiny.nbytes <= 300


# --- no host synchronisation in the denoising loop ------------------------------------------------------


@pytest.mark.parametrize(("family", "model", "fmt", "previews"), [
    ("flux", "schnell", "toy-64", False), ("zimage", "turbo", "toy-64", False), ("flux", "mini", "toy-64", False),
    ("flux", "schnell", "toy-64", True),
])
def test_the_denoising_loop_reads_no_tensor_back_to_the_host_without_previews(
    engine, family, model, fmt, previews, monkeypatch
):
    """``.item()``, ``.cpu()``, ``.tolist()`` or ``.numpy()`` inside the loop would make the host wait for the
    GPU at every step. On the CPU they are cheap but still visible: count them from the transformer's first
    call to the last step's callback. With previews each step reads its preview back (the spy sees it)."""
    spec = engine.catalog.resolve(family, model)
    transformer = engine.load(spec).pipelines["t2i"].transformer
    window = {"open": False}
    reads = collections.Counter()
    for name in ("item", "cpu", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if window["open"]:
                reads[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    hook = transformer.register_forward_pre_hook(lambda *a: window.update(open=True))

    def on_step(event):
        if event.step == event.total:
            window["open"] = False

    try:
        engine.generate(request(family, model, fmt=fmt, steps=spec.steps.min), on_step=on_step, previews=previews)
    finally:
        hook.remove()
    if previews:
        assert reads["cpu"] >= spec.steps.min
    else:
        assert not reads, f"{spec.key}: host reads inside the denoising loop: {dict(reads)}"


# --- fp8: offered only where the card can, refused with the reason elsewhere ---------------------------


@pytest.fixture
def card(monkeypatch):
    """Pretend the engine's CUDA device has ``card.capability`` and torchao is ``card.torchao``."""

    class Card:
        capability: tuple[int, int] | None = (9, 0)
        torchao = True

    monkeypatch.setattr(optimize, "cuda_capability", lambda device: Card.capability if device.type == "cuda" else None)
    monkeypatch.setattr(optimize, "torchao_available", lambda: Card.torchao)
    return Card


def test_fp8_is_listed_and_planned_only_on_a_card_of_compute_capability_8_9(catalog, card):
    engine = Engine(catalog, device="cuda")  # nothing is loaded: planning and listing only
    schnell = catalog.models["flux/schnell"]
    assert engine.precisions(schnell) == ["native", "fp8"]
    assert engine.plan(request(precision="fp8")).precision == "fp8"
    assert engine.precisions(catalog.models["flux/mini"]) == ["native"]  # its catalog entry offers no fp8
    card.capability = (8, 6)  # Ampere: no float8 tensor cores
    assert engine.precisions(schnell) == ["native"]
    with pytest.raises(InvalidParameters, match="compute capability 8.9") as refused:
        engine.plan(request(precision="fp8"))
    assert refused.value.code == "invalid_parameters" and refused.value.details["precisions"] == ["native"]
    card.capability, card.torchao = (9, 0), False
    with pytest.raises(InvalidParameters, match="torchao"):
        engine.plan(request(precision="fp8"))


def test_fp8_refusals_name_the_reason(catalog, engine):
    with pytest.raises(InvalidParameters, match="runs on cpu"):
        engine.plan(request(precision="fp8"))
    with pytest.raises(InvalidParameters, match="does not offer precision fp8.*flux/schnell"):
        engine.plan(request("flux", "mini", fmt="512", precision="fp8"))
    lora = {"sha256": "0" * 64, "weight": 1.0}
    with pytest.raises(InvalidParameters, match="LoRA"):
        engine.plan(request("flux", "dev", precision="fp8", loras=(lora,)))
    assert optimize.fp8_unavailable(torch.device("cuda"), (8, 9), torchao=True) is None
    assert optimize.fp8_unavailable(torch.device("cuda"), (12, 0), torchao=True) is None


def test_an_fp8_request_runs_a_quantized_copy_and_leaves_the_native_transformer_alone(catalog, engine, monkeypatch):
    """torchao and a float8 card are not here: a stand-in quantizer (weights rounded to bfloat16) proves the
    wiring: a second transformer, quantized, beside the native one, sharing everything else."""
    monkeypatch.setattr(optimize, "fp8_unavailable", lambda *args: None)
    quantized: list[torch.nn.Module] = []

    def round_to_bf16(transformer):
        quantized.append(transformer)
        linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for layer in linears:
                layer.weight.copy_(layer.weight.to(torch.bfloat16).float())
        return len(linears)

    fp8_engine = Engine(catalog, device="cpu")
    fp8_engine.quantize_fp8 = round_to_bf16
    native = fp8_engine.generate(request())
    assert fp8_engine.precisions(catalog.models["flux/schnell"]) == ["native", "fp8"]
    lossy = fp8_engine.generate(request(precision="fp8"))
    assert (native.precision, lossy.precision) == ("native", "fp8")
    loaded = fp8_engine.load(catalog.models["flux/schnell"])
    native_pipe, fp8_pipe = loaded.pipelines["t2i"], loaded.pipelines_for("fp8")["t2i"]
    assert quantized == [fp8_pipe.transformer] and fp8_pipe.transformer is not native_pipe.transformer
    assert fp8_pipe.vae is native_pipe.vae and fp8_pipe.text_encoder_2 is native_pipe.text_encoder_2
    assert loaded.pipelines_for("fp8")["i2i"].transformer is fp8_pipe.transformer
    assert loaded.report.get("fp8 quantize").status == "applied"
    assert np.array_equal(pixels(fp8_engine.generate(request())), pixels(native))  # native is untouched
    assert np.array_equal(pixels(native), pixels(engine.generate(request())))
    assert np.abs(pixels(lossy) - pixels(native)).mean() < 8  # close, as a lossy precision is


# --- settings ----------------------------------------------------------------------------------------


def test_settings_take_switches_as_a_table_or_as_pairs_and_name_a_bad_one():
    from kiln.settings import SettingsError, load_settings

    settings = load_settings(environ={"KILN_OPTIMIZE": "compile=off, fuse_qkv=false,text_cache=0"})
    assert settings.optimize == Optimizations(compile="off", fuse_qkv=False, text_cache=0)
    with pytest.raises(SettingsError, match="KILN_OPTIMIZE=speed=1: unknown setting 'optimize.speed'"):
        load_settings(environ={"KILN_OPTIMIZE": "speed=1"})
    with pytest.raises(SettingsError, match="NAME=VALUE"):
        load_settings(environ={"KILN_OPTIMIZE": "fast"})
    with pytest.raises(SettingsError, match="'off', 'regional' or 'whole'"):
        load_settings(environ={"KILN_OPTIMIZE": "compile=always"})


def test_the_server_hands_the_settings_switches_and_compile_cache_to_its_engine(catalog_file, tmp_path):
    from kiln.server import build_runtime
    from kiln.settings import load_settings

    settings = load_settings({"data_dir": tmp_path, "catalog": catalog_file, "optimize": "text_cache=0"}, environ={})
    runtime = build_runtime(settings)
    try:
        engine = runtime.services.validate.__self__  # the engine whose plan validates requests
        assert engine.overrides == Optimizations(text_cache=0)
        assert engine.compile_cache_dir == tmp_path / "compile-cache"
    finally:
        runtime.services.store.close()
