"""What bench/gpu.py measures with: per-stage clocks inside a pipeline call, the transformer's FLOPs,
the cards' dense peak rates, host synchronisations in the denoising loop, and the GPU's description.

Stages of one pipeline call (the clock wraps the pipeline's own methods on the instance, so the same
code measures plain diffusers and Kiln's optimized pipelines):

- ``text``: ``pipe.encode_prompt`` (every call: FLUX encodes the negative prompt too under true CFG);
- ``denoise``: from the transformer's first call to the start of the VAE decode (the loop);
- ``decode``: ``pipe.vae.decode``;
- ``postprocess``: ``pipe.image_processor.postprocess`` (tensor -> PIL);

each closed with ``torch.cuda.synchronize()`` on a GPU (a handful per call, none inside the loop).
What a call spends outside these (preparing latents and the schedule, Kiln's planning) is the caller's
total minus their sum.
"""

from __future__ import annotations

import functools
import subprocess
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

STAGES = ("text", "denoise", "decode", "postprocess")

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets: (bf16, fp8). Matched
# against torch.cuda.get_device_name() in order; the floor is FLOPs / peak.
PEAKS: list[tuple[str, float, float | None]] = [
    ("H200", 989.4, 1978.9),
    ("H100 NVL", 835.0, 1671.0),
    ("H100 PCIe", 756.0, 1513.0),
    ("H100", 989.4, 1978.9),  # SXM5 (H100 80GB HBM3)
    ("B200", 2250.0, 4500.0),
    ("L40S", 362.1, 733.0),
    ("A100", 312.0, None),
]


def peak_tflops(device_name: str) -> tuple[float | None, float | None]:
    for needle, bf16, fp8 in PEAKS:
        if needle in device_name:
            return bf16, fp8
    return None, None


def gpu_info() -> dict[str, Any] | None:
    """The GPU, its driver and the CUDA stack, or None without one."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    driver = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "name": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "memory_bytes": props.total_memory,
        "multiprocessors": props.multi_processor_count,
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Times the stages of each call of one pipeline; optionally counts host syncs in the loop.

    ``start()`` before a call, ``stop()`` after it returns the stage times in ms for that call.
    """

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe, self.device = pipe, device
        self.times: dict[str, float] = {}
        self._loop_started: float | None = None
        self.watch_syncs = False
        self.syncs: list[str] = []
        self._undo: list[Callable[[], None]] = []
        self._wrap(pipe, "encode_prompt", "text")
        self._wrap(pipe.vae, "decode", "decode", before=self._loop_end)
        self._wrap(pipe.image_processor, "postprocess", "postprocess")
        hook = pipe.transformer.register_forward_pre_hook(lambda *a: self._loop_start())
        self._undo.append(hook.remove)

    def _wrap(self, owner: Any, name: str, stage: str, before: Callable[[], None] | None = None) -> None:
        original = getattr(owner, name)
        had_own = name in vars(owner)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before()
            sync(self.device)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(self.device)
                self.times[stage] = self.times.get(stage, 0.0) + (time.perf_counter() - started) * 1000

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original) if had_own else delattr(owner, name))

    def _loop_start(self) -> None:
        if self._loop_started is None:
            sync(self.device)
            self._loop_started = time.perf_counter()
            if self.watch_syncs and self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")

    def _loop_end(self) -> None:
        if self._loop_started is not None:
            if self.watch_syncs and self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            sync(self.device)
            self.times["denoise"] = self.times.get("denoise", 0.0) + (time.perf_counter() - self._loop_started) * 1000
            self._loop_started = None

    def start(self) -> None:
        self.times = {}
        self._loop_started = None

    def stop(self) -> dict[str, float]:
        self._loop_end()  # output_type="latent" returns without a decode
        return {stage: self.times.get(stage, 0.0) for stage in STAGES}

    def count_loop_syncs(self, call: Callable[[], Any]) -> list[str]:
        """Run ``call`` with CUDA's sync debug mode on inside the denoising loop; the warnings it gave
        (each a host synchronisation). Empty on a CPU, where there is nothing to wait for."""
        self.watch_syncs = True
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.start()
                call()
                self.stop()
        finally:
            self.watch_syncs = False
            if self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


class FlopCount:
    """Counts the FLOPs of every transformer call (``torch.utils.flop_counter``) while installed."""

    def __init__(self, transformer: Any) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self.per_call: list[int] = []
        self.transformer = transformer
        original = transformer.forward

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            with FlopCounterMode(display=False) as counter:
                out = original(*args, **kwargs)
            self.per_call.append(counter.get_total_flops())
            return out

        transformer.forward = counted

    def remove(self) -> None:
        del self.transformer.forward  # the class's forward again

    @property
    def total(self) -> int:
        return sum(self.per_call)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64).clamp_min(1e-30))
