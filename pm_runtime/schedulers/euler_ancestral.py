"""Euler ancestral (k-diffusion's sample_euler_ancestral, eta = 1), as diffusers'
EulerAncestralDiscreteScheduler steps it.

Each step goes deterministically down to sigma_down and adds sigma_up * noise, with
sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),
sigma_down = sqrt(sigma_next^2 - sigma_up^2). The caller supplies the standard-normal `noise`
for every step (pm_runtime.noise.step_noise), so no RNG hides in here. Schedule as in
euler.py, except the last sigma is always 0 (this diffusers class has no final_sigmas_type), and the
only other noise levels are AUTOMATIC1111's schedule types ("euler-a-karras", "euler-a-sgm-uniform", ...:
common.schedule_levels, their timesteps fractional; KL-optimal's last sigma is sigma_min, as A1111's).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from .common import BASE_DEFAULTS, Tables, config_schedule, frozen, resolve_config
from .euler import sigma_schedule, step_coefficients

NAME = "euler-a"

# EulerAncestralDiscreteScheduler.__init__'s arguments and defaults.
DEFAULTS: dict[str, Any] = {**BASE_DEFAULTS, "timestep_spacing": "linspace"}
SUPPORTED = {"prediction_type": ("epsilon", "v_prediction")}


@dataclasses.dataclass(frozen=True, eq=False)
class EulerAncestralTables(Tables):
    # (n,) float64: prev = from_sample * sample + from_output * model_output + from_noise * noise
    from_sample: np.ndarray
    from_output: np.ndarray
    from_noise: np.ndarray  # sigma_up


def make_tables(config: Mapping[str, Any], num_steps: int) -> EulerAncestralTables:
    cfg = resolve_config(NAME, DEFAULTS, config, SUPPORTED)
    schedule = config_schedule(config)
    timesteps, sigmas32, init = sigma_schedule(cfg, num_steps, "sigma_min" if schedule == "kl-optimal" else "zero",
                                               schedule)
    sigmas = sigmas32.astype(np.float64)
    s_from, s_to = sigmas[:-1], sigmas[1:]
    s_up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
    s_down = np.sqrt(s_to**2 - s_up**2)
    from_sample, from_output = step_coefficients(cfg["prediction_type"], s_from, s_down - s_from)
    return EulerAncestralTables(
        name=NAME,
        init_noise_sigma=init,
        **frozen(timesteps=timesteps, sigmas=sigmas, input_scale=1.0 / np.sqrt(s_from**2 + 1.0),
                 from_sample=from_sample, from_output=from_output, from_noise=s_up),
    )


def step(i: int, model_output, sample, state: None, noise, tables: EulerAncestralTables):
    """One Euler-ancestral step: (prev_sample, None). `noise`: standard normal, shaped like
    `sample`; it may be None only where sigma_up is 0 (the last step)."""
    prev = float(tables.from_sample[i]) * sample + float(tables.from_output[i]) * model_output
    sigma_up = float(tables.from_noise[i])
    if sigma_up == 0.0:
        return prev, None
    if noise is None:
        raise ValueError(f"scheduler 'euler-a' needs per-step noise (step {i} of {tables.num_steps})")
    return prev + sigma_up * noise, None
