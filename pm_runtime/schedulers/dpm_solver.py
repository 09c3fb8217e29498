"""DPM-Solver++ 2M (multistep, data prediction, midpoint), and its stochastic form DPM-Solver++ 2M SDE
(algorithm_type "sde-dpmsolver++"), as diffusers' DPMSolverMultistepScheduler steps them.

With sigma the k-diffusion noise level, alpha_t = 1/sqrt(sigma^2+1), sigma_t = sigma*alpha_t and
lambda = log(alpha_t / sigma_t) = -log(sigma), so exp(-h) = sigma_next / sigma exactly: the
coefficients below are closed forms in float64 (no log/exp round trip, and the last step to
sigma = 0 needs no special case: it returns x0).
  first order:  prev = sigma_t'/sigma_t * x + alpha_t' (1 - e^-h) * x0
  second order: prev = sigma_t'/sigma_t * x + alpha_t' (1 - e^-h) * ((1 + 1/(2 r)) x0 - 1/(2 r) x0_prev),
                r = h_prev / h.
SDE (eta 1): e^-h becomes e^-2h in the x0 terms, the sample's factor gains e^-h, and each step adds
sigma_t' sqrt(1 - e^-2h) times the step's standard-normal noise.
With use_karras_sigmas (scheduler "dpmpp-2m-karras") the noise levels are Karras et al.'s (rho 7,
from the largest to the smallest training sigma) and each step's timestep is the training timestep of
its sigma, rounded (truncated for squaredcos_cap_v2), as diffusers sets them; with
use_exponential_sigmas ("dpmpp-2m-sde-exponential") they are evenly spaced in log sigma over the same
range, with use_beta_sigmas ("dpmpp-2m-beta", "dpmpp-2m-sde-beta") placed at the Beta(0.6, 0.6)
distribution's quantiles of evenly spaced probabilities over it, their timesteps truncated. AUTOMATIC1111's
schedule types ("dpmpp-2m-sgm-uniform", ...: common.schedule_levels) take the Karras levels' place over
the same range, their timesteps left fractional (float32), as k-diffusion's samplers in A1111 give them
(diffusers would cast them to int64; nothing else of its step reads them).
diffusers subtleties kept: its own spacings (n+1 points, the last dropped; "leading" uses
last_timestep // (n+1)), lambda_min_clipped, the first step is first order (no history), and the
last step is first order when final_sigmas_type is "zero" (always, by default), euler_at_final,
or lower_order_final with fewer than 15 steps. algorithm_type "deis" and solver_type
"logrho"/"bh1"/"bh2" (e.g. from a UniPC config) are mapped as diffusers maps them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from .common import (BASE_DEFAULTS, SPACINGS, Tables, alphas_cumprod, beta_sigmas, check_supported, config_schedule,
                     exponential_sigmas, frozen, karras_sigmas, resolve_config, schedule_levels, sigma_to_t,
                     sigmas_f32)

NAME = "dpmpp-2m"

# DPMSolverMultistepScheduler.__init__'s arguments and defaults.
DEFAULTS: dict[str, Any] = {
    **BASE_DEFAULTS,
    "solver_order": 2,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}
_ALIASES = {"algorithm_type": {"deis": "dpmsolver++"},
            "solver_type": {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}}
SUPPORTED = {
    "prediction_type": ("epsilon", "v_prediction"),
    "solver_order": (1, 2),
    "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
    "solver_type": ("midpoint",),
    "thresholding": (False,),
    "variance_type": (None,),
    "final_sigmas_type": ("zero", "sigma_min"),
    "use_karras_sigmas": (False, True),
    "use_exponential_sigmas": (False, True),
    "use_beta_sigmas": (False, True),
    **{key: (False,) for key in ("use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting")},
}


@dataclasses.dataclass(frozen=True, eq=False)
class DPMState:
    """What the second-order update needs from the previous step."""

    prev_x0: Any   # the previous step's x0 prediction, shaped like the sample
    index: int     # the step that produced it


@dataclasses.dataclass(frozen=True, eq=False)
class DPMTables(Tables):
    # (n,) float64: x0 = x0_from_sample * sample + x0_from_output * model_output
    x0_from_sample: np.ndarray
    x0_from_output: np.ndarray
    from_sample: np.ndarray    # sigma_t(next) / sigma_t(this), both orders
    first_x0: np.ndarray       # first order: coefficient of x0
    second_x0: np.ndarray      # second order: coefficient of x0 ...
    second_prev: np.ndarray    # ... and of the previous step's x0
    second_order: np.ndarray   # (n,) bool: step i may use the second-order update
    from_noise: np.ndarray     # (n,) coefficient of the step's standard-normal noise (0 without SDE)
    sde: bool                  # algorithm_type "sde-dpmsolver++": every step needs noise


def _timesteps(cfg: Mapping[str, Any], abar32: np.ndarray, num_steps: int) -> np.ndarray:
    num_train, spacing = int(cfg["num_train_timesteps"]), cfg["timestep_spacing"]
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
    lambdas = np.log(np.sqrt(abar32)) - np.log(np.sqrt(np.float32(1) - abar32))  # float32, as diffusers
    clipped = int(np.searchsorted(lambdas[::-1], np.float32(cfg["lambda_min_clipped"]), side="left"))
    last = num_train - clipped
    if spacing == "linspace":
        return np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (num_steps + 1)
        return (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(cfg["steps_offset"])
    if spacing == "trailing":
        return np.arange(last, 0, -num_train / num_steps).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported (supported: {', '.join(SPACINGS)})")


def make_tables(config: Mapping[str, Any], num_steps: int) -> DPMTables:
    cfg = resolve_config(NAME, DEFAULTS, config)
    if cfg["algorithm_type"] == "deis" and cfg["final_sigmas_type"] == "zero":  # diffusers refuses it too
        raise ValueError("scheduler 'dpmpp-2m': algorithm_type 'deis' needs final_sigmas_type 'sigma_min'")
    cfg = {k: _ALIASES[k].get(v, v) if k in _ALIASES else v for k, v in cfg.items()}
    check_supported(NAME, cfg, SUPPORTED)
    if sum(bool(cfg[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) > 1:
        raise ValueError("scheduler 'dpmpp-2m': use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas "
                         "exclude each other")  # diffusers refuses it too
    abar32 = alphas_cumprod(cfg, clamp_zero_snr=True)
    sig32 = sigmas_f32(abar32)
    timesteps = _timesteps(cfg, abar32, num_steps)
    schedule = config_schedule(config)
    if schedule:  # an A1111 schedule type over the whole range
        levels = schedule_levels(schedule, float(sig32[0]), float(sig32[-1]), num_steps, sig32)
        timesteps = sigma_to_t(levels, np.log(sig32)).astype(np.float32)
    elif cfg["use_karras_sigmas"]:  # from sigma at the last training timestep to sigma at the first
        levels = karras_sigmas(float(sig32[0]), float(sig32[-1]), num_steps)
        t = sigma_to_t(levels, np.log(sig32))
        # diffusers rounds them, except for the cosine schedule, whose float timesteps its int64 cast truncates
        timesteps = (t if cfg["beta_schedule"] == "squaredcos_cap_v2" else t.round()).astype(np.int64)
    elif cfg["use_exponential_sigmas"] or cfg["use_beta_sigmas"]:  # over the same range; timesteps truncated
        # evenly in log sigma, or at the Beta(0.6, 0.6) quantiles of evenly spaced probabilities
        spread = exponential_sigmas if cfg["use_exponential_sigmas"] else beta_sigmas
        levels = spread(float(sig32[0]), float(sig32[-1]), num_steps)
        timesteps = sigma_to_t(levels, np.log(sig32)).astype(np.int64)
    else:  # the spaced timesteps' sigmas (one past the table is refused below)
        levels = np.interp(timesteps, np.arange(len(sig32)), sig32)
    n = len(timesteps)  # diffusers uses len(timesteps) from here on
    if timesteps.max() >= len(sig32):  # diffusers would run on and produce NaN (repeated sigma)
        raise ValueError(f"scheduler 'dpmpp-2m': {num_steps} steps with {cfg['timestep_spacing']!r} "
                         f"spacing and steps_offset {cfg['steps_offset']} reach timestep {timesteps.max()}")
    last = sig32[0] if cfg["final_sigmas_type"] == "sigma_min" else np.float32(0.0)
    sigmas = np.append(levels, last).astype(np.float32)
    s = sigmas.astype(np.float64)                      # (n+1,)
    alpha = 1.0 / np.sqrt(s**2 + 1.0)                  # VP alpha_t
    sig_vp = s * alpha                                 # VP sigma_t

    if cfg["prediction_type"] == "epsilon":            # x0 = (x - sigma_t eps) / alpha_t
        x0_s, x0_o = 1.0 / alpha[:-1], -s[:-1]
    else:                                              # x0 = alpha_t x - sigma_t v
        x0_s, x0_o = alpha[:-1], -sig_vp[:-1]
    ratio = s[1:] / s[:-1]                             # e^-h
    sde = cfg["algorithm_type"] == "sde-dpmsolver++"
    if sde:
        from_sample = sig_vp[1:] / sig_vp[:-1] * ratio
        first = alpha[1:] * (1.0 - ratio**2)           # alpha_t' (1 - e^-2h)
        from_noise = sig_vp[1:] * np.sqrt(1.0 - ratio**2)
    else:
        from_sample = sig_vp[1:] / sig_vp[:-1]
        first = alpha[1:] * (1.0 - ratio)              # alpha_t' (1 - e^-h)
        from_noise = np.zeros(n)

    second_x0, second_prev = np.zeros(n), np.zeros(n)
    for i in range(1, n):
        if 0.0 < s[i + 1] < s[i]:  # h > 0 (Karras or exponential levels with a sigma_min final repeat it: h = 0)
            r = math.log(s[i - 1] / s[i]) / math.log(s[i] / s[i + 1])
            second_x0[i] = first[i] * (1.0 + 0.5 / r)
            second_prev[i] = -first[i] * 0.5 / r
    lower_order_last = (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                        or cfg["final_sigmas_type"] == "zero")
    second_order = np.arange(n) >= 1
    if cfg["solver_order"] == 1:
        second_order[:] = False
    if lower_order_last:
        second_order[-1] = False

    return DPMTables(
        name=NAME,
        init_noise_sigma=1.0,
        **frozen(timesteps=timesteps, sigmas=s, input_scale=np.ones(n), x0_from_sample=x0_s,
                 x0_from_output=x0_o, from_sample=from_sample, first_x0=first, second_x0=second_x0,
                 second_prev=second_prev, second_order=second_order, from_noise=from_noise),
        sde=sde,
    )


def step(i: int, model_output, sample, state: DPMState | None, noise, tables: DPMTables):
    """One DPM-Solver++ 2M step: (prev_sample, DPMState). Start with state=None; `noise` (standard normal,
    shaped like the sample) is the SDE form's, unused otherwise."""
    x0 = float(tables.x0_from_sample[i]) * sample + float(tables.x0_from_output[i]) * model_output
    prev = float(tables.from_sample[i]) * sample
    if state is not None and tables.second_order[i]:
        if state.index != i - 1:
            raise ValueError(f"dpmpp-2m: step {i} was given the state of step {state.index}")
        prev = prev + float(tables.second_x0[i]) * x0 + float(tables.second_prev[i]) * state.prev_x0
    else:
        prev = prev + float(tables.first_x0[i]) * x0
    if tables.sde:
        if noise is None:
            raise ValueError(f"dpmpp-2m-sde: step {i} needs noise")
        prev = prev + float(tables.from_noise[i]) * noise
    return prev, DPMState(prev_x0=x0, index=i)
