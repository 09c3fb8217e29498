"""Euler (k-diffusion's sample_euler, no churn), as diffusers' EulerDiscreteScheduler steps it.

The sample lives at noise level sigma (x = x0 + sigma * eps); the model sees x / sqrt(sigma^2+1)
and the step is x + (sigma_next - sigma) * (x - x0) / sigma, folded into two float64
coefficients per step. diffusers subtleties kept: sigmas are float32 values interpolated at
float32 timesteps ("linspace" timesteps are fractional), the last sigma is 0 or, with
final_sigmas_type "sigma_min", sigma at t = 0; init_noise_sigma is sigma_max for
linspace/trailing but sqrt(sigma_max^2 + 1) for "leading". With use_karras_sigmas (scheduler
"euler-karras") the spaced sigmas are replaced by Karras et al.'s (rho 7) between the first and the
last of them (or the config's sigma_max / sigma_min), and the timesteps by those sigmas' fractional
training timesteps, as diffusers sets them; with use_beta_sigmas ("euler-beta") the same with the
levels at the Beta(0.6, 0.6) quantiles (common.beta_sigmas), with use_exponential_sigmas
("euler-exponential") evenly spaced in log sigma; AUTOMATIC1111's schedule types ("euler-sgm-uniform",
...: common.schedule_levels) the same way over the same range, their timesteps fractional too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from .common import (BASE_DEFAULTS, Tables, alphas_cumprod, beta_sigmas, config_schedule, exponential_sigmas, frozen,
                     karras_sigmas, resolve_config, schedule_levels, sigma_to_t, sigmas_f32, spaced_timesteps)

NAME = "euler"

# EulerDiscreteScheduler.__init__'s arguments and defaults.
DEFAULTS: dict[str, Any] = {
    **BASE_DEFAULTS,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "final_sigmas_type": "zero",
}
SUPPORTED = {
    "prediction_type": ("epsilon", "v_prediction"),
    "interpolation_type": ("linear",),
    "use_karras_sigmas": (False, True, None),
    "use_exponential_sigmas": (False, True, None),
    "use_beta_sigmas": (False, True, None),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero", "sigma_min"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class EulerTables(Tables):
    # (n,) float64: prev = from_sample * sample + from_output * model_output
    from_sample: np.ndarray
    from_output: np.ndarray


_SPREADS = {"use_karras_sigmas": karras_sigmas, "use_exponential_sigmas": exponential_sigmas,
            "use_beta_sigmas": beta_sigmas}  # in diffusers' order of precedence


def sigma_schedule(cfg: Mapping[str, Any], num_steps: int, final: str, schedule: str | None = None):
    """(timesteps float32 (n,), sigmas float32 (n+1,), init_noise_sigma) as diffusers' Euler
    schedulers' set_timesteps give them; `final` is "zero" or "sigma_min"; `schedule` an A1111 schedule
    type (common.A1111_SCHEDULES), whose levels stand where Karras et al.'s would."""
    sig = sigmas_f32(alphas_cumprod(cfg, clamp_zero_snr=True))  # (T,) index = training timestep
    timesteps = spaced_timesteps(cfg["timestep_spacing"], int(cfg["num_train_timesteps"]), num_steps,
                                 int(cfg["steps_offset"])).astype(np.float32)
    last = sig[0] if final == "sigma_min" else np.float32(0.0)
    levels = np.interp(timesteps, np.arange(len(sig)), sig)
    spreads = [key for key in _SPREADS if cfg.get(key)]
    if len(spreads) > 1:  # diffusers refuses it too
        raise ValueError(f"scheduler 'euler': {' and '.join(spreads)} exclude each other")
    if schedule:  # as A1111: over the whole table, whatever the config's sigma_min / sigma_max
        levels = schedule_levels(schedule, float(sig[0]), float(sig[-1]), num_steps, sig)
        timesteps = sigma_to_t(levels, np.log(sig)).astype(np.float32)
    elif spreads:
        lo, hi = cfg.get("sigma_min"), cfg.get("sigma_max")
        lo, hi = float(levels[-1]) if lo is None else lo, float(levels[0]) if hi is None else hi
        levels = _SPREADS[spreads[0]](lo, hi, num_steps)
        timesteps = sigma_to_t(levels, np.log(sig)).astype(np.float32)
    sigmas = np.append(levels, last).astype(np.float32)
    sigma_max = float(sigmas.max())
    init = sigma_max if cfg["timestep_spacing"] in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    return timesteps, sigmas, init


def step_coefficients(prediction_type: str, sigma: np.ndarray, dt: np.ndarray):
    """(from_sample, from_output) of x + dt * (x - x0) / sigma, x0 from the model output."""
    if prediction_type == "epsilon":  # x0 = x - sigma * eps
        return np.ones_like(sigma), dt
    # v: x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v
    return 1.0 + dt * sigma / (sigma**2 + 1.0), dt / np.sqrt(sigma**2 + 1.0)


def make_tables(config: Mapping[str, Any], num_steps: int) -> EulerTables:
    cfg = resolve_config(NAME, DEFAULTS, config, SUPPORTED)
    timesteps, sigmas32, init = sigma_schedule(cfg, num_steps, cfg["final_sigmas_type"], config_schedule(config))
    sigmas = sigmas32.astype(np.float64)
    from_sample, from_output = step_coefficients(cfg["prediction_type"], sigmas[:-1], np.diff(sigmas))
    return EulerTables(
        name=NAME,
        init_noise_sigma=init,
        **frozen(timesteps=timesteps, sigmas=sigmas, input_scale=1.0 / np.sqrt(sigmas[:-1] ** 2 + 1.0),
                 from_sample=from_sample, from_output=from_output),
    )


def step(i: int, model_output, sample, state: None, noise: None, tables: EulerTables):
    """One Euler step: (prev_sample, None). `state` and `noise` are unused."""
    return float(tables.from_sample[i]) * sample + float(tables.from_output[i]) * model_output, None
