"""Tiled VAE decoding (pm_runtime/vae_tiles.py): placement and blending weights, and the low-memory
pipeline path that uses it."""

from __future__ import annotations

import numpy as np
import pytest

from pm_runtime.vae_tiles import MULTIPLE, OVERLAP, TILE, decode_tiled, tile_starts


@pytest.mark.parametrize("size", range(32, 129, 8))
def test_tile_starts_cover_with_overlap(size):
    starts = tile_starts(size)
    if size <= TILE:
        assert starts == [0]
        return
    assert starts[0] == 0 and starts[-1] == size - TILE and all(s % MULTIPLE == 0 for s in starts)
    assert all(b - a <= TILE - OVERLAP for a, b in zip(starts, starts[1:]))  # neighbours share >= OVERLAP


def nearest(latents, factor=8):
    """A local 'decoder': each latent's first 3 channels spread to a factor x factor pixel block."""
    return latents[:, :3].repeat(factor, axis=2).repeat(factor, axis=3).astype(np.float32)


@pytest.mark.parametrize("shape", [(1, 4, 128, 96), (2, 4, 72, 128), (1, 4, 64, 64), (1, 4, 40, 104)])
def test_tiles_of_a_local_decoder_equal_the_whole(shape):
    """A per-pixel decoder gives the same pixels in every tile that covers them, so the blend (a
    weighted average with weights summing per pixel) must reproduce the one-piece decode."""
    lat = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    calls = []
    image, n = decode_tiled(lambda x: (calls.append(x.shape), nearest(x))[1], lat, 8)
    np.testing.assert_allclose(image, nearest(lat), rtol=1e-6, atol=1e-6)
    assert n == len(calls) == len(tile_starts(shape[2])) * len(tile_starts(shape[3]))
    assert all(c[2] <= TILE and c[3] <= TILE for c in calls)


def test_blend_is_smooth_across_a_seam():
    """A decoder that adds a different constant per tile: tiles disagree, the blend ramps between
    them instead of jumping (no step larger than the per-pixel ramp increment)."""
    lat = np.zeros((1, 4, 32, 128), np.float32)
    k = iter(range(100))

    def offset(x):
        return nearest(x) + float(next(k))  # tile i adds i

    image, n = decode_tiled(offset, lat, 8)
    row = image[0, 0, 0]
    assert n == 3 and row[0] == 0.0 and row[-1] == 2.0
    assert np.abs(np.diff(row)).max() <= 1.0 / (OVERLAP * 8) * 2 + 1e-6


def test_low_memory_pipeline_tiles_above_512_px(run_bundle):
    """onnxruntime low-memory mode decodes a 768 px image in tiles (several decoder calls) and the
    image stays close to the one-piece decode of the normal mode."""
    pytest.importorskip("onnxruntime")
    from pm_runtime.pipeline import Pipeline

    kw = dict(seed=3, steps=2, height=768, width=640)
    low = Pipeline.load(run_bundle, backend="onnxruntime", concept="alice", low_memory=True)
    full = Pipeline.load(run_bundle, backend="onnxruntime", concept="alice")
    a, b = low.generate("a photo of <persona>", **kw), full.generate("a photo of <persona>", **kw)
    assert a.timings["vae_calls"] == 4 and b.timings["vae_calls"] == 1  # 96 x 80 latents: 2 x 2 tiles
    mse = float(((a.images.astype(float) - b.images.astype(float)) ** 2).mean())
    assert 10 * np.log10(255**2 / max(mse, 1e-12)) >= 25.0
