"""DDIM (eta = 0), as diffusers' DDIMScheduler steps it.

Per step: x0 and eps from (sample, model output), optional clip of x0, then
prev = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev) * eps.
diffusers subtlety kept: abar_prev is read at t - num_train_timesteps // num_steps, which is NOT
the next timestep for "linspace" / "trailing" spacing; below 0 it is `final_alpha_cumprod`
(1 with set_alpha_to_one, else abar[0]).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from .common import BASE_DEFAULTS, Tables, alphas_cumprod, frozen, resolve_config, spaced_timesteps

NAME = "ddim"

# DDIMScheduler.__init__'s arguments and defaults (from_config keeps exactly these keys).
DEFAULTS: dict[str, Any] = {
    **BASE_DEFAULTS,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
}
SUPPORTED = {"prediction_type": ("epsilon", "v_prediction"), "thresholding": (False,)}


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMTables(Tables):
    # (n,) float64 each: x0 = x0_from_sample*sample + x0_from_output*out, same for eps,
    # prev = prev_from_x0*x0 + prev_from_eps*eps.
    x0_from_sample: np.ndarray
    x0_from_output: np.ndarray
    eps_from_sample: np.ndarray
    eps_from_output: np.ndarray
    prev_from_x0: np.ndarray
    prev_from_eps: np.ndarray
    clip_sample_range: float | None  # clip x0 to [-r, r]; None: no clipping


def make_tables(config: Mapping[str, Any], num_steps: int) -> DDIMTables:
    cfg = resolve_config(NAME, DEFAULTS, config, SUPPORTED)
    num_train = int(cfg["num_train_timesteps"])
    abar32 = alphas_cumprod(cfg)
    final32 = np.float32(1.0) if cfg["set_alpha_to_one"] else abar32[0]

    timesteps = np.round(spaced_timesteps(cfg["timestep_spacing"], num_train, num_steps,
                                          int(cfg["steps_offset"]))).astype(np.int64)
    prev_t = timesteps - num_train // num_steps
    abar = abar32.astype(np.float64)[timesteps]
    abar_prev = np.where(prev_t >= 0, abar32.astype(np.float64)[np.maximum(prev_t, 0)], np.float64(final32))

    a, b = np.sqrt(abar), np.sqrt(1.0 - abar)  # sample = a * x0 + b * eps
    with np.errstate(divide="ignore"):  # abar = 0 (zero terminal SNR) is only usable with v
        if cfg["prediction_type"] == "epsilon":
            x0_s, x0_o, eps_s, eps_o = 1.0 / a, -b / a, np.zeros_like(a), np.ones_like(a)
        else:  # v = a * eps - b * x0
            x0_s, x0_o, eps_s, eps_o = a, -b, b, a
        sigmas = np.sqrt((1.0 - np.append(abar, final32)) / np.append(abar, final32))

    return DDIMTables(
        name=NAME,
        init_noise_sigma=1.0,
        clip_sample_range=float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None,
        **frozen(timesteps=timesteps, sigmas=sigmas, input_scale=np.ones(len(timesteps)),
                 x0_from_sample=x0_s, x0_from_output=x0_o, eps_from_sample=eps_s,
                 eps_from_output=eps_o, prev_from_x0=np.sqrt(abar_prev),
                 prev_from_eps=np.sqrt(1.0 - abar_prev)),
    )


def step(i: int, model_output, sample, state: None, noise: None, tables: DDIMTables):
    """One deterministic DDIM step: (prev_sample, None). `state` and `noise` are unused."""
    x0 = float(tables.x0_from_sample[i]) * sample + float(tables.x0_from_output[i]) * model_output
    eps = float(tables.eps_from_sample[i]) * sample + float(tables.eps_from_output[i]) * model_output
    if tables.clip_sample_range is not None:
        x0 = x0.clip(-tables.clip_sample_range, tables.clip_sample_range)
    return float(tables.prev_from_x0[i]) * x0 + float(tables.prev_from_eps[i]) * eps, None
