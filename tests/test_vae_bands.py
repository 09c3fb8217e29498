"""The standalone VAE decoder's banded full-resolution end (pm_runtime/modeling/vae_bands.py, the
torch-cuda backend's vae_bands option) computes what the plain decoder computes: at odd latent
shapes, band heights that do and do not divide the image (1 row: every band at an edge), exact
GroupNorm statistics merged band by band (also where the mean is far larger than the spread).
Its memory is counted, not tested here (benchmarks/live_memory.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import pm_kernels  # noqa: E402
from pm_runtime.errors import UserError  # noqa: E402
from pm_runtime.modeling import standalone, vae_bands  # noqa: E402
from pm_runtime.pipeline import Pipeline  # noqa: E402
from pm_runtime.specs import VAE_DECODER  # noqa: E402


@pytest.fixture(autouse=True)
def references():
    pm_kernels.set_enabled(False)  # the plain decoder's fused GroupNorm+SiLU as its PyTorch reference
    yield
    pm_kernels.set_enabled(True)


@pytest.fixture(scope="module")
def decoder():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64, 64, 64],
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        layers_per_block=2, norm_num_groups=16).eval()
    state = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    return standalone.build(VAE_DECODER, state, dict(vae.config)).eval()


@pytest.mark.parametrize("band", [1, 7, 16, 1000])
@pytest.mark.parametrize("shape", [(1, 4, 13, 11), (2, 4, 8, 8)])
def test_banded_decode_equals_the_plain_one(decoder, band, shape):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(band))
    with torch.inference_mode():
        decoder.band_rows = None
        ref = decoder(z)
        decoder.band_rows = band
        try:
            out = decoder(z)
        finally:
            decoder.band_rows = None
    assert out.shape == ref.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3])
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_group_stats_merge_bands_exactly():
    g = torch.Generator().manual_seed(1)
    x = 1000.0 + torch.randn(2, 8, 37, 5, generator=g)  # mean >> spread: a naive sum of squares loses it
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(8, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(8, generator=g))
    with torch.no_grad():
        stats = vae_bands.GroupStats(norm, 2, "cpu")
        for r0 in range(0, 37, 6):
            stats.add(x[:, :, r0:r0 + 6])
        scale, shift = stats.affine()
        exact = torch.nn.functional.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), 1e-6)
        err = float((x * scale + shift - exact).abs().max())
    assert err < 5e-4, err  # x * scale + shift in fp32 at |x| ~ 1000 rounds at ~1e-4


def test_backend_option(run_bundle):
    kw = dict(seed=3, steps=2, height=256, width=320)
    plain = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice")
    banded = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", vae_bands=16)
    assert banded.backend.modules["vae_decoder"].vae.band_rows == 16
    a, b = plain.generate("a photo of <persona>", **kw), banded.generate("a photo of <persona>", **kw)
    assert int(np.abs(a.images.astype(int) - b.images.astype(int)).max()) <= 1
    with pytest.raises(UserError, match="standalone VAE"):
        Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", vae_bands=16, hf_modules=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_banded_decode_in_fp16(decoder):
    """The banded decode on the GPU in fp16 (the fused GroupNorm+SiLU kernel compiled for the plain
    one) against the plain decode: fp16 tolerance."""
    pm_kernels.set_enabled(True)
    gpu = decoder.to("cuda", torch.float16)
    try:
        z = torch.randn(1, 4, 24, 20, device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            ref = gpu(z).float()
            gpu.band_rows = 16
            out = gpu(z).float()
        assert torch.isfinite(out).all()
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-2
    finally:
        gpu.band_rows = None
        decoder.to("cpu", torch.float32)
