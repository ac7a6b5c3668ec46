"""Samplers and schedulers: which diffusers scheduler runs a (sampler, scheduler) pair.

Every model kiln serves is a rectified-flow (flow-matching) model: ``x_t = (1 - σ)·x0 + σ·ε``, the
network predicts the velocity ``v = ε - x0``, so ``x0 = x_t - σ·v``. Every scheduler here is a
subclass of diffusers' ``FlowMatchEulerDiscreteScheduler``, so it takes ``sigmas`` and ``mu`` in
``set_timesteps`` (the FLUX, FLUX.2 and Z-Image pipelines pass both), ``set_timesteps(n)`` alone
(the WAN pipelines), and ``scale_noise`` / ``set_begin_index`` (the img2img and inpaint pipelines).
The checkpoint's own scheduler config supplies the shift: FLUX-style dynamic shifting (``mu`` from
the image size) is kept, a static ``shift`` (Z-Image) is kept, and WAN's ``UniPCMultistepScheduler``
``flow_shift`` becomes a static ``shift``.

The table (``TABLE`` below is the source; ``table_markdown()`` renders it, and a test keeps this
text equal to it):

| sampler | scheduler | diffusers class | config on top of the checkpoint's shift | model calls for n steps |
| --- | --- | --- | --- | --- |
| euler | simple | KilnFlowMatchEulerScheduler (FlowMatchEulerDiscreteScheduler) | - | n |
| euler | normal | KilnFlowMatchEulerScheduler (FlowMatchEulerDiscreteScheduler) | use_beta_sigmas=True | n |
| euler | sgm | KilnFlowMatchEulerScheduler (FlowMatchEulerDiscreteScheduler) | use_karras_sigmas=True | n |
| euler_a | simple | KilnFlowMatchEulerAncestralScheduler (FlowMatchEulerDiscreteScheduler) | - | n |
| euler_a | normal | KilnFlowMatchEulerAncestralScheduler (FlowMatchEulerDiscreteScheduler) | use_beta_sigmas=True | n |
| euler_a | sgm | KilnFlowMatchEulerAncestralScheduler (FlowMatchEulerDiscreteScheduler) | use_karras_sigmas=True | n |
| dpmpp_2m | simple | KilnFlowMatchDPMSolverPP2MScheduler (FlowMatchEulerDiscreteScheduler) | - | n |
| dpmpp_2m | normal | KilnFlowMatchDPMSolverPP2MScheduler (FlowMatchEulerDiscreteScheduler) | use_beta_sigmas=True | n |
| dpmpp_2m | sgm | KilnFlowMatchDPMSolverPP2MScheduler (FlowMatchEulerDiscreteScheduler) | use_karras_sigmas=True | n |
| heun | simple | KilnFlowMatchHeunScheduler (FlowMatchEulerDiscreteScheduler) | - | 2n-1 |
| heun | normal | KilnFlowMatchHeunScheduler (FlowMatchEulerDiscreteScheduler) | use_beta_sigmas=True | 2n-1 |
| heun | sgm | KilnFlowMatchHeunScheduler (FlowMatchEulerDiscreteScheduler) | use_karras_sigmas=True | 2n-1 |

Samplers:

- ``euler``: diffusers' flow-matching Euler step, unchanged (``x += (σ_next - σ)·v``).
- ``euler_a``: ancestral Euler for flow (eta = 1, as ComfyUI's ``euler_ancestral`` for flow
  models): a deterministic Euler step down to ``σ_down = σ_next²/σ``, then fresh noise brings the
  sample back up to ``σ_next``. Its noise never comes from torch's global generator (see
  :class:`KilnFlowMatchEulerAncestralScheduler` for where it does come from).
- ``dpmpp_2m``: DPM-Solver++(2M) on the data prediction ``x0 = x - σ·v`` with
  ``λ = log((1 - σ)/σ)``; first order when there is no history, and the last step returns ``x0``.
- ``heun``: Heun's second-order method, two model calls per step except the last (Euler), so
  ``2n - 1`` calls and ``order = 2``: the pipelines' loops see ``2n - 1`` timesteps.

Schedulers (how the n sigmas are spaced; the checkpoint's shift is applied first):

- ``simple``: the checkpoint's default, ``linspace(1, 1/n, n)`` shifted (what the FLUX and Z-Image
  pipelines pass, and what WAN's UniPC scheduler does).
- ``normal``: beta spacing (``use_beta_sigmas=True``, Beta(0.6, 0.6) quantiles between the shifted
  first and last sigma). Needs scipy.
- ``sgm``: Karras spacing (``use_karras_sigmas=True``, rho = 7 between the shifted first and last
  sigma, "Stable Diffusion style").

For ``normal`` and ``sgm`` diffusers re-spaces after shifting, so the shift only moves the last
nonzero sigma. Every schedule starts at σ = 1 and ends with an appended σ = 0.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from kiln.catalog import KNOWN_SAMPLERS, KNOWN_SCHEDULERS
from kiln.engine.flow_schedulers import (
    KilnFlowMatchDPMSolverPP2MScheduler,
    KilnFlowMatchEulerAncestralScheduler,
    KilnFlowMatchEulerScheduler,
    KilnFlowMatchHeunScheduler,
)

__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "TABLE",
    "KilnFlowMatchDPMSolverPP2MScheduler",
    "KilnFlowMatchEulerAncestralScheduler",
    "KilnFlowMatchEulerScheduler",
    "KilnFlowMatchHeunScheduler",
    "Row",
    "flow_config",
    "make_scheduler",
    "pipeline_strength",
    "step_completed",
    "steps_done",
    "table_markdown",
    "total_steps",
]


# --- the table -------------------------------------------------------------------------------------

# The API's vocabulary is the catalog's; this table must cover all of it (a test checks).
SAMPLERS = KNOWN_SAMPLERS
SCHEDULERS = KNOWN_SCHEDULERS

_SAMPLER_CLASSES: dict[str, type[KilnFlowMatchEulerScheduler]] = {
    "euler": KilnFlowMatchEulerScheduler,
    "euler_a": KilnFlowMatchEulerAncestralScheduler,
    "dpmpp_2m": KilnFlowMatchDPMSolverPP2MScheduler,
    "heun": KilnFlowMatchHeunScheduler,
}
_SPACING_FLAGS: dict[str, dict[str, Any]] = {
    "simple": {},
    "normal": {"use_beta_sigmas": True},
    "sgm": {"use_karras_sigmas": True},
}


@dataclass(frozen=True)
class Row:
    """One (sampler, scheduler) pair: the class to build and the config set on top of the checkpoint's."""

    sampler: str
    scheduler: str
    cls: type[KilnFlowMatchEulerScheduler]
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def calls(self) -> str:
        """Model calls for n steps."""
        return "2n-1" if self.cls.order == 2 else "n"


TABLE: dict[tuple[str, str], Row] = {
    (sampler, scheduler): Row(sampler, scheduler, _SAMPLER_CLASSES[sampler], dict(_SPACING_FLAGS[scheduler]))
    for sampler in SAMPLERS
    for scheduler in SCHEDULERS
}


def table_markdown() -> str:
    """The table as Markdown, for the README (the module docstring holds the same text)."""
    lines = [
        "| sampler | scheduler | diffusers class | config on top of the checkpoint's shift | model calls for n steps |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in TABLE.values():
        config = ", ".join(f"{k}={v!r}" for k, v in row.config.items()) or "-"
        base = next(c for c in row.cls.__mro__ if c.__module__.startswith("diffusers."))
        cls = f"{row.cls.__name__} ({base.__name__})"
        lines.append(f"| {row.sampler} | {row.scheduler} | {cls} | {config} | {row.calls} |")
    return "\n".join(lines)


# --- building one ---------------------------------------------------------------------------------

# FlowMatchEulerDiscreteScheduler settings taken from a checkpoint's FlowMatch* config as they are.
_CARRIED = (
    "num_train_timesteps",
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "shift_terminal",
    "time_shift_type",
)


def flow_config(base_config: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's timestep-shift settings as ``FlowMatchEulerDiscreteScheduler`` arguments.

    A FlowMatch* config (FLUX, FLUX.2, Z-Image) keeps its shift, dynamic shifting and its
    parameters; a flow-prediction config of another class (WAN's ``UniPCMultistepScheduler`` with
    ``use_flow_sigmas``/``flow_shift``) becomes a static ``shift = flow_shift``, since the WAN
    pipelines pass no ``mu``. Spacing flags and ``stochastic_sampling`` are not carried: the
    (sampler, scheduler) pair decides them. Anything else is not a flow-matching config: ValueError.
    """
    cfg = dict(base_config)
    name = str(cfg.get("_class_name") or "")
    if name.startswith("FlowMatch") or ("flow_shift" not in cfg and ("shift" in cfg or "use_dynamic_shifting" in cfg)):
        if cfg.get("invert_sigmas"):
            raise ValueError("scheduler configs with invert_sigmas=True (Mochi) are not supported")
        out = {k: cfg[k] for k in _CARRIED if k in cfg}
    elif cfg.get("use_flow_sigmas") or cfg.get("prediction_type") == "flow_prediction":
        out = {
            "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000)),
            "shift": float(cfg.get("flow_shift") or 1.0),
            "use_dynamic_shifting": False,
        }
        if cfg.get("shift_terminal"):
            out["shift_terminal"] = cfg["shift_terminal"]
    else:
        raise ValueError(f"not a flow-matching scheduler config: {name or sorted(cfg)}")
    return out


def make_scheduler(
    base_config: Mapping[str, Any],
    sampler: str,
    scheduler: str,
    *,
    seeds: int | Sequence[int] | None = None,
) -> SchedulerMixin:
    """A fresh scheduler instance (never shared between calls) for this pair, keeping the
    checkpoint's shift / dynamic-shifting settings (``base_config`` is e.g. ``pipe.scheduler.config``).

    ``seeds`` seeds ``euler_a``'s noise (one per output, or one for the batch); without it the
    noise is seeded from the initial latents (see :class:`KilnFlowMatchEulerAncestralScheduler`).
    Deterministic samplers ignore it. ValueError for an unknown sampler or scheduler, or a config
    that is not flow matching; ImportError for ``normal`` without scipy.
    """
    try:
        row = TABLE[(sampler, scheduler)]
    except KeyError:
        raise ValueError(
            f"unknown sampler/scheduler {sampler!r}/{scheduler!r}; samplers: {', '.join(SAMPLERS)}; "
            f"schedulers: {', '.join(SCHEDULERS)}"
        ) from None
    config = flow_config(base_config)
    config.update(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
    config.update(row.config)
    config["stochastic_sampling"] = False
    accepted = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    instance = row.cls(**{k: v for k, v in config.items() if k in accepted})
    if isinstance(instance, KilnFlowMatchEulerAncestralScheduler):
        instance.set_noise_seeds(seeds)
    return instance


# --- counting user-visible steps -------------------------------------------------------------------


def step_completed(scheduler: Any) -> bool:
    """Whether the ``scheduler.step()`` just made completed a user-visible step.

    For ``callback_on_step_end``, which the pipelines call after every model call: Heun makes two
    calls per step (one for the last), the others one. Works for any diffusers scheduler.
    """
    if getattr(scheduler, "order", 1) == 1:
        return True
    index = getattr(scheduler, "step_index", None)
    if index is not None and index >= len(scheduler.timesteps):
        return True
    return bool(getattr(scheduler, "state_in_first_order", True))


def total_steps(scheduler: Any) -> int:
    """User-visible steps in the pipeline's loop (after ``set_timesteps`` and ``set_begin_index``)."""
    calls = len(scheduler.timesteps) - (getattr(scheduler, "begin_index", None) or 0)
    return math.ceil(calls / getattr(scheduler, "order", 1))


def steps_done(scheduler: Any, iteration_index: int) -> int:
    """User-visible steps complete after loop iteration ``iteration_index`` (0-based, counted from
    the loop's first timestep, as ``callback_on_step_end`` gets it). Stateless, unlike
    :func:`step_completed`; reaches :func:`total_steps` at the loop's last iteration.
    """
    order = getattr(scheduler, "order", 1)
    calls = len(scheduler.timesteps) - (getattr(scheduler, "begin_index", None) or 0)
    if iteration_index >= calls - 1:
        return math.ceil(calls / order)
    return (iteration_index + 1) // order


def pipeline_strength(scheduler: Any, strength: float, num_inference_steps: int) -> float:
    """The ``strength`` to give a diffusers img2img/inpaint pipeline so that it means for this
    scheduler what it means for Euler: start at step ``int(n - n·strength)`` of ``n``.

    The FLUX and Z-Image img2img/inpaint pipelines call ``retrieve_timesteps(..., sigmas=...)``,
    which returns ``len(scheduler.timesteps)`` as the step count (``2n - 1`` for Heun), then
    ``get_timesteps`` computes ``t_start`` from that count and multiplies it by ``order`` again:
    Heun would start about twice as late (or past the end). For order-1 schedulers this returns
    ``strength`` unchanged.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    order = getattr(scheduler, "order", 1)
    if order == 1:
        return strength
    n = num_inference_steps
    t_start = int(max(n - min(n * strength, n), 0))
    calls = order * (n - 1) + 1  # what retrieve_timesteps reports for this scheduler
    return (calls - t_start - 0.5) / calls
