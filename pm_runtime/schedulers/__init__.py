"""Pure-function samplers that reproduce diffusers' schedulers from the same scheduler config.

    tables = make_tables("dpmpp-2m", scheduler_config, num_steps)   # once, numpy only
    x = initial_latents * tables.init_noise_sigma
    state = None
    for i, t in enumerate(tables.timesteps):
        out = unet(scale_model_input(i, x, tables), t, ...)
        x, state = step(i, out, x, state, noise_i_or_None, tables)

No hidden step counter: a step is a function of its arguments (k-diffusion style), so the loop can
be captured as a graph, run from any step (img2img) and tested step by step against diffusers.
Arrays keep their dtype (float32 in, float32 out); coefficients are computed in float64.
numpy only: nothing here imports torch or diffusers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from . import ddim, dpm_solver, euler, euler_ancestral
from .common import A1111_SCHEDULES, LEVEL_SCHEDULES, SCHEDULE_KEY, Tables
from .dpm_solver import DPMState


@dataclasses.dataclass(frozen=True)
class Scheduler:
    name: str
    make_tables: Callable[[Mapping[str, Any], int], Tables]  # (config, num_steps) -> tables
    step: Callable  # (i, model_output, sample, state, noise, tables) -> (prev_sample, state)
    needs_noise: bool  # step wants standard-normal `noise` shaped like the sample
    diffusers_class: str  # the diffusers scheduler it reproduces (from_config of config(model's config))
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config values the name sets

    def config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The model's scheduler config with the values this name fixes (its noise-level schedule:
        "dpmpp-2m" is not Karras even where the model's config says so, "dpmpp-2m-karras" is)."""
        out = {**config, **self.fixed}
        if "_use_default_values" in config:  # a fixed key listed there would be dropped by from_config
            out["_use_default_values"] = [k for k in config["_use_default_values"] if k not in self.fixed]
        return out


def _levels(karras: bool = False, beta: bool = False, exponential: bool = False, schedule: str | None = None
            ) -> dict[str, Any]:
    out = {"use_karras_sigmas": karras, "use_beta_sigmas": beta, "use_exponential_sigmas": exponential,
           SCHEDULE_KEY: schedule}
    if schedule:  # as A1111: over the whole training table (schedule_levels' range), and Euler's initial
        # noise sigma_max (not diffusers' sqrt(sigma_max^2 + 1) of "leading"), whatever spacing the config sets
        out["timestep_spacing"] = "linspace"
    if schedule == "kl-optimal":  # A1111's KL-optimal levels end at sigma_min, not 0
        out["final_sigmas_type"] = "sigma_min"
    return out


def _dpm(karras: bool, sde: bool, exponential: bool = False, beta: bool = False, schedule: str | None = None
         ) -> dict[str, Any]:
    return {**_levels(karras, beta, exponential, schedule), "algorithm_type": "sde-dpmsolver++" if sde else "dpmsolver++"}


def _a1111_schedules():
    """Euler, DPM-Solver++ 2M and its SDE form on each of AUTOMATIC1111's other schedule types ("Exponential"
    where diffusers has it but no name did yet): "euler-sgm-uniform", "dpmpp-2m-kl-optimal", ...; Euler
    ancestral on all of them"""
    for kind in ("exponential", *A1111_SCHEDULES):
        schedule = None if kind == "exponential" else kind
        exponential = kind == "exponential"
        yield Scheduler(f"euler-{kind}", euler.make_tables, euler.step, False, "EulerDiscreteScheduler",
                        _levels(exponential=exponential, schedule=schedule))
        yield Scheduler(f"dpmpp-2m-{kind}", dpm_solver.make_tables, dpm_solver.step, False,
                        "DPMSolverMultistepScheduler", _dpm(False, sde=False, exponential=exponential, schedule=schedule))
        if kind != "exponential":  # dpmpp-2m-sde-exponential is above
            yield Scheduler(f"dpmpp-2m-sde-{kind}", dpm_solver.make_tables, dpm_solver.step, True,
                            "DPMSolverMultistepScheduler", _dpm(False, sde=True, schedule=schedule))
    # Euler ancestral, whose diffusers class has no noise-level options, on every type, A1111's way
    for kind in (*LEVEL_SCHEDULES, *A1111_SCHEDULES):
        yield Scheduler(f"euler-a-{kind}", euler_ancestral.make_tables, euler_ancestral.step, True,
                        "EulerAncestralDiscreteScheduler", _levels(schedule=kind))


_REGISTRY = {
    s.name: s
    for s in (
        Scheduler(ddim.NAME, ddim.make_tables, ddim.step, False, "DDIMScheduler"),
        Scheduler(euler.NAME, euler.make_tables, euler.step, False, "EulerDiscreteScheduler", _levels()),
        Scheduler(euler_ancestral.NAME, euler_ancestral.make_tables, euler_ancestral.step, True,
                  "EulerAncestralDiscreteScheduler"),
        Scheduler(dpm_solver.NAME, dpm_solver.make_tables, dpm_solver.step, False,
                  "DPMSolverMultistepScheduler", _dpm(karras=False, sde=False)),
        # the same solvers on Karras et al.'s noise levels (AUTOMATIC1111's "DPM++ 2M Karras"), and
        # DPM-Solver++ 2M's stochastic form; their Tables keep the solver's name, which is what a step and
        # a device-side update dispatch on
        Scheduler("dpmpp-2m-karras", dpm_solver.make_tables, dpm_solver.step, False,
                  "DPMSolverMultistepScheduler", _dpm(karras=True, sde=False)),
        Scheduler("euler-karras", euler.make_tables, euler.step, False, "EulerDiscreteScheduler", _levels(karras=True)),
        Scheduler("dpmpp-2m-sde", dpm_solver.make_tables, dpm_solver.step, True,
                  "DPMSolverMultistepScheduler", _dpm(karras=False, sde=True)),
        Scheduler("dpmpp-2m-sde-karras", dpm_solver.make_tables, dpm_solver.step, True,
                  "DPMSolverMultistepScheduler", _dpm(karras=True, sde=True)),
        # noise levels evenly spaced in log sigma: AUTOMATIC1111's "DPM++ 2M SDE Exponential", its default
        # schedule for DPM++ 2M SDE since 1.9
        Scheduler("dpmpp-2m-sde-exponential", dpm_solver.make_tables, dpm_solver.step, True,
                  "DPMSolverMultistepScheduler", _dpm(karras=False, sde=True, exponential=True)),
        # noise levels at the Beta(0.6, 0.6) quantiles (Lee et al. 2024): AUTOMATIC1111's "Beta" schedule type
        Scheduler("dpmpp-2m-beta", dpm_solver.make_tables, dpm_solver.step, False,
                  "DPMSolverMultistepScheduler", _dpm(karras=False, sde=False, beta=True)),
        Scheduler("euler-beta", euler.make_tables, euler.step, False, "EulerDiscreteScheduler", _levels(beta=True)),
        Scheduler("dpmpp-2m-sde-beta", dpm_solver.make_tables, dpm_solver.step, True,
                  "DPMSolverMultistepScheduler", _dpm(karras=False, sde=True, beta=True)),
        *_a1111_schedules(),
    )
}
SCHEDULERS: tuple[str, ...] = tuple(_REGISTRY)


def get_scheduler(name: str) -> Scheduler:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}") from None


def make_tables(name: str, config: Mapping[str, Any], num_steps: int) -> Tables:
    """Precompute everything for `num_steps` steps from a diffusers scheduler config dict (any
    class's: it is read as `<diffusers class>.from_config(config)` would read it)."""
    s = get_scheduler(name)
    return s.make_tables(s.config(config), int(num_steps))


def step(i: int, model_output, sample, state, noise, tables: Tables):
    """Step i: returns (prev_sample, new_state). Pure: inputs are never modified. `state` is None
    before the first step (and for every step of single-step solvers); `noise` is the step's
    standard-normal noise for samplers with `needs_noise`, else ignored (pass None)."""
    return get_scheduler(tables.name).step(i, model_output, sample, state, noise, tables)


def img2img_steps(steps: int, strength: float) -> tuple[int, int]:
    """(schedule steps, first step) of a pass that denoises for `steps` steps from an image noised by
    denoising strength `strength` in (0, 1], as AUTOMATIC1111 sets them when it is given the steps (its
    hires fix): the last `steps` steps of a schedule of int(steps / min(strength, 0.999)) steps."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"denoising strength must be in (0, 1], got {strength}")
    total = int(steps / min(strength, 0.999))
    return total, total - steps


def img2img_start(steps: int, strength: float, name: str = "") -> tuple[int, int]:
    """(first step, noise step) of img2img's pass over a `steps`-step schedule of scheduler `name` at
    denoising strength `strength` in (0, 1], as AUTOMATIC1111 sets them when it is not given the pass's
    steps (its img2img tab, without the "fix steps" option), t_enc = int(min(strength, 0.999) * steps):
    its k-diffusion samplers run the schedule from step steps - t_enc - 1, t_enc + 1 steps, from the image
    noised to that step's level (diffusers' img2img runs int(steps * strength): one fewer below strength 1);
    its DDIM runs t_enc steps (at least 1 here) from step steps - t_enc, the image noised to the level of
    the step before (modules/sd_samplers_timesteps.py: timesteps[:t_enc], alphas_cumprod[timesteps[t_enc]])."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"denoising strength must be in (0, 1], got {strength}")
    t_enc = int(min(strength, 0.999) * steps)
    if name == ddim.NAME:
        first = steps - max(t_enc, 1)
        return first, max(first - 1, 0)
    return steps - t_enc - 1, steps - t_enc - 1


def slice_tables(tables: Tables, start: int) -> Tables:
    """Steps start..n-1 of `tables` as a schedule of their own (img2img, the hires pass): every per-step
    array from `start`, the noise levels from the one the pass starts at; DPM-Solver++'s first step first
    order (no history yet), as diffusers' and k-diffusion's are when started there. The last step keeps
    what the whole schedule says of it (diffusers decides lower_order_final on the whole length too)."""
    n = tables.num_steps
    if not 0 <= start < n:
        raise ValueError(f"the first step must be in [0, {n}), got {start}")
    fields = {}
    for f in dataclasses.fields(tables):
        value = getattr(tables, f.name)
        if isinstance(value, np.ndarray) and value.ndim >= 1 and len(value) in (n, n + 1):
            value = value[start:]  # a view of a read-only array stays read-only
            if f.name == "second_order":
                value = value.copy()
                value[0] = False
                value.setflags(write=False)
            fields[f.name] = value
    return dataclasses.replace(tables, **fields)


def start_latents(x0, noise, tables: Tables):
    """The sample a pass begins with at the first step of `tables` (slice_tables): the image latents x0
    noised to that step's level sigma = tables.sigmas[0], in the space the sampler steps: x0 + sigma * noise
    for Euler and Euler ancestral (k-diffusion's, and diffusers' add_noise there); for DPM-Solver++ and DDIM,
    which step the variance-preserving sample, that divided by sqrt(sigma^2 + 1) (diffusers' add_noise)."""
    sigma = float(tables.sigmas[0])
    x = x0 + np.float32(sigma) * noise
    if tables.name in (euler.NAME, euler_ancestral.NAME):
        return x
    return x * np.float32(1.0 / math.sqrt(sigma * sigma + 1.0))


def scale_model_input(i: int, sample, tables: Tables):
    """The UNet input at step i (diffusers' scheduler.scale_model_input)."""
    scale = float(tables.input_scale[i])
    return sample if scale == 1.0 else sample * scale


__all__ = ["SCHEDULERS", "DPMState", "Scheduler", "Tables", "get_scheduler", "img2img_start", "img2img_steps",
           "make_tables", "scale_model_input", "slice_tables", "start_latents", "step"]
