"""The project's noise generator: seeded, numpy-based, identical on every backend and machine.

Initial latents and any per-step noise (Euler ancestral) come from independent streams of one
seed, so changing the number of steps never changes the initial latents. A second denoising pass (the
hires fix: `pass_` 1) draws its noise from streams of its own.
"""

from __future__ import annotations

import numpy as np


def _stream(seed: int, stream: int) -> np.random.Generator:
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), stream])))


_PASS = 1 << 20  # streams per denoising pass (steps are at most a model's 1000 training timesteps)


def initial_latents(seed: int, shape: tuple[int, ...], pass_: int = 0) -> np.ndarray:
    """Standard-normal float32 latents, e.g. shape (N, 4, H/8, W/8); pass 1: the hires pass's added noise."""
    return _stream(seed, _PASS * int(pass_)).standard_normal(shape, dtype=np.float32)


def step_noise(seed: int, step: int, shape: tuple[int, ...], pass_: int = 0) -> np.ndarray:
    """Standard-normal float32 noise for denoising step `step` (0-based) of pass `pass_`."""
    return _stream(seed, _PASS * int(pass_) + 1 + int(step)).standard_normal(shape, dtype=np.float32)
