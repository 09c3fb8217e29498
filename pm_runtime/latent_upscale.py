"""Latent upscaling for the hires fix, numpy only: AUTOMATIC1111's "Latent" upscalers, which resize the
first pass's latents with torch.nn.functional.interpolate(size=..., antialias=False) before the second
pass denoises them at the larger size (no VAE round trip).

    "latent"               bilinear, align_corners=False  (A1111's "Latent", its default hires upscaler)
    "latent-nearest"       nearest                        ("Latent (nearest)")
    "latent-nearest-exact" nearest-exact                  ("Latent (nearest-exact)")

And A1111's two image upscalers that need no model (upscale_image): the first pass's image (as A1111
makes it: 255 x clip((x + 1) / 2) truncated to uint8) resized with Pillow, then encoded again by the
bundle's VAE encoder (pm_runtime.pipeline):

    "lanczos"              Image.LANCZOS                  ("Lanczos")
    "nearest"              Image.NEAREST                  ("Nearest")

As A1111's images.resize_image (mode 0) with those upscalers does it: scale = max(W / w, H / h); above 1,
the upscaler's resize to int(side x scale), then Lanczos to int(side x scale // 8 * 8) where that differs
(Upscaler.upscale); then Lanczos to W x H where that differs (the hires sizes here are multiples of 64 =
int(side x scale) in all but rounding corner cases, so one resize).

Source positions as PyTorch computes them for a given output size (scale = in / out, float32):
bilinear src = scale * (dst + 0.5) - 0.5 clamped at 0, blending the two neighbours (the upper one
clamped to the last row/column) with float32 weights, columns then rows (PyTorch's values to a few
float32 ulps: its kernel sums in another order); nearest src = floor(dst * scale), nearest-exact
floor((dst + 0.5) * scale), both clamped to the last index (PyTorch's values exactly).
"""

from __future__ import annotations

import numpy as np

UPSCALERS = ("latent", "latent-nearest", "latent-nearest-exact")
IMAGE_UPSCALERS = ("lanczos", "nearest")
HIRES_UPSCALERS = (*UPSCALERS, *IMAGE_UPSCALERS)
A1111_NAMES = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "latent-nearest-exact": "Latent (nearest-exact)",
               "lanczos": "Lanczos", "nearest": "Nearest"}


def a1111_pixels(image: np.ndarray) -> np.ndarray:
    """A decoded image batch (N, 3, H, W) in [-1, 1] as A1111 hands it to an image upscaler: (N, H, W, 3)
    uint8, 255 x clip((x + 1) / 2, 0, 1) truncated (not rounded), in float32."""
    x = np.clip((np.asarray(image, np.float32) + np.float32(1.0)) / np.float32(2.0), 0.0, 1.0)
    return (np.float32(255.0) * x).transpose(0, 2, 3, 1).astype(np.uint8)


def upscale_image(pixels: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 by `mode` (IMAGE_UPSCALERS), with Pillow."""
    from PIL import Image

    if mode not in IMAGE_UPSCALERS:
        raise ValueError(f"unknown image upscaler {mode!r}; valid: {', '.join(IMAGE_UPSCALERS)}")
    lanczos = Image.Resampling.LANCZOS
    im = Image.fromarray(np.ascontiguousarray(pixels))
    scale = max(width / im.width, height / im.height)
    if scale > 1.0:
        dest = (int(im.width * scale // 8 * 8), int(im.height * scale // 8 * 8))
        im = im.resize((int(im.width * scale), int(im.height * scale)),
                       resample=lanczos if mode == "lanczos" else Image.Resampling.NEAREST)
        if im.size != dest:
            im = im.resize(dest, resample=lanczos)
    if im.size != (width, height):
        im = im.resize((width, height), resample=lanczos)
    return np.asarray(im)


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


__all__ = ["A1111_NAMES", "HIRES_UPSCALERS", "IMAGE_UPSCALERS", "UPSCALERS", "a1111_pixels", "upscale",
           "upscale_image"]
