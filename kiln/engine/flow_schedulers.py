"""Kiln's flow-matching schedulers: Euler, ancestral Euler, DPM-Solver++(2M) and Heun.

All subclass diffusers' ``FlowMatchEulerDiscreteScheduler``, so every pipeline that drives that
class (``sigmas`` and ``mu`` in ``set_timesteps``, ``scale_noise`` and ``set_begin_index`` for
img2img) drives these too. Which one a request gets is decided by the table in
:mod:`kiln.engine.samplers`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchEulerDiscreteSchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor

__all__ = [
    "KilnFlowMatchDPMSolverPP2MScheduler",
    "KilnFlowMatchEulerAncestralScheduler",
    "KilnFlowMatchEulerScheduler",
    "KilnFlowMatchHeunScheduler",
]


class KilnFlowMatchEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler: diffusers' ``FlowMatchEulerDiscreteScheduler`` with one change.

    When a pipeline passes only a step count (WAN's ``set_timesteps(n, device=...)``), the sigmas
    are ``linspace(1, 1/n, n)`` before the shift, the grid the FLUX and Z-Image pipelines pass
    explicitly and the one WAN's UniPC scheduler uses, instead of the parent's
    ``linspace(1, shift(1/1000), n)`` (which shifts the last sigma twice). The base class of every
    kiln scheduler; subclasses reset their per-run state in :meth:`_reset_state`.
    """

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | np.ndarray | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        if sigmas is None and timesteps is None and num_inference_steps is not None:
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self._after_set_timesteps()

    def _after_set_timesteps(self) -> None:
        # A host copy of the sigmas (float64) so that the steps' scalar arithmetic never syncs
        # with the device.
        self._sigma_values: list[float] = self.sigmas.detach().to("cpu", torch.float64).tolist()
        self._reset_state()

    def _reset_state(self) -> None:
        """Forget everything a previous run left behind (history, noise generators)."""

    # Helpers for the subclasses' steps.
    def _begin_step(self, timestep: Any, per_token_timesteps: Any) -> tuple[float, float]:
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not torch.is_floating_point(timestep)):
            raise ValueError(
                f"Pass one of `scheduler.timesteps` to `{type(self).__name__}.step()`, not an integer index."
            )
        if per_token_timesteps is not None:
            raise NotImplementedError(f"{type(self).__name__} does not take per_token_timesteps")
        if self.step_index is None:
            self._init_step_index(timestep)
        k = self.step_index
        return self._sigma_values[k], self._sigma_values[k + 1]

    def _finish_step(self, prev_sample: torch.Tensor, model_output: torch.Tensor, return_dict: bool):
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


def _noise_seed(tag: str, seed: int) -> int:
    """A seed for the sampler's own noise, unrelated to the one that drew the initial latents."""
    digest = hashlib.blake2b(f"kiln/{tag}/{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _content_seed(tag: str, row: torch.Tensor) -> int:
    data = row.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    digest = hashlib.blake2b(data, digest_size=8, person=tag.encode()[:16]).digest()
    return int.from_bytes(digest, "little") >> 1


class KilnFlowMatchEulerAncestralScheduler(KilnFlowMatchEulerScheduler):
    """Ancestral ("Euler a") flow-matching sampler, eta = 1.

    From ``σ`` to ``σ_next``: Euler down to ``σ_down = σ_next·(1 + (σ_next/σ - 1)·eta)``
    (``σ_next²/σ`` at eta = 1), scale the signal from ``1 - σ_down`` to ``1 - σ_next``, then add
    fresh noise of std ``sqrt(σ_next² - (σ_down·(1 - σ_next)/(1 - σ_down))²)`` so the sample is back
    on the ``σ_next`` marginal. ``eta = 0`` would be plain Euler; diffusers' own
    ``stochastic_sampling=True`` is the other extreme (``σ_down = 0``: jump to ``x0`` and re-noise
    completely, as LCM does), which throws away all of the trajectory's noise at every step.

    Where the noise comes from, first match wins (never from torch's global generator, which is
    shared between threads and which the pipelines do not seed):

    1. a ``generator`` passed to :meth:`step` (diffusers 0.42.1's FLUX, FLUX.2, Z-Image and WAN
       pipelines never pass one);
    2. seeds given to :meth:`set_noise_seeds` (or ``make_scheduler(..., seeds=...)``): one int for
       the whole batch, or one per batch row (then row *i*'s noise depends only on seed *i*);
    3. otherwise one seed per batch row hashed from that row of the first sample the run steps,
       i.e. from the initial latents, which the pipeline drew from the request's generator(s):
       the same seed gives the same picture, another seed another picture, with no plumbing.

    Each run (``set_timesteps``) restarts the noise streams, so a scheduler can be run twice with
    the same result. Noise is drawn on the CPU in float32 and moved to the sample's device, so it
    is the same on every device.
    """

    eta: float = 1.0

    def set_noise_seeds(self, seeds: int | Sequence[int] | None) -> None:
        """Seed the ancestral noise: one int for the whole batch, one per batch row, or None."""
        if seeds is not None and not isinstance(seeds, int):
            seeds = [int(s) for s in seeds]
        self._noise_seeds = seeds
        self._generators = None

    def _reset_state(self) -> None:
        self._generators: list[torch.Generator] | torch.Generator | None = None

    def _noise(self, sample: torch.Tensor, generator: Any) -> torch.Tensor:
        if generator is not None:
            return randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        if self._generators is None:
            seeds = getattr(self, "_noise_seeds", None)
            if isinstance(seeds, int):
                self._generators = torch.Generator("cpu").manual_seed(_noise_seed("euler_a", seeds))
            else:
                if seeds is None:
                    seeds = [_content_seed("euler_a", row) for row in sample]
                else:
                    seeds = [_noise_seed("euler_a", s) for s in seeds]
                if len(seeds) != sample.shape[0]:
                    raise ValueError(f"{len(seeds)} noise seeds for a batch of {sample.shape[0]}")
                self._generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        if isinstance(self._generators, torch.Generator):
            noise = torch.randn(sample.shape, generator=self._generators, dtype=torch.float32)
        else:
            noise = torch.cat(
                [torch.randn((1, *sample.shape[1:]), generator=g, dtype=torch.float32) for g in self._generators]
            )
        return noise.to(sample.device)

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        sigma, sigma_next = self._begin_step(timestep, per_token_timesteps)
        x = sample.to(torch.float32)
        x0 = x - sigma * model_output.to(torch.float32)
        if sigma_next <= 0.0:
            prev_sample = x0
        else:
            sigma_down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * self.eta)
            alpha_next, alpha_down = 1.0 - sigma_next, 1.0 - sigma_down
            ratio = sigma_down / sigma
            x_down = ratio * x + (1.0 - ratio) * x0
            renoise = math.sqrt(max(sigma_next**2 - (sigma_down * alpha_next / alpha_down) ** 2, 0.0))
            prev_sample = (alpha_next / alpha_down) * x_down
            if renoise > 0.0:
                prev_sample = prev_sample + (s_noise * renoise) * self._noise(x, generator)
        return self._finish_step(prev_sample, model_output, return_dict)


class KilnFlowMatchDPMSolverPP2MScheduler(KilnFlowMatchEulerScheduler):
    """DPM-Solver++(2M) for flow matching (multistep, data prediction, one model call per step).

    With ``α = 1 - σ``, ``λ = log(α/σ)``, ``h = λ_next - λ`` and ``x0 = x - σ·v``::

        x_next = (σ_next/σ)·x + (α_next - α·σ_next/σ)·D        # α_next·(1 - e^-h) = α_next - α·σ_next/σ
        D = x0                                                  # first order: no history, or it was at σ = 1
        D = (1 + 1/(2r))·x0 - 1/(2r)·x0_prev,  r = h_prev/h     # second order
        x_next = x0                                             # last step (σ_next = 0)

    The first-order step is the Euler step. Nothing is a log of 0 (σ = 1 only ever appears as the
    first sigma, where the step is first order) or a division by 0.
    """

    def _reset_state(self) -> None:
        self._prev_x0: torch.Tensor | None = None
        self._prev_sigma: float | None = None

    @staticmethod
    def _lambda(sigma: float) -> float:
        return math.log((1.0 - sigma) / sigma)

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        sigma, sigma_next = self._begin_step(timestep, per_token_timesteps)
        x = sample.to(torch.float32)
        x0 = x - sigma * model_output.to(torch.float32)
        if sigma_next <= 0.0:
            prev_sample = x0
        else:
            ratio = sigma_next / sigma
            coeff = (1.0 - sigma_next) - (1.0 - sigma) * ratio
            denoised = x0
            prev_sigma = self._prev_sigma
            if self._prev_x0 is not None and prev_sigma is not None and 0.0 < prev_sigma < 1.0 and sigma < 1.0:
                h = self._lambda(sigma_next) - self._lambda(sigma)
                h_prev = self._lambda(sigma) - self._lambda(prev_sigma)
                if h > 0.0 and h_prev > 0.0:
                    c = 1.0 / (2.0 * (h_prev / h))
                    denoised = (1.0 + c) * x0 - c * self._prev_x0
            prev_sample = ratio * x + coeff * denoised
        self._prev_x0, self._prev_sigma = x0, sigma
        return self._finish_step(prev_sample, model_output, return_dict)


class KilnFlowMatchHeunScheduler(KilnFlowMatchEulerScheduler):
    """Heun's method for flow matching: ``order = 2``, ``2n - 1`` model calls for ``n`` steps.

    ``set_timesteps`` computes the n sigmas exactly as the parent does (``sigmas``/``mu``, shift,
    karras/beta spacing), then repeats every sigma after the first, so the pipeline's loop sees
    ``[t0, t1, t1, t2, t2, ..., t(n-1), t(n-1)]``: the even slots are Euler predictor calls, the odd
    ones the corrector call at the predicted point (``x_next = x + dt·(v1 + v2)/2``). The last step
    (to σ = 0) is a plain Euler step: there is no velocity at σ = 0.

    ``set_begin_index`` takes slot indices, ``t_start * order`` as the img2img pipelines pass, and
    ``scale_noise`` then uses the sigma of step ``t_start``. See :func:`pipeline_strength` for the
    strength to give those pipelines.
    """

    order = 2

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | np.ndarray | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        ts, sig = self.timesteps, self.sigmas
        self.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
        self.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
        self._after_set_timesteps()

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index % 2:
            raise ValueError(f"{type(self).__name__} begins on an even slot (t_start * order), not {begin_index}")
        super().set_begin_index(begin_index)

    def _reset_state(self) -> None:
        self._pending: tuple[torch.Tensor, torch.Tensor, float] | None = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call is a step's first (predictor) call: the last step is complete."""
        return self._pending is None

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        sigma, sigma_next = self._begin_step(timestep, per_token_timesteps)
        v = model_output.to(torch.float32)
        if self._pending is None:
            x = sample.to(torch.float32)
            dt = sigma_next - sigma
            prev_sample = x + dt * v
            if sigma_next > 0.0:
                self._pending = (x, v, dt)
        else:
            x, v_first, dt = self._pending
            self._pending = None
            prev_sample = x + (0.5 * dt) * (v_first + v)
        return self._finish_step(prev_sample, model_output, return_dict)


