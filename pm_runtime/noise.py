"""The project's noise generator: seeded, numpy-based, identical on every backend and machine.

Initial latents and any per-step noise (Euler ancestral) come from independent streams of one
seed, so changing the number of steps never changes the initial latents.
"""

from __future__ import annotations

import numpy as np


def _stream(seed: int, stream: int) -> np.random.Generator:
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), stream])))


def initial_latents(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal float32 latents, e.g. shape (N, 4, H/8, W/8)."""
    return _stream(seed, 0).standard_normal(shape, dtype=np.float32)


def step_noise(seed: int, step: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal float32 noise for denoising step `step` (0-based)."""
    return _stream(seed, 1 + int(step)).standard_normal(shape, dtype=np.float32)
