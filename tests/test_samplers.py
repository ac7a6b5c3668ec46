"""kiln.engine.samplers: every (sampler, scheduler) pair, called the way each diffusers pipeline calls it.

Scheduler-level only (no pipeline, no weights). The "model" is analytic:

- point mass at ``x0``: the exact velocity is ``v(x, σ) = (x - x0)/σ``, so every sampler must land
  on ``x0`` (to rounding) from pure noise;
- Gaussian data ``N(μ, s²)``: the exact velocity is known in closed form and the probability-flow
  ODE maps the noise ``ε`` to ``μ + s·ε``, which measures each sampler's accuracy and order.

The ``retrieve_timesteps`` / ``get_timesteps`` helpers below mirror diffusers 0.42.1's
``pipeline_flux.retrieve_timesteps`` and ``pipeline_flux_img2img.get_timesteps`` (Z-Image's are
copies of them) without importing the pipelines (which pulls in transformers).
"""

from __future__ import annotations

import inspect
import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from kiln.engine import samplers
from kiln.engine.samplers import (
    SAMPLERS,
    SCHEDULERS,
    TABLE,
    make_scheduler,
    pipeline_strength,
    step_completed,
    steps_done,
    total_steps,
)

# The checkpoints' scheduler configs, as their scheduler_config.json ship them.
FLUX_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
ZIMAGE_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.36.0.dev0",
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": False,
    "shift": 3.0,
}
WAN_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.35.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 5.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
STYLES = {"flux": FLUX_CONFIG, "zimage": ZIMAGE_CONFIG, "wan": WAN_CONFIG}
PAIRS = list(itertools.product(SAMPLERS, SCHEDULERS))


# --- how the pipelines drive a scheduler -----------------------------------------------------------


def calculate_shift(seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + base_shift - m * base_seq_len


def retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=None, **kwargs):
    """diffusers 0.42.1 (FLUX, FLUX.2, Z-Image): with sigmas, the step count becomes len(timesteps)."""
    if sigmas is not None:
        if "sigmas" not in set(inspect.signature(scheduler.set_timesteps).parameters):
            raise ValueError(f"{type(scheduler)} does not take sigmas")
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
        return scheduler.timesteps, len(scheduler.timesteps)
    scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    return scheduler.timesteps, num_inference_steps


def prepare(style: str, scheduler, n: int):
    """set_timesteps exactly as the style's text-to-image pipeline does; returns (timesteps, count)."""
    config = STYLES[style]
    mu = calculate_shift(  # as the pipelines compute it, for a 512x512 image (1024 latent tokens)
        1024,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    if style == "flux":  # FluxPipeline / Flux2Pipeline: numpy sigmas and mu
        sigmas = np.linspace(1.0, 1 / n, n)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        return retrieve_timesteps(scheduler, n, "cpu", sigmas=sigmas, mu=mu)
    if style == "zimage":  # ZImagePipeline: a list of sigmas and mu, always
        return retrieve_timesteps(scheduler, n, "cpu", sigmas=torch.linspace(1.0, 1 / n, n).tolist(), mu=mu)
    scheduler.set_timesteps(n, device="cpu")  # WanPipeline / WanImageToVideoPipeline
    return scheduler.timesteps, n


def get_timesteps(scheduler, num_inference_steps, strength):
    """diffusers 0.42.1 FluxImg2ImgPipeline.get_timesteps (Z-Image img2img/inpaint: the same)."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    t_start = int(max(num_inference_steps - init_timestep, 0))
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps, num_inference_steps - t_start


def point_mass(x0):
    return lambda x, sigma: (x - x0) / sigma


MU, S = 0.3, 0.5


def gaussian(x, sigma):
    """Exact velocity for data ~ N(MU, S²): v = (x - E[x0 | x]) / σ."""
    a = 1.0 - sigma
    mean_x0 = MU + a * S**2 / (a * a * S**2 + sigma**2) * (x - a * MU)
    return (x - mean_x0) / sigma


def denoise(scheduler, x, velocity, timesteps, *, inpaint=None):
    """The pipelines' loop: the model sees t (σ = t/1000), then scheduler.step, then the callback."""
    calls, completed, done = 0, [], []
    for i, t in enumerate(timesteps):
        v = velocity(x, float(t) / 1000.0)
        calls += 1
        x = scheduler.step(v, t, x, return_dict=False)[0]
        assert torch.isfinite(x).all()
        completed.append(step_completed(scheduler))
        done.append(steps_done(scheduler, i))
        if inpaint is not None and i < len(timesteps) - 1:
            inpaint(scheduler, timesteps[i + 1])
    return x, calls, completed, done


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- the table ------------------------------------------------------------------------------------


def test_table_is_every_pair_and_the_docstring_shows_it():
    assert set(TABLE) == set(PAIRS)
    assert samplers.table_markdown() in samplers.__doc__
    for (sampler, scheduler), row in TABLE.items():
        assert issubclass(row.cls, FlowMatchEulerDiscreteScheduler)
        assert (row.sampler, row.scheduler) == (sampler, scheduler)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("sampler,scheduler", PAIRS)
def test_make_scheduler_keeps_the_checkpoint_shift(style, sampler, scheduler):
    a = make_scheduler(STYLES[style], sampler, scheduler)
    b = make_scheduler(STYLES[style], sampler, scheduler)
    assert a is not b and type(a) is TABLE[(sampler, scheduler)].cls
    cfg = a.config
    if style == "flux":
        assert cfg.use_dynamic_shifting is True
        assert (cfg.base_shift, cfg.max_shift, cfg.base_image_seq_len, cfg.max_image_seq_len) == (0.5, 1.15, 256, 4096)
    else:
        assert cfg.use_dynamic_shifting is False
        assert cfg.shift == (5.0 if style == "wan" else 3.0)
    assert cfg.use_beta_sigmas is (scheduler == "normal")
    assert cfg.use_karras_sigmas is (scheduler == "sgm")
    assert cfg.use_exponential_sigmas is False and cfg.stochastic_sampling is False
    assert a.order == (2 if sampler == "heun" else 1)


def test_make_scheduler_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler(FLUX_CONFIG, "lms", "simple")
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler(FLUX_CONFIG, "euler", "karras")
    sd_unipc = {**WAN_CONFIG, "prediction_type": "epsilon", "use_flow_sigmas": False, "flow_shift": 1.0}
    with pytest.raises(ValueError, match="not a flow-matching"):
        make_scheduler(sd_unipc, "euler", "simple")
    with pytest.raises(ValueError, match="not a flow-matching"):
        make_scheduler({"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon"}, "euler", "simple")


# --- every pair, every pipeline style --------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("sampler,scheduler", PAIRS)
@pytest.mark.parametrize("n", [1, 2, 8])
def test_every_pair_lands_on_a_point_mass(style, sampler, scheduler, n):
    sched = make_scheduler(STYLES[style], sampler, scheduler)
    timesteps, _ = prepare(style, sched, n)
    sched.set_begin_index(0)

    sigmas = sched.sigmas
    grid = torch.cat([sigmas[:1], sigmas[1::2]]) if sampler == "heun" else sigmas
    assert len(grid) == n + 1 and len(timesteps) == (2 * n - 1 if sampler == "heun" else n)
    assert torch.all(grid[1:] < grid[:-1]), grid
    assert grid[0] == pytest.approx(1.0, abs=1e-6) and grid[-1] == 0.0
    torch.testing.assert_close(timesteps, sigmas[:-1] * 1000)

    x0 = torch.linspace(-1.5, 1.5, 2 * 4 * 16).reshape(2, 4, 16)
    x, calls, completed, done = denoise(sched, noise(x0.shape), point_mass(x0), timesteps)
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=0)
    assert calls == len(timesteps)
    assert sum(completed) == n and completed[-1] and done[-1] == n == total_steps(sched)


@pytest.mark.parametrize("style", STYLES)
def test_simple_is_the_pipelines_default_grid(style):
    n = 10
    sched = make_scheduler(STYLES[style], "euler", "simple")
    prepare(style, sched, n)
    base = np.linspace(1.0, 1 / n, n)
    if style == "flux":
        mu = calculate_shift(1024)
        expected = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
    else:
        shift = 5.0 if style == "wan" else 3.0
        expected = shift * base / (1 + (shift - 1) * base)
    np.testing.assert_allclose(sched.sigmas[:-1].numpy(), expected, rtol=1e-5)
    if style == "wan":  # and about what WAN's own UniPC scheduler does
        unipc = UniPCMultistepScheduler(**{k: v for k, v in WAN_CONFIG.items() if not k.startswith("_")})
        unipc.set_timesteps(n)
        np.testing.assert_allclose(sched.sigmas.numpy(), unipc.sigmas.numpy(), atol=5e-3)


def test_euler_is_diffusers_flow_match_euler():
    n = 9
    ours = make_scheduler(FLUX_CONFIG, "euler", "simple")
    stock = FlowMatchEulerDiscreteScheduler.from_config(FLUX_CONFIG)
    for s in (ours, stock):
        prepare("flux", s, n)
        s.set_begin_index(0)
    torch.testing.assert_close(ours.timesteps, stock.timesteps)
    x_ours = x_stock = noise((1, 64))
    for t in ours.timesteps:
        x_ours = ours.step(gaussian(x_ours, float(t) / 1000), t, x_ours, return_dict=False)[0]
        x_stock = stock.step(gaussian(x_stock, float(t) / 1000), t, x_stock, return_dict=False)[0]
    torch.testing.assert_close(x_ours, x_stock)


# --- accuracy ---------------------------------------------------------------------------------------


def ode_error(sampler, n, config=ZIMAGE_CONFIG, scheduler="simple"):
    sched = make_scheduler(config, sampler, scheduler)
    timesteps, _ = prepare("zimage", sched, n)
    sched.set_begin_index(0)
    eps = noise((1, 4096), seed=1)
    x, *_ = denoise(sched, eps, gaussian, timesteps)
    return (x - (MU + S * eps)).pow(2).mean().sqrt().item()


def test_second_order_samplers_beat_euler_on_a_gaussian():
    euler20, euler40 = ode_error("euler", 20), ode_error("euler", 40)
    heun20, heun40 = ode_error("heun", 20), ode_error("heun", 40)
    dpm20 = ode_error("dpmpp_2m", 20)
    assert euler20 < 0.1
    assert 0.4 < euler40 / euler20 < 0.6  # first order
    assert heun40 / heun20 < 0.35  # second order
    assert heun20 < euler20 / 3 and dpm20 < euler20 / 3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy 2 warning
def test_dpmpp_2m_matches_diffusers_dpm_solver_step_for_step():
    """Same sigma grid as diffusers' DPMSolverMultistepScheduler in flow mode, same samples."""
    for n in (8, 25):
        ref = DPMSolverMultistepScheduler(
            use_flow_sigmas=True,
            flow_shift=3.0,
            prediction_type="flow_prediction",
            algorithm_type="dpmsolver++",
            solver_order=2,
            final_sigmas_type="zero",
            lower_order_final=False,
        )
        ref.set_timesteps(n)
        ours = make_scheduler({"num_train_timesteps": 1000, "shift": 1.0}, "dpmpp_2m", "simple")
        ours.set_timesteps(sigmas=ref.sigmas[:-1].numpy(), device="cpu")
        eps = noise((1, 256), seed=2)
        x_ref = x_ours = eps
        for i in range(n):
            sigma = float(ref.sigmas[i])
            x_ref = ref.step(gaussian(x_ref, sigma), ref.timesteps[i], x_ref, return_dict=False)[0]
            x_ours = ours.step(gaussian(x_ours, sigma), ours.timesteps[i], x_ours, return_dict=False)[0]
            torch.testing.assert_close(x_ours, x_ref, atol=1e-4, rtol=1e-4)


def test_heun_matches_diffusers_flow_match_heun_step_for_step():
    n = 7
    ref = FlowMatchHeunDiscreteScheduler(shift=1.0)
    ref.set_timesteps(n)
    ours = make_scheduler({"num_train_timesteps": 1000, "shift": 1.0}, "heun", "simple")
    ours.set_timesteps(sigmas=ref.sigmas[:1].tolist() + ref.sigmas[1:-1:2].tolist(), device="cpu")
    torch.testing.assert_close(ours.timesteps, ref.timesteps)
    torch.testing.assert_close(ours.sigmas, ref.sigmas)
    x_ref = x_ours = noise((1, 256), seed=3)
    for t in ref.timesteps:
        x_ref = ref.step(gaussian(x_ref, float(t) / 1000), t, x_ref, return_dict=False)[0]
        x_ours = ours.step(gaussian(x_ours, float(t) / 1000), t, x_ours, return_dict=False)[0]
        torch.testing.assert_close(x_ours, x_ref)


def test_dpmpp_2m_edges_are_finite_and_the_last_step_returns_x0():
    sched = make_scheduler(ZIMAGE_CONFIG, "dpmpp_2m", "simple")
    timesteps, _ = prepare("zimage", sched, 4)
    sched.set_begin_index(0)
    assert sched.sigmas[0] == 1.0  # λ = -inf at the first sigma: must still be finite
    x = noise((2, 32))
    gen = torch.Generator().manual_seed(5)
    for i, t in enumerate(timesteps):
        v = torch.randn(x.shape, generator=gen) * 3
        sigma = float(sched.sigmas[i])
        prev = sched.step(v, t, x, return_dict=False)[0]
        assert torch.isfinite(prev).all()
        if i == len(timesteps) - 1:
            torch.testing.assert_close(prev, x - sigma * v)
        x = prev


# --- euler_a ---------------------------------------------------------------------------------------


def run_euler_a(x_init, *, seeds=None, generator_seed=None, n=10, config=FLUX_CONFIG, velocity=None):
    sched = make_scheduler(config, "euler_a", "simple", seeds=seeds)
    timesteps, _ = prepare("flux", sched, n)
    sched.set_begin_index(0)
    velocity = velocity or gaussian
    gen = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    x = x_init
    for t in timesteps:
        x = sched.step(velocity(x, float(t) / 1000), t, x, generator=gen, return_dict=False)[0]
    return x


def test_euler_a_is_seed_deterministic_and_leaves_the_global_rng_alone():
    x_init = noise((2, 4, 8), seed=10)
    rng = torch.get_rng_state()
    # Seeded explicitly (one seed per batch row, as the engine's per-output seeds)...
    a, b = run_euler_a(x_init, seeds=[1, 2]), run_euler_a(x_init, seeds=[1, 2])
    assert torch.equal(a, b)
    assert not torch.allclose(a, run_euler_a(x_init, seeds=[1, 3]))
    # ...and row i depends only on its own seed: output i alone equals output i in the batch.
    assert torch.equal(run_euler_a(x_init[1:], seeds=[2]), a[1:])
    # A generator passed to step() wins (diffusers' pipelines pass none, but the API allows it).
    c, d = run_euler_a(x_init, generator_seed=7), run_euler_a(x_init, generator_seed=7)
    assert torch.equal(c, d) and not torch.allclose(c, run_euler_a(x_init, generator_seed=8))
    # Without seeds the noise follows the initial latents, i.e. the request's seed.
    e, f = run_euler_a(x_init), run_euler_a(x_init)
    assert torch.equal(e, f)
    assert not torch.allclose(e, run_euler_a(noise((2, 4, 8), seed=11)))
    assert torch.equal(run_euler_a(x_init[1:]), e[1:])
    assert torch.equal(torch.get_rng_state(), rng)


def test_euler_a_is_stochastic_but_samples_the_data_distribution():
    x0 = torch.full((1, 64), 0.7)
    torch.testing.assert_close(run_euler_a(noise((1, 64)), seeds=4, velocity=point_mass(x0)), x0)
    eps = noise((1, 20000), seed=12)
    x = run_euler_a(eps, seeds=5, n=100, config=ZIMAGE_CONFIG)
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() - S) < 0.1 * S
    # Unlike the ODE samplers it does not follow the noise's flow map all the way.
    assert (x - (MU + S * eps)).pow(2).mean().sqrt() > 0.1


def test_euler_a_reruns_identically_on_one_instance():
    sched = make_scheduler(ZIMAGE_CONFIG, "euler_a", "sgm", seeds=[9])
    outs = []
    for _ in range(2):
        timesteps, _ = prepare("zimage", sched, 6)
        sched.set_begin_index(0)
        x = noise((1, 16))
        for t in timesteps:
            x = sched.step(gaussian(x, float(t) / 1000), t, x, return_dict=False)[0]
        outs.append(x)
    assert torch.equal(*outs)


# --- heun: counting user steps ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_heun_makes_2n_minus_1_calls_and_reports_n_steps(n):
    sched = make_scheduler(WAN_CONFIG, "heun", "simple")
    timesteps, _ = prepare("wan", sched, n)
    sched.set_begin_index(0)
    x0 = torch.ones(1, 8)
    x, calls, completed, done = denoise(sched, noise((1, 8)), point_mass(x0), timesteps)
    assert calls == 2 * n - 1
    assert sum(completed) == n and completed[-1]
    assert total_steps(sched) == n
    assert done == list(itertools.accumulate(int(c) for c in completed))
    # Steps are complete after the corrector calls (odd loop indices) and after the last call.
    assert [i for i, c in enumerate(completed) if c] == [*range(1, 2 * n - 2, 2), 2 * n - 2]


def test_heun_refuses_to_begin_on_a_corrector_slot():
    sched = make_scheduler(FLUX_CONFIG, "heun", "simple")
    prepare("flux", sched, 6)
    sched.set_begin_index(4)
    with pytest.raises(ValueError, match="even slot"):
        sched.set_begin_index(3)


# --- img2img / inpaint -----------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["flux", "zimage"])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("strength", [0.05, 0.6, 1.0])
def test_img2img_and_inpaint_start_where_euler_would(style, sampler, strength):
    n = 10
    t_start = int(n - n * strength)
    image = torch.linspace(-1, 1, 3 * 32).reshape(3, 32)
    for inpainting in (False, True):
        sched = make_scheduler(STYLES[style], sampler, "simple")
        _, count = prepare(style, sched, n)
        grid = sched.sigmas[:1].tolist() + sched.sigmas[1 :: sched.order].tolist()
        timesteps, _ = get_timesteps(sched, count, pipeline_strength(sched, strength, n))
        assert len(timesteps) == sched.order * (n - t_start - 1) + 1
        eps = noise(image.shape, seed=13)
        latents = sched.scale_noise(image, timesteps[:1].repeat(image.shape[0]), eps)
        torch.testing.assert_close(latents, (1 - grid[t_start]) * image + grid[t_start] * eps)

        used = []

        def inpaint(s, next_t, used=used):  # FluxInpaintPipeline: re-noise the known region to the next t
            used.append(float(s.scale_noise(torch.zeros(1), torch.tensor([next_t]), torch.ones(1))))

        x, calls, completed, done = denoise(
            sched, latents, point_mass(image), timesteps, inpaint=inpaint if inpainting else None
        )
        torch.testing.assert_close(x, image, atol=1e-4, rtol=0)
        assert calls == len(timesteps) and sum(completed) == n - t_start == done[-1] == total_steps(sched)
        if inpainting:
            np.testing.assert_allclose(used, (timesteps[1:] / 1000).tolist(), rtol=1e-6)


def test_pipeline_strength_gives_heun_eulers_start_for_every_count():
    for n in range(1, 41):
        heun = make_scheduler(ZIMAGE_CONFIG, "heun", "simple")
        euler = make_scheduler(ZIMAGE_CONFIG, "euler", "simple")
        _, count_h = prepare("zimage", heun, n)
        _, count_e = prepare("zimage", euler, n)
        assert count_h == 2 * n - 1  # what the pipelines see: retrieve_timesteps counts timesteps
        for strength in (0.01, 0.25, 1 / 3, 0.5, 0.7, 0.999, 1.0):
            assert pipeline_strength(euler, strength, n) == strength
            ts_e, _ = get_timesteps(euler, count_e, strength)
            ts_h, _ = get_timesteps(heun, count_h, pipeline_strength(heun, strength, n))
            assert heun.begin_index == 2 * euler.begin_index
            assert len(ts_h) == 2 * len(ts_e) - 1 and ts_h[0] == ts_e[0]
    with pytest.raises(ValueError):
        pipeline_strength(heun, 0.0, 10)
