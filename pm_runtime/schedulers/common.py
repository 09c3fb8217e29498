"""What every scheduler shares: the Tables base, config resolution as diffusers' `from_config`
does it, the training noise schedule (alphas_cumprod) and the timestep spacings.

numpy only: the runtime imports this without torch. Values that diffusers computes in float32
torch are reproduced in float32 here (alphas_cumprod, sigmas) so the tables hold the very numbers
diffusers steps with (alphas_cumprod bit for bit; sigmas to within an ulp, torch's vectorised
float32 sqrt not being correctly rounded); per-step solver coefficients are then derived from
them in float64.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

SPACINGS = ("linspace", "leading", "trailing")

# The keys every scheduler here reads, with the default that all four diffusers classes share.
BASE_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


@dataclasses.dataclass(frozen=True, eq=False)
class Tables:
    """Everything a scheduler needs for one (config, num_steps), computed once.

    Arrays are read-only. Each scheduler extends this with its per-step solver coefficients
    (float64, one value per step), which is also what a device-side update would be fed.
    """

    name: str                 # registry name, e.g. "dpmpp-2m"
    timesteps: np.ndarray     # (n,) the model's timestep at step i; dtype as diffusers gives it
    sigmas: np.ndarray        # (n+1,) float64 sqrt((1 - abar) / abar) the model sees at step i; [n]: after the last
    init_noise_sigma: float   # initial latents = standard normal * this
    input_scale: np.ndarray   # (n,) float64 scale_model_input factor at step i

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def frozen(**arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Read-only copies, so a Tables value cannot be changed behind a step's back."""
    out = {}
    for key, value in arrays.items():
        value = np.array(value)
        value.setflags(write=False)
        out[key] = value
    return out


def resolve_config(name: str, defaults: Mapping[str, Any], config: Mapping[str, Any],
                   supported: Mapping[str, tuple] | None = None) -> dict[str, Any]:
    """The init arguments `<DiffusersClass>.from_config(config)` ends up with.

    Like diffusers: keys listed in `_use_default_values` are dropped, keys the class does not take
    (`_class_name`, `skip_prk_steps`, ...) are ignored, missing keys take THIS class's default
    (so SD 1.5's PNDM config, which may not name `timestep_spacing`, gives DDIM "leading" but
    Euler / DPM-Solver "linspace"). `supported` restricts options this module does not implement.
    """
    dropped = set(config.get("_use_default_values", ()))
    resolved = dict(defaults)
    resolved.update({k: v for k, v in config.items() if k in defaults and k not in dropped})
    check_supported(name, resolved, supported or {})
    return resolved


def check_supported(name: str, cfg: Mapping[str, Any], supported: Mapping[str, tuple]) -> None:
    """ValueError naming the first option whose value this module does not implement."""
    for key, allowed in {"timestep_spacing": SPACINGS, **supported}.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"scheduler {name!r}: {key}={cfg[key]!r} is not supported "
                             f"(supported: {', '.join(map(repr, allowed))})")


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on CPU, value for value: a float32 step, then
    start + step*i (fused multiply-add) for the first half and end - step*(n-1-i) for the rest.
    The float32 step makes torch's values drift from the exact ones; cumprod turns that drift
    into ~4e-7 relative error on alphas_cumprod, so it is mirrored rather than ignored."""
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32], np.float32)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    low = np.float64(start32) + step * i
    high = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < n // 2, low, high).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' betas_for_alpha_bar (squaredcos_cap_v2), in float64 then float32 as there."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                    np.float32)


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)  # torch accumulates in double


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' rescale_zero_terminal_snr (arXiv 2305.08891, Algorithm 1) in float32."""
    abar_sqrt = np.sqrt(_cumprod_f32(np.float32(1) - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return np.float32(1) - alphas


def alphas_cumprod(config: Mapping[str, Any], clamp_zero_snr: bool = False) -> np.ndarray:
    """(num_train_timesteps,) float32 abar_t as diffusers' schedulers compute it. With zero
    terminal SNR the sigma-based schedulers (Euler, DPM-Solver) clamp abar[-1] to 2**-24 so
    sigma stays finite (4096); DDIM keeps the exact 0 (clamp_zero_snr=False)."""
    n, schedule = int(config["num_train_timesteps"]), config["beta_schedule"]
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float32)
    elif schedule == "linear":
        betas = _linspace_f32(config["beta_start"], config["beta_end"], n)
    elif schedule == "scaled_linear":
        betas = _linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ValueError(f"beta_schedule={schedule!r} is not supported "
                         "(supported: 'linear', 'scaled_linear', 'squaredcos_cap_v2', trained_betas)")
    if config.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    abar = _cumprod_f32(np.float32(1) - betas)
    if config.get("rescale_betas_zero_snr") and clamp_zero_snr:
        abar[-1] = 2.0**-24
    return abar


def sigmas_f32(abar: np.ndarray) -> np.ndarray:
    """sqrt((1 - abar) / abar) in float32, index = training timestep."""
    with np.errstate(divide="ignore"):
        return np.sqrt((np.float32(1) - abar) / abar)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """(num_steps,) float64 noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho)
    (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5),
    as diffusers' _convert_to_karras computes them."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """(num_steps,) float64 noise levels from sigma_max down to sigma_min, evenly spaced in log sigma, as
    diffusers' _convert_to_exponential computes them."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; converges for
    x < (a + 1) / (a + b + 2))."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b): the Beta(a, b) distribution's CDF."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """The Beta(a, b) distribution's quantile function (scipy.stats.beta.ppf) by bisection of beta_cdf,
    to the last bit of float64 (no scipy at run time)."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return mid
        if beta_cdf(mid, a, b) < p:
            lo = mid
        else:
            hi = mid


def beta_sigmas(sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6, beta: float = 0.6
                ) -> np.ndarray:
    """(num_steps,) float64 noise levels from sigma_max down to sigma_min at the Beta(alpha, beta) quantiles
    of evenly spaced probabilities (Lee et al. 2024, "Beta Sampling is All You Need"), as diffusers'
    _convert_to_beta and AUTOMATIC1111's "Beta" schedule type compute them (both with alpha = beta = 0.6)."""
    q = [beta_ppf(float(t), alpha, beta) for t in 1.0 - np.linspace(0, 1, num_steps)]
    return np.array([sigma_min + x * (sigma_max - sigma_min) for x in q])


# AUTOMATIC1111's schedule types that diffusers' schedulers lack (A1111 1.9+ modules/sd_schedulers.py; the
# same names in ComfyUI), as the suffix of a pm-run scheduler name: "dpmpp-2m-sgm-uniform". A scheduler
# config names one under SCHEDULE_KEY (not a diffusers key: from_config ignores it); its levels then
# replace the spaced ones, as Karras et al.'s do (schedule_levels).
SCHEDULE_KEY = "pm_sigma_schedule"
A1111_SCHEDULES = ("sgm-uniform", "normal", "simple", "kl-optimal", "align-your-steps")
# and the ones diffusers has for Euler and DPM-Solver++ (use_karras_sigmas, ...), as A1111 computes them
# (over the whole table): for the sampler whose diffusers class has none of them, Euler ancestral
LEVEL_SCHEDULES = ("karras", "exponential", "beta")
# Align Your Steps (Sabour et al. 2024): NVIDIA's published 10-step noise levels for SD 1.5 (11 values, the
# last step's target included), log-linearly resampled for other step counts
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def t_to_sigma(t: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """float64 noise levels at (fractional) training timesteps: log sigma interpolated linearly between the
    neighbouring timesteps (k-diffusion's DiscreteSchedule.t_to_sigma, which A1111's schedule types use)."""
    t = np.asarray(t, np.float64)
    low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
    w = t - low
    return np.exp((1 - w) * log_sigmas[low].astype(np.float64) + w * log_sigmas[high].astype(np.float64))


def schedule_levels(kind: str, sigma_min: float, sigma_max: float, num_steps: int, sigmas: np.ndarray
                    ) -> np.ndarray:
    """(num_steps,) float64 noise levels of AUTOMATIC1111's schedule type `kind` (A1111_SCHEDULES or
    LEVEL_SCHEDULES), from sigma_max down; `sigmas` is the training table (float32, index = timestep). What
    each is, as A1111 defines it (n = num_steps, t(s) the training timestep of level s, sigma(t) the level
    at t):
      karras, exponential, beta: karras_sigmas, exponential_sigmas, beta_sigmas (diffusers' formulas are
                   k-diffusion's and A1111's) from sigma_max to sigma_min;
      sgm-uniform: sigma(t) at n points evenly spaced from t(sigma_max) towards t(sigma_min), that end
                   left out (Stability's sgm sampling);
      normal:      the same with both ends: the last level is sigma_min;
      simple:      the table's levels every len(table) / n timesteps from the top (index truncated);
      kl-optimal:  tan of n points evenly spaced from atan(sigma_max) towards atan(sigma_min), that end left
                   out (Sabour et al.'s KL-optimal schedule; A1111 ends its last step AT sigma_min: the
                   scheduler names fix final_sigmas_type "sigma_min" for it);
      align-your-steps: AYS_SD15, resampled to n points linearly in log sigma over their positions (A1111
                   uses the SD 1.5 list for every non-XL model; it does not read the model's range)."""
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    log_sigmas = np.log(sigmas.astype(np.float64))
    spread = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}.get(kind)
    if spread is not None:
        return spread(sigma_min, sigma_max, n)
    if kind in ("sgm-uniform", "normal"):
        start, end = sigma_to_t(np.array([sigma_max, sigma_min]), np.log(sigmas))
        ts = np.linspace(start, end, n + 1)[:-1] if kind == "sgm-uniform" else np.linspace(start, end, n)
        return t_to_sigma(ts, log_sigmas)
    if kind == "simple":
        step = len(sigmas) / n
        return np.array([sigmas[-(1 + int(x * step))] for x in range(n)], np.float64)
    if kind == "kl-optimal":
        frac = np.arange(n) / n
        return np.tan(frac * math.atan(sigma_min) + (1.0 - frac) * math.atan(sigma_max))
    if kind == "align-your-steps":
        if n == len(AYS_SD15):
            return np.array(AYS_SD15, np.float64)
        rising = np.log(np.array(AYS_SD15[::-1], np.float64))
        return np.exp(np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(AYS_SD15)), rising))[::-1].copy()
    raise ValueError(f"unknown schedule type {kind!r}; valid: {', '.join(LEVEL_SCHEDULES + A1111_SCHEDULES)}")


def config_schedule(config: Mapping[str, Any]) -> str | None:
    """The A1111 schedule type a scheduler config names (SCHEDULE_KEY), None for none; ValueError if unknown."""
    kind = config.get(SCHEDULE_KEY)
    if kind is not None and kind not in LEVEL_SCHEDULES + A1111_SCHEDULES:
        raise ValueError(f"{SCHEDULE_KEY}={kind!r} is not supported "
                         f"(supported: {', '.join(LEVEL_SCHEDULES + A1111_SCHEDULES)})")
    return kind


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """float64 training timesteps of `sigmas`: linear interpolation of log sigma between the two
    neighbouring training timesteps (`log_sigmas` float32, index = training timestep), as diffusers'
    _sigma_to_t does it, sigma by sigma (the same float64 / float32 arithmetic, vectorised)."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    dists = log_sigma[None, :] - log_sigmas[:, None]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def spaced_timesteps(spacing: str, num_train: int, num_steps: int, steps_offset: int) -> np.ndarray:
    """DDIM's / Euler's set_timesteps spacings, descending, float64 (linspace is not rounded:
    DDIM rounds it, Euler keeps the fractional timesteps)."""
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1] + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / num_steps)) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported (supported: {', '.join(SPACINGS)})")
