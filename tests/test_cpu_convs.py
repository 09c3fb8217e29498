"""Convolutions with oneDNN-packed weights (pm_runtime.modeling.cpu_convs), the torch-cuda backend's
CPU path: the same values as F.conv2d, the plain weights dropped once packed, and the backend's image
unchanged by them."""

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pm_runtime.modeling import cpu_convs  # noqa: E402

needs_onednn = pytest.mark.skipif(cpu_convs.unavailable(torch.float32) is not None,
                                  reason=f"packed convolutions unavailable: {cpu_convs.unavailable(torch.float32)}")


def _conv(c_in, c_out, k, stride, dtype, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2).to(dtype)
    return conv.to(memory_format=torch.channels_last)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c_in,c_out,stride", [(64, 48, 1), (40, 72, 2), (96, 96, 1)])
def test_packed_convolution_equals_f_conv2d_at_every_size(dtype, c_in, c_out, stride):
    """Packed at the first call's shape; later calls at other sizes, batch sizes and layouts read the
    same packed weights and must still be the convolution (stride 2: the UNet's downsamplers)."""
    if cpu_convs.unavailable(dtype):
        pytest.skip(cpu_convs.unavailable(dtype))
    conv = _conv(c_in, c_out, 3, stride, dtype)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    packed = cpu_convs.PackedConv2d(conv)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    shapes = [(2, 9, 7), (1, 16, 16), (3, 5, 11), (2, 33, 4)]
    with torch.no_grad():
        for i, (n, h, wd) in enumerate(shapes):
            x = torch.randn(n, c_in, h, wd).to(dtype)
            if i % 2 == 0:
                x = x.contiguous(memory_format=torch.channels_last)
            for bias in (True, False):
                ref = F.conv2d(x.float(), w.float(), b.float() if bias else None, stride, 1)
                out = packed(x, bias=bias)
                assert out.dtype == dtype and out.shape == ref.shape
                err = float((out.float() - ref).abs().max() / ref.abs().max())
                assert err <= tol, (dtype, (n, h, wd), bias, err)
    assert packed.packed is not None and packed.weight is None  # one copy of the weights: the packed one


@needs_onednn
def test_pack_convs_replaces_the_deep_convolutions_only():
    m = nn.Module()
    m.block = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1),
                            nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 3, stride=2, padding=1))
    m.other = nn.Conv2d(64, 32, 3, padding=1, padding_mode="reflect")
    assert cpu_convs.pack_convs_(m) == 2
    kinds = [type(c).__name__ for c in m.block]
    assert kinds == ["Conv2d", "PackedConv2d", "Conv2d", "PackedConv2d"]  # 4 in-channels, 1x1: left alone
    assert type(m.other) is nn.Conv2d  # reflect padding is not oneDNN's zero padding
    assert cpu_convs.pack_convs_(m) == 0  # idempotent
    with torch.no_grad():
        x = torch.randn(1, 4, 8, 8)
        assert m.block(x).shape == (1, 64, 4, 4)


def test_unavailable_names_what_is_not_packed():
    assert "float16" in cpu_convs.unavailable(torch.float16)


@needs_onednn
def test_packed_convolution_refuses_autograd():
    packed = cpu_convs.PackedConv2d(_conv(32, 32, 3, 1, torch.float32))
    with pytest.raises(RuntimeError, match="inference"):
        packed(torch.randn(1, 32, 4, 4, requires_grad=True))


@needs_onednn
def test_backend_image_unchanged_by_packed_convolutions(run_bundle, monkeypatch):
    """The torch-cuda backend's CPU run (kernels' references: no interpreter needed for what is tested)
    with and without packed UNet convolutions: the same image, and the backend says how many it packed;
    low-memory mode (parked weights) packs none and says why."""
    # (pm_kernels.set_enabled(False), undone after the test; not TRITON_INTERPRET=0, which Triton may read
    # once for the whole process)
    monkeypatch.setattr(importlib.import_module("pm_kernels._dispatch"), "_ENABLED", False)
    from pm_runtime.pipeline import Pipeline

    images = {}
    for packed in (False, True):
        with Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice",
                           cpu_packed_convs=packed) as pipe:
            images[packed] = pipe.generate("a photo of <persona>", seed=3, steps=2, height=256, width=256).images[0]
            backend = pipe.backend
            if packed:
                assert backend.packed_convs > 0 and backend.packed_convs_note is None
                assert f"{backend.packed_convs} convolutions packed" in backend.describe()
                for network in ("unet", "vae_decoder"):  # both, each from its first load on
                    assert backend._packed_convs[network] > 0
                    assert any(isinstance(m, cpu_convs.PackedConv2d) for m in backend.modules[network].modules())
            else:
                assert not backend.packed_convs and "packed" not in backend.describe()
    diff = np.abs(images[True].astype(int) - images[False].astype(int))
    assert diff.max() <= 1, diff.max()  # fp32: the same convolutions, the weights in another layout
    with Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", low_memory=True) as pipe:
        pipe.generate("a photo of <persona>", seed=3, steps=1, height=256, width=256)
        assert pipe.backend.packed_convs == 0 and "parked" in pipe.backend.packed_convs_note
    # the VAE's row bands read its plain weights: its convolutions stay as they are, the UNet's are packed
    with Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", vae_bands=8) as pipe:
        banded = pipe.generate("a photo of <persona>", seed=3, steps=2, height=256, width=256).images[0]
        be = pipe.backend
        assert be._packed_convs["vae_decoder"] == 0 and be._packed_convs["unet"] > 0
        assert "vae_bands" in be.packed_convs_note
    assert np.abs(banded.astype(int) - images[True].astype(int)).max() <= 1


@pytest.fixture()
def fresh_probe():
    cpu_convs.unavailable.cache_clear()
    yield
    cpu_convs.unavailable.cache_clear()


@needs_onednn
def test_probe_keeps_the_plain_path_where_the_operators_fail_or_disagree(fresh_probe, monkeypatch, run_bundle):
    """The packed operators are private: one that raises or computes something else makes unavailable()
    say so, and the backend then runs the plain convolutions (its image as before)."""
    real = cpu_convs._ops

    def missing():
        raise AttributeError("'_OpNamespace' 'mkldnn' object has no attribute '_convolution_pointwise'")

    monkeypatch.setattr(cpu_convs, "_ops", missing)
    assert "failed: AttributeError" in cpu_convs.unavailable(torch.float32)
    cpu_convs.unavailable.cache_clear()

    def wrong():
        reorder, conv = real()
        return reorder, lambda x, w, b, *a: conv(x, w, b, *a) * 1.01  # 1% off

    monkeypatch.setattr(cpu_convs, "_ops", wrong)
    assert "disagrees" in cpu_convs.unavailable(torch.float32)
    # (pm_kernels.set_enabled(False), undone after the test; not TRITON_INTERPRET=0, which Triton may read
    # once for the whole process)
    monkeypatch.setattr(importlib.import_module("pm_kernels._dispatch"), "_ENABLED", False)
    from pm_runtime.pipeline import Pipeline

    with Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice") as pipe:
        pipe.generate("a photo of <persona>", seed=3, steps=1, height=256, width=256)
        assert pipe.backend.packed_convs == 0 and "disagrees" in pipe.backend.packed_convs_note
        assert not any(isinstance(m, cpu_convs.PackedConv2d) for m in pipe.backend.modules["unet"].unet.modules())
