"""Tiled VAE decoding for any backend (numpy only): the decoder runs on overlapping latent tiles
and the image tiles are blended with linear weights, so its peak memory stops growing with the
image size. The low-memory mode of the onnxruntime and TensorRT backends uses it above one tile
(512 px), and torch-cuda's with its standalone VAE; torch-cuda with diffusers' VAE
(hf_modules=True) tiles inside that module (diffusers' tiled decoder).

The decoder's GroupNorms see one tile, not the whole image, so a tiled image differs a little
from a one-piece decode (as with diffusers' tiled decoding); benchmarks/bench_vae_tiles.py
reports the difference and the memory saved.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

TILE = 64  # latent tile side (512 px: the size SD 1.x is trained at)
OVERLAP = 16  # latent rows/columns that neighbouring tiles share (128 px), blended linearly
MULTIPLE = 8  # tile starts stay on multiples of 8 latents (the engines' shape step)


def tile_starts(size: int, tile: int = TILE, overlap: int = OVERLAP) -> list[int]:
    """Start offsets along one latent axis: the fewest `tile`-wide windows that overlap by at least
    `overlap`, spread evenly from 0 to size - tile (on multiples of 8); [0] when one tile covers it."""
    if size <= tile:
        return [0]
    count = -(-(size - overlap) // (tile - overlap))  # ceil: windows needed
    span = size - tile
    return sorted({int(round(k * span / (count - 1) / MULTIPLE)) * MULTIPLE for k in range(count)})


def _ramp(length: int, lo: int, hi: int) -> np.ndarray:
    """1-D weights: rising over the first `lo` samples, falling over the last `hi`, 1 between."""
    w = np.ones(length, np.float32)
    if lo:
        w[:lo] = (np.arange(lo, dtype=np.float32) + 0.5) / lo
    if hi:
        w[length - hi:] = np.minimum(w[length - hi:], ((np.arange(hi, dtype=np.float32) + 0.5) / hi)[::-1])
    return w


def _bands(starts: list[int], tile: int, size: int, factor: int) -> list[tuple[int, int, int]]:
    """Per tile along one axis: (length px, blend px with the previous tile, with the next)."""
    out = []
    for k, s in enumerate(starts):
        length = min(tile, size)
        lo = (starts[k - 1] + length - s) * factor if k > 0 else 0
        hi = (s + length - starts[k + 1]) * factor if k + 1 < len(starts) else 0
        out.append((length * factor, lo, hi))
    return out


def decode_tiled(decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, factor: int,
                 tile: int = TILE, overlap: int = OVERLAP) -> tuple[np.ndarray, int]:
    """(image (n, 3, H, W) float32, number of decoder calls). `decode` maps latents
    (n, C, h, w) -> images (n, 3, h*factor, w*factor); it is called once when one tile covers
    the latents, else once per tile."""
    n, _, h, w = latents.shape
    if h <= tile and w <= tile:
        return decode(latents), 1
    if tile % MULTIPLE or overlap % MULTIPLE or not 0 < overlap < tile:
        raise ValueError(f"tile {tile} and overlap {overlap} must be multiples of {MULTIPLE}, overlap < tile")
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    by, bx = _bands(ys, tile, h, factor), _bands(xs, tile, w, factor)
    out, weight = None, np.zeros((h * factor, w * factor), np.float32)
    calls = 0
    for y, (ly, lo_y, hi_y) in zip(ys, by):
        wy = _ramp(ly, lo_y, hi_y)
        for x, (lx, lo_x, hi_x) in zip(xs, bx):
            part = decode(np.ascontiguousarray(latents[:, :, y:y + min(tile, h), x:x + min(tile, w)]))
            calls += 1
            if out is None:
                out = np.zeros((n, part.shape[1], h * factor, w * factor), np.float32)
            wyx = wy[:, None] * _ramp(lx, lo_x, hi_x)[None, :]
            Y, X = y * factor, x * factor
            out[:, :, Y:Y + ly, X:X + lx] += part * wyx
            weight[Y:Y + ly, X:X + lx] += wyx
    return out / weight, calls
