"""Latent upscaling for the hires fix, numpy only: AUTOMATIC1111's "Latent" upscalers, which resize the
first pass's latents with torch.nn.functional.interpolate(size=..., antialias=False) before the second
pass denoises them at the larger size (no VAE round trip).

    "latent"               bilinear, align_corners=False  (A1111's "Latent", its default hires upscaler)
    "latent-nearest"       nearest                        ("Latent (nearest)")
    "latent-nearest-exact" nearest-exact                  ("Latent (nearest-exact)")

Source positions as PyTorch computes them for a given output size (scale = in / out, float32):
bilinear src = scale * (dst + 0.5) - 0.5 clamped at 0, blending the two neighbours (the upper one
clamped to the last row/column) with float32 weights, columns then rows (PyTorch's values to a few
float32 ulps: its kernel sums in another order); nearest src = floor(dst * scale), nearest-exact
floor((dst + 0.5) * scale), both clamped to the last index (PyTorch's values exactly).
"""

from __future__ import annotations

import numpy as np

UPSCALERS = ("latent", "latent-nearest", "latent-nearest-exact")
A1111_NAMES = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "latent-nearest-exact": "Latent (nearest-exact)"}


def _nearest(size_in: int, size_out: int, exact: bool) -> np.ndarray:
    scale = np.float32(size_in) / np.float32(size_out)
    dst = np.arange(size_out, dtype=np.float32) + (np.float32(0.5) if exact else np.float32(0.0))
    return np.minimum(np.floor(dst * scale).astype(np.int64), size_in - 1)


def _linear(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w0, w1) per output index: out = w0 * in[i0] + w1 * in[i1]."""
    scale = np.float32(size_in) / np.float32(size_out)
    src = np.maximum(scale * (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def upscale(latents: np.ndarray, height: int, width: int, mode: str = "latent") -> np.ndarray:
    """(N, C, h, w) float32 -> (N, C, height, width) float32 by `mode` (UPSCALERS)."""
    x = np.asarray(latents, np.float32)
    if x.ndim != 4:
        raise ValueError(f"latents must be (N, C, h, w), got shape {x.shape}")
    if mode not in UPSCALERS:
        raise ValueError(f"unknown latent upscaler {mode!r}; valid: {', '.join(UPSCALERS)}")
    h, w = x.shape[2:]
    if mode == "latent":
        i0, i1, a, b = _linear(w, width)
        x = a * x[..., i0] + b * x[..., i1]
        i0, i1, a, b = _linear(h, height)
        return (a[:, None] * x[..., i0, :] + b[:, None] * x[..., i1, :]).astype(np.float32)
    exact = mode == "latent-nearest-exact"
    return np.ascontiguousarray(x[:, :, _nearest(h, height, exact)][..., _nearest(w, width, exact)])


__all__ = ["A1111_NAMES", "UPSCALERS", "upscale"]
