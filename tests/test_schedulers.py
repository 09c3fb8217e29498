"""pm_runtime.schedulers against diffusers, built from the same scheduler config dict.

A whole trajectory is run on both sides with a fixed deterministic "model"
(0.1 * model_input + sin(t / 100) * A), the same initial latents and, for Euler ancestral, the
same per-step noise (diffusers' randn_tensor patched inside a `with`). diffusers runs in float64
(samples and its sigma / alphas_cumprod tables upcast, same float32 values) so the comparison
measures our float32 stepping against the algorithm, not against torch's float32 rounding of
log/exp; ours runs in float32.
"""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest

import pm_runtime.schedulers as S
from pm_runtime.schedulers import common, ddim, dpm_solver, euler, euler_ancestral
from pm_runtime.schedulers.common import SCHEDULE_KEY
from pm_runtime.train.reference import make_scheduler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json, with an explicit spacing
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon",
    "timestep_spacing": "leading", "trained_betas": None,
}
SD2V = {  # stabilityai/stable-diffusion-2-1 scheduler_config.json: no timestep_spacing, so each
    # class uses its own default (DDIM "leading", Euler / DPM-Solver "linspace")
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.10.0.dev0",
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "clip_sample": False, "prediction_type": "v_prediction", "trained_betas": None,
}
SD2V_TRAILING = {**SD2V, "timestep_spacing": "trailing"}
CONFIGS = {"sd15-eps-leading": SD15, "sd2-v": SD2V, "sd2-v-trailing": SD2V_TRAILING}
DIFFUSERS_CLASS = {name: S.get_scheduler(name).diffusers_class for name in S.SCHEDULERS}
SHAPE = (1, 4, 8, 8)
TOL = 1e-5
# Karras timesteps that stay fractional (euler-karras) come from the logs of the training sigmas, which
# torch's float32 sqrt makes differ from the correctly rounded ones by an ulp at a few timesteps (21, 260,
# 294, ... of SD 1.5's): such a timestep then differs in its last float32 bit
FRACTIONAL_FROM_SIGMAS = {"euler-karras", "euler-beta", "euler-exponential"}
# AUTOMATIC1111's schedule types (no diffusers option): diffusers is given their levels where it would compute
# Karras et al.'s (_diffusers_scheduler), so what is checked against it is everything downstream of the levels;
# the levels themselves against A1111's definitions in test_a1111_schedule_levels
A1111_KIND = {name: S.get_scheduler(name).fixed.get(SCHEDULE_KEY) for name in S.SCHEDULERS}
A1111_NAMES = [name for name in S.SCHEDULERS if A1111_KIND[name]]
FRACTIONAL_FROM_SIGMAS |= set(A1111_NAMES)
# the spacing and config matrices run on the others: an A1111 schedule type fixes the spacing, and its levels
# reach the solvers as Karras ones do (its own tests below: every name, fewer combinations)
DIFFUSERS_SCHEDULES = [name for name in S.SCHEDULERS if not A1111_KIND[name]]


def _model(x, t, a):
    """The stand-in UNet: a fixed function of (model input, timestep)."""
    return 0.1 * x + math.sin(float(t) / 100.0) * a


def _inputs(num_steps, seed=0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(SHAPE).astype(np.float32)
    a = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((num_steps,) + SHAPE).astype(np.float32)
    return latents, a, noise


def _diffusers_scheduler(name, config, num_steps, float64=True):
    """diffusers' scheduler for `name` with its timesteps set (pm_runtime.train.reference.make_scheduler: an
    A1111 schedule type's levels are given to diffusers where it computes Karras et al.'s)."""
    sched = make_scheduler(name, config, num_steps)
    if float64:  # the same float32 table values, stepped in float64
        for attr in ("sigmas", "alphas_cumprod", "final_alpha_cumprod"):
            if isinstance(getattr(sched, attr, None), torch.Tensor):
                setattr(sched, attr, getattr(sched, attr).double())
    return sched


def _run_diffusers(name, config, num_steps, latents, a, noise):
    sched = _diffusers_scheduler(name, config, num_steps)
    if hasattr(sched, "set_begin_index"):  # step by position, as a pipeline starting at step 0 does: looked up
        sched.set_begin_index(0)  # by value, repeated (truncated Beta) timesteps would run it past its table
    x = torch.from_numpy(latents.astype(np.float64)) * float(sched.init_noise_sigma)
    return _step_diffusers(sched, x, sched.timesteps, a, noise), np.asarray(sched.timesteps.numpy())


def _step_diffusers(sched, x, timesteps, a, noise) -> np.ndarray:
    """diffusers' trajectory from sample x over `timesteps`: the stand-in model, the schedulers that draw noise
    (Euler ancestral, DPM-Solver++ SDE) drawing the same per-step noise as ours."""
    draws = iter(torch.from_numpy(n.astype(np.float64)) for n in noise)

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return next(draws).to(dtype=dtype).reshape(shape)

    trajectory = []
    with mock.patch("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor", fake_randn), \
            mock.patch("diffusers.schedulers.scheduling_dpmsolver_multistep.randn_tensor", fake_randn):
        for t in timesteps:
            model_in = sched.scale_model_input(x, t)
            out = torch.from_numpy(_model(model_in.numpy(), t, a.astype(np.float64)))
            x = sched.step(out, t, x).prev_sample
            trajectory.append(x.numpy().copy())
    return np.stack(trajectory)


def _run_ours(name, config, num_steps, latents, a, noise):
    tables = S.make_tables(name, config, num_steps)
    return _step_ours(name, tables, latents * np.float32(tables.init_noise_sigma), a, noise), tables


def _step_ours(name, tables, x, a, noise) -> np.ndarray:
    """Our trajectory from sample x over the tables' steps (float32 throughout)."""
    needs_noise, state, trajectory = S.get_scheduler(name).needs_noise, None, []
    for i, t in enumerate(tables.timesteps):
        out = _model(S.scale_model_input(i, x, tables), t, a)
        x, state = S.step(i, out, x, state, noise[i] if needs_noise else None, tables)
        assert x.dtype == np.float32
        trajectory.append(x)
    return np.stack(trajectory)


def _max_error(ours, ref):
    """Max abs difference per step, relative to that step's sample scale (at least 1)."""
    scale = np.maximum(1.0, np.abs(ref).reshape(len(ref), -1).max(axis=1))
    return float((np.abs(ours - ref).reshape(len(ref), -1).max(axis=1) / scale).max())


def _check_timesteps(name, ours, ref):
    """Bit for bit, but fractional timesteps interpolated from the sigma table: diffusers computes that
    table with torch's float32 sqrt, which is not correctly rounded on every CPU (on an AMD EPYC with
    AVX512, 190 of SD's 1000 values one ulp off numpy's), and log-interpolation moves a timestep by a few
    float32 ulps for that (measured: 6.3e-7 relative at t = 3, 1.8e-7 of a training step near t = 0). With
    diffusers' own table the timesteps are the same bits (test_sigma_timesteps_are_exact_on_diffusers_sigma_table)."""
    assert ours.dtype == ref.dtype
    if name in FRACTIONAL_FROM_SIGMAS:
        # A1111's levels are computed from the table itself (KL-optimal: tan near pi/2 with zero terminal SNR's
        # sigma_max 4096), which carries that ulp further: measured 2.2e-6 relative at t = 77
        np.testing.assert_allclose(ours, ref, rtol=5e-6 if A1111_KIND[name] else 2e-6, atol=5e-7)
    else:
        np.testing.assert_array_equal(ours, ref)


def _use_torch_sigma_table(monkeypatch):
    """The schedulers' sigma table computed as diffusers computes it (torch's float32 arithmetic on this CPU)."""
    def torch_table(abar):
        a = torch.from_numpy(np.asarray(abar, np.float32))
        return (((1 - a) / a) ** 0.5).numpy()

    monkeypatch.setattr(euler, "sigmas_f32", torch_table)
    monkeypatch.setattr(dpm_solver, "sigmas_f32", torch_table)


@pytest.mark.parametrize("num_steps", [7, 50, 999])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("name", sorted(FRACTIONAL_FROM_SIGMAS - set(A1111_NAMES)))
def test_sigma_timesteps_are_exact_on_diffusers_sigma_table(name, spacing, num_steps, monkeypatch):
    """The sigma table computed as diffusers computes it (torch's float32 arithmetic on this CPU): then the
    Karras / Beta / A1111-type timesteps and sigmas equal diffusers' bit for bit."""
    _use_torch_sigma_table(monkeypatch)
    config = {**SD15, "timestep_spacing": spacing, "steps_offset": 1}
    tables = S.make_tables(name, config, num_steps)
    sched = _diffusers_scheduler(name, config, num_steps, float64=False)
    np.testing.assert_array_equal(tables.timesteps, sched.timesteps.numpy())
    np.testing.assert_array_equal(tables.sigmas, sched.sigmas.numpy())


def _check_trajectory(name, config, num_steps):
    latents, a, noise = _inputs(num_steps)
    ref, ref_timesteps = _run_diffusers(name, config, num_steps, latents, a, noise)
    ours, tables = _run_ours(name, config, num_steps, latents, a, noise)
    _check_timesteps(name, tables.timesteps, ref_timesteps)
    assert np.all(np.isfinite(ours))
    err = _max_error(ours, ref)
    assert err <= TOL, f"{name} {num_steps} steps: max error {err:.3g} > {TOL}"


@pytest.mark.parametrize("num_steps", [50, 20, 7])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULES)
def test_trajectory_matches_diffusers(name, config_name, num_steps):
    _check_trajectory(name, CONFIGS[config_name], num_steps)


@pytest.mark.parametrize("config_name, num_steps", [("sd15-eps-leading", 7), ("sd2-v", 20), ("sd2-v-trailing", 50)])
@pytest.mark.parametrize("name", A1111_NAMES)
def test_a1111_schedule_trajectory_matches_diffusers(name, config_name, num_steps):
    _check_trajectory(name, CONFIGS[config_name], num_steps)


@pytest.mark.parametrize("num_steps", [1, 7, 50, 999])
@pytest.mark.parametrize("name", A1111_NAMES)
def test_a1111_schedule_timesteps_and_sigmas_match_diffusers(name, num_steps, monkeypatch):
    """Whatever the config's spacing, the same tables as diffusers given the levels (computed on its sigma
    table: then bit for bit)."""
    _use_torch_sigma_table(monkeypatch)
    config = {**SD15, "timestep_spacing": "leading", "steps_offset": 1}
    tables = S.make_tables(name, config, num_steps)
    sched = _diffusers_scheduler(name, config, num_steps, float64=False)
    np.testing.assert_array_equal(tables.timesteps, sched.timesteps.numpy())
    np.testing.assert_array_equal(tables.sigmas, sched.sigmas.numpy())
    assert tables.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("name, extra, num_steps", [
    # how the last step is taken: final sigma_min with lower_order_final below 15 steps only,
    # euler_at_final, first order throughout
    ("dpmpp-2m", {"final_sigmas_type": "sigma_min"}, 7),
    ("dpmpp-2m", {"final_sigmas_type": "sigma_min"}, 20),
    ("dpmpp-2m", {"final_sigmas_type": "sigma_min", "euler_at_final": True}, 20),
    ("dpmpp-2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, 7),
    ("dpmpp-2m", {"solver_order": 1}, 20),
    ("dpmpp-2m", {"solver_type": "bh2"}, 20),  # a UniPC config's solver_type means midpoint
    ("dpmpp-2m", {"algorithm_type": "deis", "final_sigmas_type": "sigma_min"}, 20),
    # the stochastic form: the last step to sigma_min; with Karras levels and v-prediction; a model config
    # asking for SDE under the plain name (which is not SDE) and the other way round
    ("dpmpp-2m-sde", {"final_sigmas_type": "sigma_min"}, 20),
    ("dpmpp-2m-sde", {"final_sigmas_type": "sigma_min"}, 7),
    ("dpmpp-2m-sde-karras", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 25),
    ("dpmpp-2m", {"algorithm_type": "sde-dpmsolver++"}, 20),
    ("dpmpp-2m-sde", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}, 20),
    ("dpmpp-2m-sde-exponential", {"final_sigmas_type": "sigma_min"}, 7),
    ("dpmpp-2m-sde-exponential", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 20),
    ("euler", {"final_sigmas_type": "sigma_min"}, 20),
    ("ddim", {"clip_sample": True, "clip_sample_range": 1.5}, 20),
    ("ddim", {"set_alpha_to_one": True, "timestep_spacing": "linspace"}, 20),
    ("euler-a", {"timestep_spacing": "linspace"}, 20),
    ("dpmpp-2m", {"beta_schedule": "squaredcos_cap_v2"}, 20),
    ("euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 20),
    # Karras noise levels: Euler's range can be set by the config; the last step to sigma_min; a model
    # config asking for Karras under the plain name (which is not Karras)
    ("dpmpp-2m-karras", {"final_sigmas_type": "sigma_min"}, 7),
    ("dpmpp-2m-karras", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 25),
    ("euler-karras", {"sigma_min": 0.1, "sigma_max": 10.0}, 20),
    ("euler-karras", {"final_sigmas_type": "sigma_min", "timestep_spacing": "linspace"}, 20),
    ("dpmpp-2m", {"use_karras_sigmas": True}, 20),
    ("euler", {"use_karras_sigmas": True}, 20),
    # Beta(0.6, 0.6) levels: the same range options; a model config asking for them under another name
    ("euler-beta", {"sigma_min": 0.1, "sigma_max": 10.0}, 20),
    ("dpmpp-2m-beta", {"final_sigmas_type": "sigma_min"}, 7),
    ("dpmpp-2m-sde-beta", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 25),
    ("dpmpp-2m-karras", {"use_beta_sigmas": True}, 20),
    ("euler", {"use_beta_sigmas": True}, 20),
])
def test_trajectory_options(name, extra, num_steps):
    _check_trajectory(name, {**SD15, **extra}, num_steps)


@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_trajectory_zero_terminal_snr(name):
    _check_trajectory(name, {**SD2V_TRAILING, "rescale_betas_zero_snr": True}, 20)


@pytest.mark.parametrize("num_steps", [1, 7, 20, 25, 50, 999])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULES)
def test_timesteps_and_sigmas_match_diffusers(name, spacing, num_steps):
    config = {**SD15, "timestep_spacing": spacing, "steps_offset": 1}
    if name in ("dpmpp-2m", "dpmpp-2m-sde") and (spacing, num_steps) == ("leading", 999):  # diffusers: t = 1000, NaN
        with pytest.raises(ValueError, match="timestep 1000"):
            S.make_tables(name, config, num_steps)
        return
    tables = S.make_tables(name, config, num_steps)
    sched = _diffusers_scheduler(name, config, num_steps, float64=False)
    timesteps = sched.timesteps.numpy()
    _check_timesteps(name, tables.timesteps, timesteps)
    assert tables.num_steps == len(timesteps) and len(tables.sigmas) == len(timesteps) + 1
    np.testing.assert_allclose(tables.init_noise_sigma, float(sched.init_noise_sigma), rtol=1e-6)
    if name != "ddim":  # float32 sigmas, up to torch's float32 sqrt (not correctly rounded)
        np.testing.assert_allclose(tables.sigmas, sched.sigmas.numpy(), rtol=3e-7, atol=0)


def test_lambda_min_clipped_timesteps():
    config = {**SD15, "timestep_spacing": "linspace", "lambda_min_clipped": -5.1}
    sched = _diffusers_scheduler("dpmpp-2m", config, 20, float64=False)
    np.testing.assert_array_equal(S.make_tables("dpmpp-2m", config, 20).timesteps, sched.timesteps.numpy())


def test_karras_cosine_timesteps_are_truncated():
    """With the cosine schedule diffusers truncates the Karras timesteps (no rounding): many repeat 998,
    and its own stepping of them runs past its sigmas (an IndexError at 20 steps), so only the tables are
    compared here."""
    config = {**SD15, "beta_schedule": "squaredcos_cap_v2"}
    for num_steps in (7, 20):
        sched = _diffusers_scheduler("dpmpp-2m-karras", config, num_steps, float64=False)
        tables = S.make_tables("dpmpp-2m-karras", config, num_steps)
        np.testing.assert_array_equal(tables.timesteps, sched.timesteps.numpy())
        np.testing.assert_allclose(tables.sigmas, sched.sigmas.numpy(), rtol=3e-7, atol=0)


def test_alphas_cumprod_bit_exact():
    from pm_runtime.schedulers.common import alphas_cumprod
    for cfg in (SD15, {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
                {"beta_schedule": "squaredcos_cap_v2"}):
        sched = diffusers.DDIMScheduler.from_config(cfg)
        np.testing.assert_array_equal(alphas_cumprod({**ddim.DEFAULTS, **cfg}), sched.alphas_cumprod.numpy())


@pytest.mark.parametrize("module", [ddim, euler, euler_ancestral, dpm_solver])
def test_defaults_mirror_diffusers_init(module):
    """from_config keeps exactly the target class's init keys and fills in its defaults."""
    params = inspect.signature(getattr(diffusers, DIFFUSERS_CLASS[module.NAME]).__init__).parameters
    expected = {k: p.default for k, p in params.items() if k != "self"}
    assert set(module.DEFAULTS) == set(expected)
    for key, value in module.DEFAULTS.items():
        assert value == expected[key] or (value is None and expected[key] is None), key


@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_step_is_pure(name):
    tables = S.make_tables(name, SD15, 7)
    latents, a, noise = _inputs(7)
    x = latents * np.float32(tables.init_noise_sigma)
    _, state = S.step(0, _model(x, tables.timesteps[0], a), x, None, noise[0], tables)
    out = _model(x, tables.timesteps[1], a)
    args = (x, out, noise[1])
    copies = [v.copy() for v in args]
    state_before = None if state is None else state.prev_x0.copy()
    first = S.step(1, out, x, state, noise[1], tables)
    second = S.step(1, out, x, state, noise[1], tables)
    np.testing.assert_array_equal(first[0], second[0])
    for v, c in zip(args, copies):
        np.testing.assert_array_equal(v, c)
    if state is not None:
        np.testing.assert_array_equal(state.prev_x0, state_before)
        assert state.index == 0 and first[1].index == 1
        np.testing.assert_array_equal(first[1].prev_x0, second[1].prev_x0)
    with pytest.raises(ValueError):
        tables.timesteps[0] = 0  # tables are read-only


def test_dpm_state_from_another_step_is_refused():
    tables = S.make_tables("dpmpp-2m", SD15, 7)
    x = np.ones(SHAPE, np.float32)
    _, state = S.step(0, x, x, None, None, tables)
    with pytest.raises(ValueError, match="state of step 0"):
        S.step(2, x, x, state, None, tables)


def test_euler_ancestral_needs_noise():
    tables = S.make_tables("euler-a", SD15, 7)
    x = np.ones(SHAPE, np.float32)
    with pytest.raises(ValueError, match="noise"):
        S.step(0, x, x, None, None, tables)
    S.step(6, x, x, None, None, tables)  # the last step adds no noise


def test_dpm_sde_needs_noise_and_uses_it():
    tables = S.make_tables("dpmpp-2m-sde", SD15, 7)
    assert S.get_scheduler("dpmpp-2m-sde").needs_noise and not S.get_scheduler("dpmpp-2m").needs_noise
    x = np.ones(SHAPE, np.float32)
    with pytest.raises(ValueError, match="needs noise"):
        S.step(0, x, x, None, None, tables)
    quiet, _ = S.step(0, x, x, None, np.zeros_like(x), tables)
    loud, _ = S.step(0, x, x, None, np.ones_like(x), tables)
    np.testing.assert_allclose(loud - quiet, tables.from_noise[0], rtol=1e-6)
    assert tables.from_noise[0] > 0 and tables.from_noise[-1] == 0  # the last step, to sigma 0: none


def test_registry():
    assert S.SCHEDULERS == ("ddim", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", "euler-karras",
                            "dpmpp-2m-sde", "dpmpp-2m-sde-karras", "dpmpp-2m-sde-exponential", "dpmpp-2m-beta",
                            "euler-beta", "dpmpp-2m-sde-beta", "euler-exponential", "dpmpp-2m-exponential",
                            *(f"{sampler}-{kind}" for kind in ("sgm-uniform", "normal", "simple", "kl-optimal",
                                                               "align-your-steps")
                              for sampler in ("euler", "dpmpp-2m", "dpmpp-2m-sde")),
                            *(f"euler-a-{kind}" for kind in ("karras", "exponential", "beta", "sgm-uniform", "normal",
                                                             "simple", "kl-optimal", "align-your-steps")))
    with pytest.raises(ValueError, match="ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, euler-karras, dpmpp-2m-sde"):
        S.make_tables("pndm", SD15, 20)
    with pytest.raises(ValueError, match="use_lu_lambdas"):
        S.make_tables("dpmpp-2m-karras", {**SD15, "use_lu_lambdas": True}, 20)
    for pair in (("use_karras_sigmas", "use_exponential_sigmas"), ("use_exponential_sigmas", "use_beta_sigmas")):
        with pytest.raises(ValueError, match="exclude each other"):  # as diffusers refuses the pair
            dpm_solver.make_tables({**SD15, **dict.fromkeys(pair, True)}, 20)
    with pytest.raises(ValueError, match="exclude each other"):
        euler.make_tables({**SD15, "use_karras_sigmas": True, "use_beta_sigmas": True}, 20)
    # a model config asking for exponential levels under a Karras name (or the plain one) gets the name's
    assert S.make_tables("dpmpp-2m-karras", {**SD15, "use_exponential_sigmas": True}, 20).sigmas[1] == \
        S.make_tables("dpmpp-2m-karras", SD15, 20).sigmas[1]
    deis = {**SD15, "algorithm_type": "deis"}  # diffusers maps it to dpmsolver++ but not with zero final
    with pytest.raises(ValueError, match="final_sigmas_type"):
        diffusers.DPMSolverMultistepScheduler.from_config(deis)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        dpm_solver.make_tables(deis, 20)  # the solver itself; the names fix the algorithm
    assert not S.make_tables("dpmpp-2m", deis, 20).sde and S.make_tables("dpmpp-2m-sde", deis, 20).sde
    with pytest.raises(ValueError, match="timestep_spacing"):
        S.make_tables("euler", {**SD15, "timestep_spacing": "karras"}, 20)
    ignored = {**SD15, "timestep_spacing": "trailing", "_use_default_values": ["timestep_spacing"]}
    assert S.make_tables("euler", ignored, 20).timesteps[0] == 999.0  # linspace: the class default
    # the name decides the noise levels, whatever the model's config says (or lists as left at its default)
    listed = {**SD15, "use_karras_sigmas": False, "_use_default_values": ["use_karras_sigmas"]}
    for config in (listed, {**SD15, "use_karras_sigmas": True}):
        for name, base in (("dpmpp-2m-karras", "dpmpp-2m"), ("euler-karras", "euler"), ("euler-beta", "euler"),
                           ("dpmpp-2m-beta", "dpmpp-2m")):
            karras, plain = S.make_tables(name, config, 10), S.make_tables(base, config, 10)
            np.testing.assert_array_equal(karras.sigmas, S.make_tables(name, SD15, 10).sigmas)
            np.testing.assert_array_equal(plain.sigmas, S.make_tables(base, SD15, 10).sigmas)
            assert karras.name == base and not np.array_equal(karras.sigmas, plain.sigmas)


def _a1111_reference(kind: str, n: int, abar: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's schedule types (1.9+, modules/sd_schedulers.py) as it defines them on k-diffusion's
    DiscreteSchedule of the model's float32 sigma table, in torch float32; written from those definitions,
    not from pm_runtime's code. Returns what A1111 steps through (n + 1 levels: the last is 0, or sigma_min
    for KL-optimal)."""
    table = ((1 - abar) / abar) ** 0.5
    log_table = table.log()
    sigma_min, sigma_max = table[0].item(), table[-1].item()

    def sigma_to_t(sigma: float) -> float:  # k-diffusion: log sigma interpolated between neighbours
        log_sigma = torch.tensor(sigma).log()
        below = (log_sigma - log_table[:, None]).ge(0).cumsum(0).argmax(0).clamp(max=len(table) - 2)
        lo, hi = log_table[below], log_table[below + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * below + w * (below + 1)).item()

    def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
        w = t.frac()
        return ((1 - w) * log_table[t.floor().long()] + w * log_table[t.ceil().long()]).exp()

    zero = torch.zeros(1)
    if kind == "karras":  # k-diffusion's get_sigmas_karras, rho 7
        ramp = torch.linspace(0, 1, n)
        hi, lo = sigma_max ** (1 / 7), sigma_min ** (1 / 7)
        return torch.cat([(hi + ramp * (lo - hi)) ** 7, zero])
    if kind == "exponential":  # k-diffusion's get_sigmas_exponential
        return torch.cat([torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp(), zero])
    if kind == "beta":  # A1111's beta_scheduler, alpha = beta = 0.6 (its defaults)
        from scipy import stats

        q = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        return torch.tensor([sigma_min + x * (sigma_max - sigma_min) for x in q] + [0.0])
    if kind in ("sgm-uniform", "normal"):
        start, end = sigma_to_t(sigma_max), sigma_to_t(sigma_min)
        ts = torch.linspace(start, end, n + 1)[:-1] if kind == "sgm-uniform" else torch.linspace(start, end, n)
        return torch.cat([t_to_sigma(ts), zero])
    if kind == "simple":
        stride = len(table) / n
        return torch.cat([torch.stack([table[-(1 + int(i * stride))] for i in range(n)]), zero])
    if kind == "kl-optimal":
        frac = torch.arange(n + 1) / n
        return torch.tan(frac * math.atan(sigma_min) + (1 - frac) * math.atan(sigma_max))
    if kind == "align-your-steps":
        sd15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        if n == len(sd15):
            return torch.tensor(sd15 + [0.0])
        rising = np.log(np.array(sd15[::-1]))
        resampled = np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(sd15)), rising))[::-1]
        return torch.cat([torch.tensor(resampled.copy(), dtype=torch.float32), zero])
    raise AssertionError(kind)


@pytest.mark.parametrize("num_steps", [1, 2, 10, 11, 20, 50, 999])
@pytest.mark.parametrize("kind", common.LEVEL_SCHEDULES + common.A1111_SCHEDULES)
def test_a1111_schedule_levels(kind, num_steps):
    """Each A1111 schedule type's noise levels against A1111's definitions (float32 there, float64 here), and
    the tables of every sampler on it: the levels, then 0 (KL-optimal: sigma_min, where A1111 ends it).
    Karras, Exponential and Beta take A1111's levels on Euler ancestral only (the others: diffusers')."""
    if kind == "beta":
        pytest.importorskip("scipy")
    abar = diffusers.DDPMScheduler.from_config(SD15).alphas_cumprod
    ref = _a1111_reference(kind, num_steps, abar).double().numpy()
    table = common.sigmas_f32(common.alphas_cumprod({**common.BASE_DEFAULTS, **SD15}))
    levels = common.schedule_levels(kind, float(table[0]), float(table[-1]), num_steps, table)
    assert levels.shape == (num_steps,) and np.all(np.diff(levels) < 0)
    np.testing.assert_allclose(levels, ref[:-1], rtol=1e-5)
    samplers = ("euler-a",) if kind in common.LEVEL_SCHEDULES else ("euler", "dpmpp-2m", "dpmpp-2m-sde", "euler-a")
    for sampler in samplers:
        tables = S.make_tables(f"{sampler}-{kind}", SD15, num_steps)
        np.testing.assert_allclose(tables.sigmas, ref, rtol=1e-5)
        assert tables.timesteps.dtype == np.float32  # fractional, as k-diffusion gives them
        np.testing.assert_allclose(tables.timesteps, common.sigma_to_t(levels, np.log(table)), rtol=1e-6)


def test_a1111_schedule_types_on_known_values():
    """Where an A1111 schedule type coincides with something known: Simple at 50 steps is diffusers' Euler
    with "trailing" spacing (every 20th table level from the top); Align Your Steps at 11 steps is NVIDIA's
    published SD 1.5 list; SGM Uniform and Normal start at the top of the table, and Normal ends at its bottom."""
    trailing = diffusers.EulerDiscreteScheduler.from_config({**SD15, "timestep_spacing": "trailing"})
    trailing.set_timesteps(50)
    simple = S.make_tables("euler-simple", SD15, 50)
    # (a table level's timestep comes back within float32 rounding of the integer: log of float64 vs float32)
    np.testing.assert_allclose(simple.timesteps, trailing.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(simple.sigmas, trailing.sigmas.numpy(), rtol=3e-7)
    ays = S.make_tables("dpmpp-2m-align-your-steps", SD15, 11)
    np.testing.assert_allclose(ays.sigmas, [*common.AYS_SD15, 0.0], rtol=1e-7)
    table = common.sigmas_f32(common.alphas_cumprod({**common.BASE_DEFAULTS, **SD15}))
    for kind in ("sgm-uniform", "normal"):
        t = S.make_tables(f"euler-{kind}", SD15, 7)
        assert t.timesteps[0] == 999 and t.sigmas[0] == np.float32(table[-1])
    normal = S.make_tables("euler-normal", SD15, 7)
    assert normal.sigmas[-2] == np.float32(table[0]) and normal.timesteps[-1] == 0
    for solver in (euler, dpm_solver):  # (a scheduler name fixes the key: the plain names to None)
        with pytest.raises(ValueError, match="pm_sigma_schedule='ddim' is not supported"):
            solver.make_tables({**SD15, SCHEDULE_KEY: "ddim"}, 7)
    assert S.make_tables("euler", {**SD15, SCHEDULE_KEY: "normal"}, 7).sigmas[1] == S.make_tables("euler", SD15, 7).sigmas[1]


def test_beta_quantiles_equal_scipys():
    """The Beta levels' quantile function (no scipy at run time) against scipy.stats.beta.ppf, which
    diffusers' and AUTOMATIC1111's beta schedules call."""
    from scipy import stats

    from pm_runtime.schedulers.common import beta_cdf, beta_ppf, beta_sigmas

    for a, b in ((0.6, 0.6), (0.5, 2.0), (2.0, 0.7), (1.0, 1.0)):
        for p in np.linspace(0, 1, 201):
            assert abs(beta_ppf(float(p), a, b) - stats.beta.ppf(p, a, b)) <= 4e-15, (a, b, p)
        for x in (1e-9, 0.01, 0.3, 0.5, 0.77, 0.999):
            assert abs(beta_cdf(x, a, b) - stats.beta.cdf(x, a, b)) <= 1e-14, (a, b, x)
    levels = beta_sigmas(0.03, 14.6, 12)
    assert levels[0] == 14.6 and levels[-1] == 0.03 and (np.diff(levels) < 0).all()


def test_float32_in_float32_out_and_float64_stays_float64():
    tables = S.make_tables("dpmpp-2m", SD2V, 7)
    for dtype in (np.float32, np.float64):
        x = np.ones(SHAPE, dtype)
        y, state = S.step(0, x, x, None, None, tables)
        assert y.dtype == dtype and state.prev_x0.dtype == dtype
        assert S.scale_model_input(0, x, S.make_tables("euler", SD15, 7)).dtype == dtype


def test_imports_without_torch():
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        sys.modules["diffusers"] = None
        import numpy as np
        import pm_runtime.schedulers as S
        for name in S.SCHEDULERS:
            tables = S.make_tables(name, {SD15!r}, 7)
            x, state = np.ones((1, 4, 8, 8), np.float32), None
            for i in range(tables.num_steps):
                x, state = S.step(i, 0.1 * S.scale_model_input(i, x, tables), x, state,
                                  np.zeros_like(x), tables)
            assert np.isfinite(x).all()
        assert not any(m.startswith(("torch", "diffusers")) for m, v in sys.modules.items() if v)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_img2img_steps_as_automatic1111_sets_them():
    """A1111's setup_img2img_steps when given the steps (its hires pass): the last `steps` of a schedule of
    int(steps / min(strength, 0.999))."""
    assert S.img2img_steps(20, 0.7) == (28, 8) and S.img2img_steps(20, 0.5) == (40, 20)
    assert S.img2img_steps(20, 1.0) == (20, 0) and S.img2img_steps(3, 0.25) == (12, 9)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="denoising strength"):
            S.img2img_steps(20, bad)


@pytest.mark.parametrize("name, total, start", [
    ("euler", 20, 6), ("euler-a", 20, 6), ("dpmpp-2m", 20, 6), ("dpmpp-2m", 10, 9), ("dpmpp-2m-karras", 28, 8),
    ("dpmpp-2m-sde", 20, 6), ("ddim", 20, 6), ("euler-karras", 20, 0), ("dpmpp-2m-sgm-uniform", 20, 6)])
def test_a_pass_from_a_later_step_matches_diffusers(name, total, start):
    """img2img from step `start` of a `total`-step schedule (the hires pass): the image latents noised to that
    step's level (start_latents; diffusers' add_noise there), then the sliced tables (slice_tables) step by
    step, against diffusers' scheduler started at that step (set_begin_index), per-step noise shared."""
    cfg = SD15
    rng = np.random.default_rng(3)
    x0, eps, a = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    n = total - start
    noise = rng.standard_normal((n,) + SHAPE).astype(np.float32)
    tables = S.slice_tables(S.make_tables(name, cfg, total), start)
    assert tables.num_steps == n
    ours = _step_ours(name, tables, S.start_latents(x0, eps, tables), a, noise)
    sched = _diffusers_scheduler(name, cfg, total)
    if hasattr(sched, "set_begin_index"):  # (DDIM steps by timestep value alone)
        sched.set_begin_index(start)
    timesteps = sched.timesteps[start:]
    xd = sched.add_noise(torch.from_numpy(x0.astype(np.float64)), torch.from_numpy(eps.astype(np.float64)),
                         timesteps[:1])
    np.testing.assert_allclose(S.start_latents(x0, eps, tables), xd.numpy(), rtol=1e-5, atol=1e-5)
    ref = _step_diffusers(sched, xd, timesteps, a, noise)
    np.testing.assert_allclose(tables.timesteps, timesteps.numpy(), rtol=2e-6)
    assert _max_error(ours, ref) <= TOL
