"""Load, then optimize, then warm up: the engine's speed switches and the record of what each did.

Each switch is set per model in the catalog (``optimize = {...}``) and may be overridden for every
model by the settings' ``optimize``; one left unset takes its default for the device. :func:`optimize`
applies them to a freshly loaded model and returns a :class:`Report` with one :class:`Step` per switch:
``applied``, ``off`` (switched off, or off by default on this device) or ``skipped`` (asked for, or on
by default, but it cannot apply here; the detail says why). Nothing is silently ignored.

=================  ==================================================  =====================================
switch             default                                             what it does
=================  ==================================================  =====================================
compile            CUDA: ``regional`` where the transformer names its  ``torch.compile(dynamic=False)`` of
                   repeated blocks, else ``whole``; CPU: off           the transformer: one graph per shape;
                                                                       inductor's cache on disk (below)
cuda_graphs        CUDA, where compile is ``whole``                    mode ``reduce-overhead`` (or
                                                                       ``max-autotune`` with autotune)
autotune           off                                                 inductor ``max-autotune``
fuse_qkv           CUDA, where the attention supports it and the       one matmul for Q, K and V
                   model takes no LoRAs
channels_last_vae  CUDA, image VAEs                                    NHWC convolutions in the VAE
attention          CUDA, bf16/fp16, unmasked attention: cuDNN SDPA     the SDPA kernel (diffusers'
                   on compute capability >= 9.0, flash SDPA on 8.x;    attention dispatcher)
                   otherwise PyTorch's own choice
text_cache         256 prompts, 1024 MB, on every device               :mod:`kiln.engine.text_cache`
fp8                off (lossy: an explicit precision)                  requests may ask ``precision=fp8``
max_batch          1                                                   :mod:`kiln.engine.batch`
=================  ==================================================  =====================================

Lossless means the same function, not the same bits: fused projections, other attention kernels and
compiled graphs round differently in the last places (the tests on toy checkpoints and
``bench/gpu.py`` bound the difference). fp8 is lossy and is therefore a precision a request names,
offered only where :func:`fp8_unavailable` finds no reason against it (a CUDA card of compute
capability >= 8.9 and torchao installed); its transformer is a second copy, loaded from the checkpoint
and quantized (torchao float8 dynamic activations and weights, rowwise), beside the native one.

The compile cache: inductor writes what it compiled under ``TORCHINDUCTOR_CACHE_DIR`` (and Triton
under ``TRITON_CACHE_DIR``); :func:`use_compile_cache` points both at the settings' ``compile_cache``
unless the operator set them, so a restart finds the kernels on disk and only traces again. With
``dynamic=False`` every shape (format x batch size) is a graph of its own; the engine's warm-up runs
them all before the first request (:meth:`kiln.engine.Engine.warm_up`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kiln.catalog.schema import ModelSpec, Optimizations

log = logging.getLogger(__name__)

Status = Literal["applied", "off", "skipped"]
Quantizer = Callable[[torch.nn.Module], int]  # quantizes a transformer in place, returns the layers it changed

DEFAULT_TEXT_CACHE = 256
DEFAULT_TEXT_CACHE_MB = 1024
# dynamo recompiles a function once per new shape (dynamic=False): formats x batch sizes x precisions.
# Its default limit (8) would silently fall back to eager code after the eighth shape.
RECOMPILE_LIMIT = 64
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first with float8 tensor cores (torch._scaled_mm)

# The catalog's attention names -> diffusers' attention dispatcher backends (PyTorch's own kernels).
ATTENTION_BACKENDS = {
    "native": "native",
    "cudnn": "_native_cudnn",
    "flash": "_native_flash",
    "efficient": "_native_efficient",
    "math": "_native_math",
}


@dataclass(frozen=True)
class Step:
    """What one switch did for one model."""

    name: str
    status: Status
    detail: str = ""


@dataclass
class Report:
    """The optimisation record of one loaded model (and of its fp8 transformer, once built)."""

    steps: list[Step] = field(default_factory=list)

    def add(self, name: str, status: Status, detail: str = "") -> Step:
        step = Step(name, status, detail)
        self.steps = [s for s in self.steps if s.name != name] + [step]
        return step

    def get(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    def status(self, name: str) -> Status | None:
        step = self.get(name)
        return step.status if step is not None else None

    def applied(self, name: str) -> bool:
        return self.status(name) == "applied"

    def as_dict(self) -> dict[str, dict[str, str]]:
        """``{"compile": {"status": "applied", "detail": "..."}, ...}``: for ``/models`` and logs."""
        return {s.name: {"status": s.status, "detail": s.detail} for s in self.steps}

    def summary(self) -> str:
        return "; ".join(f"{s.name} {s.status}" + (f" ({s.detail})" if s.detail else "") for s in self.steps)


# --- decisions -------------------------------------------------------------------------------------


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of ``device``, or None when it is not a CUDA device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def fp8_unavailable(device: torch.device, capability: tuple[int, int] | None, torchao: bool) -> str | None:
    """Why precision fp8 cannot run here, or None when it can.

    float8 matrix products need tensor cores that have them (compute capability 8.9: Ada, Hopper and
    later) and torchao's float8 quantization.
    """
    if device.type != "cuda" or capability is None:
        return f"fp8 needs a CUDA GPU of compute capability {_cap(FP8_MIN_CAPABILITY)} or later; this server runs on {device.type}"
    if tuple(capability) < FP8_MIN_CAPABILITY:
        return (f"fp8 needs a GPU of compute capability {_cap(FP8_MIN_CAPABILITY)} or later (Ada, Hopper); this one "
                f"is {_cap(capability)}")
    if not torchao:
        return "fp8 needs the torchao package, which is not installed on this server"
    return None


def compile_mode(backend: str, cuda_graphs: bool, autotune: bool) -> str | None:
    """torch.compile's ``mode`` for these switches (inductor's modes; other backends take none)."""
    if backend != "inductor":
        return None
    if cuda_graphs:
        return "max-autotune" if autotune else "reduce-overhead"
    return "max-autotune-no-cudagraphs" if autotune else None


def _cap(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


# --- applying them ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What the switches are decided from: the model, its merged switches, where and how it runs."""

    spec: ModelSpec
    switches: Optimizations
    device: torch.device
    dtype: torch.dtype
    attention_masked: bool  # the architecture passes attention masks (Z-Image's padded captions)
    image_vae: bool  # a 2D VAE (channels_last applies); WAN's is 3D
    compile_cache: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def optimize_transformer(
    transformer: Any, ctx: Context, report: Report, *, prefix: str = "", quantize: Quantizer | None = None
) -> None:
    """Fuse, quantize (the fp8 copy), choose the attention kernel, then compile ``transformer`` in place,
    in this order: the fused projection is one more linear layer to quantize, and a compiled graph
    captures the module as it is. ``prefix`` names the steps of a second copy (``fp8 ``)."""
    _fuse_qkv(transformer, ctx, report, prefix)
    if quantize is not None:
        count = quantize(transformer)
        report.add(prefix + "quantize", "applied", f"{count} linear layers: float8 dynamic activations and "
                                                   "weights, rowwise scales")
    _attention(transformer, ctx, report, prefix)
    _compile(transformer, ctx, report, prefix)


def optimize_vae(vae: Any, ctx: Context, report: Report) -> None:
    wanted = ctx.switches.channels_last_vae
    if wanted is False or (wanted is None and not ctx.cuda):
        report.add("channels_last_vae", "off", "" if wanted is False else "default on CUDA only")
        return
    if not ctx.image_vae:
        report.add("channels_last_vae", "skipped" if wanted else "off", "a 3D (video) VAE has no channels-last 2D layout")
        return
    vae.to(memory_format=torch.channels_last)
    report.add("channels_last_vae", "applied")


def text_cache_size(switches: Optimizations) -> tuple[int, int]:
    """(entries, bytes) of the text-encoder cache; 0 entries: off."""
    entries = DEFAULT_TEXT_CACHE if switches.text_cache is None else switches.text_cache
    megabytes = DEFAULT_TEXT_CACHE_MB if switches.text_cache_mb is None else switches.text_cache_mb
    return entries, megabytes * 2**20


def _fuse_qkv(transformer: Any, ctx: Context, report: Report, prefix: str) -> None:
    name = prefix + "fuse_qkv"
    wanted = ctx.switches.fuse_qkv
    miss: Status = "skipped" if wanted else "off"
    if wanted is False or (wanted is None and not ctx.cuda):
        report.add(name, "off", "" if wanted is False else "default on CUDA only")
        return
    if ctx.spec.lora:
        # diffusers' LoRA layers wrap to_q/to_k/to_v; the fused to_qkv would run without them.
        report.add(name, miss, "the model takes LoRAs, whose layers are the unfused Q, K, V projections")
        return
    if not hasattr(transformer, "fuse_qkv_projections"):
        report.add(name, miss, f"diffusers' {type(transformer).__name__} has no fused QKV projections")
        return
    try:
        transformer.fuse_qkv_projections()
    except ValueError as exc:  # attention with added KV projections
        report.add(name, miss, str(exc))
        return
    fused = sum(1 for m in transformer.modules() if getattr(m, "fused_projections", False))
    if fused == 0:
        report.add(name, miss, f"no attention module of {type(transformer).__name__} supports fusion")
        return
    report.add(name, "applied", f"{fused} attention modules")


def _attention(transformer: Any, ctx: Context, report: Report, prefix: str) -> None:
    name = prefix + "attention"
    wanted = ctx.switches.attention or "auto"
    if wanted == "auto":
        choice = _auto_attention(ctx)
        if choice is None:
            report.add(name, "off", _auto_attention_reason(ctx))
            return
    else:
        reason = _attention_refusal(wanted, ctx)
        if reason is not None:
            report.add(name, "skipped", reason)
            return
        choice = wanted
    if not hasattr(transformer, "set_attention_backend"):
        report.add(name, "skipped", f"diffusers' {type(transformer).__name__} does not dispatch its attention")
        return
    _set_attention_backend(transformer, ATTENTION_BACKENDS[choice])
    report.add(name, "applied", f"{choice} ({ATTENTION_BACKENDS[choice]})")


def _auto_attention(ctx: Context) -> str | None:
    capability = cuda_capability(ctx.device)
    if capability is None or ctx.dtype not in (torch.bfloat16, torch.float16) or ctx.attention_masked:
        return None
    if capability >= (9, 0):
        return "cudnn"  # on Hopper, cuDNN's fused attention is PyTorch's fastest SDPA kernel
    if capability >= (8, 0):
        return "flash"
    return None


def _auto_attention_reason(ctx: Context) -> str:
    if not ctx.cuda:
        return f"on {ctx.device.type} PyTorch's SDPA chooses its kernel itself"
    if ctx.dtype not in (torch.bfloat16, torch.float16):
        return f"{str(ctx.dtype).removeprefix('torch.')} weights: PyTorch's own SDPA choice"
    if ctx.attention_masked:
        return "the architecture masks its attention: PyTorch's own SDPA choice"
    return "a GPU older than compute capability 8.0: PyTorch's own SDPA choice"


def _attention_refusal(choice: str, ctx: Context) -> str | None:
    if choice in ("native", "math"):
        return None
    if not ctx.cuda:
        return f"{choice} SDPA is a CUDA kernel; this model runs on {ctx.device.type}"
    if choice in ("flash", "cudnn") and ctx.dtype not in (torch.bfloat16, torch.float16):
        return f"{choice} SDPA takes bfloat16 or float16; this model runs {str(ctx.dtype).removeprefix('torch.')}"
    if choice == "flash" and ctx.attention_masked:
        return "flash SDPA takes no attention mask, and this architecture masks its attention"
    return None


def _set_attention_backend(transformer: Any, backend: str) -> None:
    """Set ``backend`` on the transformer's attention processors only.

    diffusers' ``set_attention_backend`` also makes it the process-wide default for every model whose
    processors name none; the previous default is put back so that one model's choice stays its own.
    """
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry.get_active_backend()
    try:
        transformer.set_attention_backend(backend)
    finally:
        previous_name = previous[0] if isinstance(previous, tuple) else previous
        _AttentionBackendRegistry.set_active_backend(previous_name)


def _compile(transformer: Any, ctx: Context, report: Report, prefix: str) -> None:
    name = prefix + "compile"
    sw = ctx.switches
    how = sw.compile or ("regional" if ctx.cuda else "off")
    graphs_name = prefix + "cuda_graphs"
    if how == "off":
        report.add(name, "off", "" if sw.compile == "off" else "default on CUDA only")
        report.add(graphs_name, "skipped" if sw.cuda_graphs else "off", "needs compile")
        return
    note = ""
    if how == "regional" and not getattr(transformer, "_repeated_blocks", None):
        how = "whole"
        note = f"; {type(transformer).__name__} names no repeated blocks"
    backend = sw.compile_backend or "inductor"
    graphs = _cuda_graphs(how, ctx, report, graphs_name)
    mode = compile_mode(backend, graphs, bool(sw.autotune))
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": False}
    if mode is not None:
        kwargs["mode"] = mode
    cache = use_compile_cache(ctx.compile_cache) if backend == "inductor" else None
    _raise_recompile_limit()
    if how == "regional":
        transformer.compile_repeated_blocks(fullgraph=True, **kwargs)
        blocks = ", ".join(transformer._repeated_blocks)
        detail = f"regional ({blocks})"
    else:
        # The forward alone (an instance attribute), not nn.Module.compile: hooks then run outside the
        # graph, where the CUDA-graph step marker and output copy below belong.
        transformer.forward = torch.compile(transformer.forward, fullgraph=False, **kwargs)
        if graphs:
            _graph_safe_outputs(transformer)
        detail = "whole"
    detail += f", backend {backend}, mode {mode or 'default'}, dynamic=False" + note
    if cache is not None:
        detail += f", cache {cache}"
    report.add(name, "applied", detail)


def _cuda_graphs(how: str, ctx: Context, report: Report, name: str) -> bool:
    wanted = ctx.switches.cuda_graphs
    if wanted is False:
        report.add(name, "off")
        return False
    miss: Status = "skipped" if wanted else "off"
    if not ctx.cuda:
        report.add(name, miss, "CUDA graphs need a CUDA device")
        return False
    if how != "whole":
        # Every repeated block is one compiled function whose weights sit at other addresses in each
        # layer: CUDA-graph trees would record a graph per layer and call.
        report.add(name, miss, "needs compile = whole")
        return False
    if (ctx.switches.compile_backend or "inductor") != "inductor":
        report.add(name, miss, "CUDA graphs are an inductor mode")
        return False
    report.add(name, "applied", "one graph per shape, recorded at warm-up")
    return True


def _graph_safe_outputs(transformer: Any) -> None:
    """A CUDA graph's outputs live in its memory pool and the next replay overwrites them; FLUX's true
    CFG holds the first pass's output across the second. Each call therefore starts a new graph step
    and hands back copies (one latent-sized copy per call)."""

    def before(module: Any, args: Any, kwargs: Any) -> None:
        torch.compiler.cudagraph_mark_step_begin()

    def after(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        return clone_tensors(output)

    transformer.register_forward_pre_hook(before, with_kwargs=True)
    transformer.register_forward_hook(after, with_kwargs=True)


def clone_tensors(value: Any) -> Any:
    """``value`` with every tensor in it (in tuples, lists and diffusers output objects) copied."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(clone_tensors(v) for v in value)
    if isinstance(value, list):
        return [clone_tensors(v) for v in value]
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # diffusers BaseOutput (an OrderedDict)
        for key in list(value.keys()):
            value[key] = clone_tensors(value[key])
        return value
    return value


def use_compile_cache(directory: Path | None) -> str:
    """Point inductor's and Triton's caches at ``directory`` unless the operator chose others (their
    environment variables), and return inductor's cache directory.

    torch writes its default (a folder under /tmp, gone after a reboot) into the environment the first
    time it asks for the directory, so a value equal to that default counts as unchosen.
    """
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    if directory is not None:
        directory = Path(directory).expanduser().resolve()
        current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory / "inductor")
        os.environ.setdefault("TRITON_CACHE_DIR", str(directory / "triton"))
    return cache_dir()


def _raise_recompile_limit() -> None:
    import torch._dynamo.config as dynamo

    for name, minimum in (("recompile_limit", RECOMPILE_LIMIT), ("accumulated_recompile_limit", 8 * RECOMPILE_LIMIT)):
        if hasattr(dynamo, name) and getattr(dynamo, name) < minimum:
            setattr(dynamo, name, minimum)


# --- fp8 -------------------------------------------------------------------------------------------


def quantize_fp8(transformer: torch.nn.Module) -> int:
    """Quantize ``transformer``'s linear layers in place with torchao float8 dynamic activations and
    weights, one scale per row; return how many. Layers whose sides are not multiples of 16 (what
    ``torch._scaled_mm`` takes) stay as they are."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def eligible(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    count = sum(1 for m in transformer.modules() if eligible(m, ""))
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=eligible)
    return count

