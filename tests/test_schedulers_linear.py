"""The affine step form (pm_runtime.schedulers.linear) against the schedulers' own step functions:
the device-side loops are fed these coefficients, so they must reproduce every scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest

import pm_runtime.schedulers as S
from pm_runtime.schedulers import linear

CONFIGS = {
    "sd15": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1,
             "clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "leading"},
    "sd2-v": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1,
              "clip_sample": False, "prediction_type": "v_prediction"},
    "clip": {"clip_sample": True, "clip_sample_range": 0.5},  # diffusers' defaults; DDIM clips x0
}


def _trajectories(name, config, num_steps, start=0):
    tables = S.make_tables(name, config, num_steps)
    if start:  # a pass from a later step (the hires pass)
        tables = S.slice_tables(tables, start)
    lin = linear.linear_steps(tables)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 5)).astype(np.float32) * np.float32(tables.init_noise_sigma)
    a = rng.standard_normal(x.shape).astype(np.float32)
    noise = rng.standard_normal((num_steps,) + x.shape).astype(np.float32)
    ours, ref, state, x0_prev = x, x, None, None
    for i in range(tables.num_steps):
        assert lin.input_scale[i] == tables.input_scale[i] and lin.timesteps[i] == tables.timesteps[i]
        t = float(tables.timesteps[i])
        out_ref = 0.1 * S.scale_model_input(i, ref, tables) + math.sin(t / 100) * a
        out_ours = 0.1 * (np.float32(lin.input_scale[i]) * ours) + math.sin(t / 100) * a
        n = noise[i] if S.get_scheduler(name).needs_noise else None
        ref, state = S.step(i, out_ref, ref, state, n, tables)
        ours, x0_prev = linear.step(i, out_ours, ours, x0_prev, noise[i], lin)
    return ours, ref, lin


@pytest.mark.parametrize("num_steps", [50, 13, 1])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", S.SCHEDULERS)
def test_affine_form_reproduces_every_scheduler(name, config, num_steps):
    ours, ref, lin = _trajectories(name, CONFIGS[config], num_steps)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(ours - ref).max() <= 1e-5 * scale
    assert lin.needs_noise == S.get_scheduler(name).needs_noise


@pytest.mark.parametrize("name", ["dpmpp-2m", "dpmpp-2m-sde-karras", "euler-a", "ddim", "euler-sgm-uniform"])
def test_affine_form_of_a_pass_from_a_later_step(name):
    ours, ref, lin = _trajectories(name, CONFIGS["sd15"], 20, start=7)
    assert len(lin.timesteps) == 13
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_clip_and_history_columns_are_used():
    """The test above would pass for a form that never clips or never reads x0_prev if those
    columns were unused: check that they are filled where the schedulers need them."""
    ddim = linear.linear_steps(S.make_tables("ddim", CONFIGS["clip"], 10))
    assert ddim.clip == 0.5
    dpm = linear.linear_steps(S.make_tables("dpmpp-2m", {}, 10))
    k = dpm.coef[:, linear.COLUMNS.index("prev_x0prev")]
    assert k[0] == 0 and k[-1] == 0 and np.all(k[1:-1] != 0)
    assert np.isinf(dpm.clip)
    ea = linear.linear_steps(S.make_tables("euler-a", {}, 10))
    assert ea.needs_noise and np.all(ea.coef[:-1, linear.COLUMNS.index("prev_noise")] > 0)


def test_missing_noise_is_refused():
    lin = linear.linear_steps(S.make_tables("euler-a", {}, 5))
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="needs noise"):
        linear.step(0, x, x, None, None, lin)
