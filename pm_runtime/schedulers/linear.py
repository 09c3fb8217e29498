"""Every scheduler step as ONE affine update with per-step coefficients: what a device-side loop
(a captured CUDA graph, a TensorRT or ONNX step graph) is fed, so that nothing returns to the host
between steps and one graph serves every scheduler (DESIGN §3).

With o the (guided) model output at step i, x the sample and x0_prev the x0 of step i-1
(zeros before the first step), n the step's standard-normal noise (euler-a and DPM-Solver++ SDE):
    x0   = clamp(a*x + b*o, -clip, clip)
    eps  = c*x + d*o
    prev = e*x + f*o + g*x0 + h*eps + k*x0_prev + m*n
and x0 becomes the next step's x0_prev. Row i of `coef` holds (a, b, c, d, e, f, g, h, k, m).
The solvers (DDIM, Euler, Euler ancestral, DPM-Solver++ 2M and its SDE form) fill it from their Tables
(float64); `step` below applies it in numpy and is tested against schedulers.step over whole
trajectories. numpy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .common import Tables

COLUMNS = ("x0_x", "x0_o", "eps_x", "eps_o", "prev_x", "prev_o", "prev_x0", "prev_eps", "prev_x0prev", "prev_noise")
_COL = {name: j for j, name in enumerate(COLUMNS)}


@dataclasses.dataclass(frozen=True, eq=False)
class LinearSteps:
    coef: np.ndarray         # (n, 10) float64, columns COLUMNS
    clip: float              # x0 clamp range; inf when the scheduler does not clip
    timesteps: np.ndarray    # (n,) float64, the model's timestep at step i
    input_scale: np.ndarray  # (n,) float64, the UNet input is input_scale[i] * x
    init_noise_sigma: float
    needs_noise: bool

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def linear_steps(tables: Tables) -> LinearSteps:
    """The affine form of `tables` (any of the solvers)."""
    n = tables.num_steps
    coef = np.zeros((n, len(COLUMNS)))

    def put(col: str, values) -> None:
        coef[:, _COL[col]] = values

    clip, needs_noise = float("inf"), False
    if tables.name == "ddim":
        put("x0_x", tables.x0_from_sample), put("x0_o", tables.x0_from_output)
        put("eps_x", tables.eps_from_sample), put("eps_o", tables.eps_from_output)
        put("prev_x0", tables.prev_from_x0), put("prev_eps", tables.prev_from_eps)
        if tables.clip_sample_range is not None:
            clip = float(tables.clip_sample_range)
    elif tables.name in ("euler", "euler-a"):
        put("prev_x", tables.from_sample), put("prev_o", tables.from_output)
        if tables.name == "euler-a":
            put("prev_noise", tables.from_noise)
            needs_noise = True
    elif tables.name == "dpmpp-2m":
        put("x0_x", tables.x0_from_sample), put("x0_o", tables.x0_from_output)
        put("prev_x", tables.from_sample)
        second = np.asarray(tables.second_order, bool) & (np.arange(n) >= 1)  # step 0 has no history
        put("prev_x0", np.where(second, tables.second_x0, tables.first_x0))
        put("prev_x0prev", np.where(second, tables.second_prev, 0.0))
        if tables.sde:
            put("prev_noise", tables.from_noise)
            needs_noise = True
    else:
        raise ValueError(f"no affine form for scheduler {tables.name!r}")
    coef.setflags(write=False)
    return LinearSteps(coef, clip, np.asarray(tables.timesteps, np.float64), np.asarray(tables.input_scale),
                       float(tables.init_noise_sigma), needs_noise)


def step(i: int, model_output, sample, x0_prev, noise, lin: LinearSteps):
    """numpy reference of the affine update: (prev_sample, x0). x0_prev None = zeros; noise None
    only where its coefficient is 0."""
    a, b, c, d, e, f, g, h, k, m = (float(v) for v in lin.coef[i])
    x0 = a * sample + b * model_output
    if np.isfinite(lin.clip):
        x0 = x0.clip(-lin.clip, lin.clip)
    prev = e * sample + f * model_output + g * x0 + h * (c * sample + d * model_output)
    if x0_prev is not None and k != 0.0:
        prev = prev + k * x0_prev
    if m != 0.0:
        if noise is None:
            raise ValueError(f"step {i} needs noise")
        prev = prev + m * noise
    return prev.astype(sample.dtype, copy=False), x0
