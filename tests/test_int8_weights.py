"""int8 weight-only UNet (torch-cuda's int8_weights option): the dequantize kernel against its
reference (Triton under the interpreter on CPUs), the quantized FastUNet against the fp one on the
tiny model, the byte count at SD 1.5 shapes (meta device: no memory, exact sizes), and the
backend / pm-run plumbing. The drift on SD-1.5-shaped weights is benchmarked, not tested here
(benchmarks/bench_int8_weights.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pm_kernels as K  # noqa: E402
from conftest import psnr  # noqa: E402
from pm_runtime.errors import UserError  # noqa: E402
from pm_runtime.pipeline import Pipeline  # noqa: E402

PROMPT = "a photo of <persona> as a knight"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def kernels_on():
    K.set_enabled(True)
    yield
    K.set_enabled(True)


# ---------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, fmt", [((37, 53), torch.contiguous_format), ((5, 7, 3, 3), torch.contiguous_format),
                                        ((6, 11, 3, 3), torch.channels_last), ((1, 1025), torch.contiguous_format),
                                        ((9, 4, 1, 1), torch.channels_last)])
def test_dequant_kernel_equals_its_reference_bit_for_bit(shape, fmt, dtype):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(shape, generator=g) * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 3)
    w = w.to(DEVICE).contiguous(memory_format=fmt)
    q, scale = K.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (shape[0],) and q.abs().max() <= 127
    assert q.is_contiguous(memory_format=fmt)
    assert K.kernel_path("dequant_int8", q) == "triton"
    out = K.dequant_int8(q, scale, dtype)
    ref = K.dequant_int8_reference(q, scale, dtype)
    assert out.dtype == dtype and out.shape == w.shape and out.is_contiguous(memory_format=fmt)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # the interpreter's fp32 -> bf16 cast truncates (compiled Triton rounds to nearest even):
        # the same fp32 product with its low 16 bits dropped
        exact = (q.float() * scale.view(-1, *[1] * (len(shape) - 1)))
        assert torch.equal(out.float(), (exact.view(torch.int32) & ~0xFFFF).view(torch.float32))
    else:
        assert torch.equal(out, ref)
    # the rounding error is at most half a step per channel (plus the dtype's own rounding)
    step = scale.view(-1, *[1] * (len(shape) - 1))
    err = (out.float() - w.float()).abs() / step
    assert float(err.max()) <= 0.5 + (1e-4 if dtype == torch.float32 else 127 * 2 ** -7)  # + the dtype's rounding


def test_quantize_edge_cases_and_bad_input():
    w = torch.zeros(3, 4)
    w[1] = torch.tensor([1.0, -2.0, 0.5, 2.0])
    q, scale = K.quantize_int8(w)
    assert scale[0] == 1 and scale[2] == 1 and torch.equal(q[0], torch.zeros(4, dtype=torch.int8))  # zero rows
    assert q[1].tolist() == [64, -127, 32, 127]  # 1 / (2/127) = 63.5 -> 64 (round half to even gives 64)
    with pytest.raises(ValueError, match="int8"):
        K.dequant_int8(q.float(), scale)
    with pytest.raises(ValueError, match="output channels"):
        K.dequant_int8(q, scale[:2])
    with pytest.raises(ValueError, match="outermost"):
        K.dequant_int8(q.t(), torch.ones(4))


# ---------------------------------------------------------------------- the quantized UNet
@pytest.fixture(scope="module")
def unet_graph(tiny_model):
    from pm_runtime.modeling.graphs import graph_modules
    from pm_runtime.modeling.loading import load_base_model

    return graph_modules(load_base_model(tiny_model))["unet"]


def test_int8_fast_unet_is_close_to_the_fp_one(unet_graph):
    import copy

    from torch import nn

    from pm_runtime.modeling.fast_unet import FastUNet
    from pm_runtime.modeling.int8_weights import Int8Conv2d, Int8Linear, is_quantized, quantize_unet_, tensor_bytes

    K.set_enabled(False)  # the references (the kernel itself is tested above): this is about the UNet
    unet = copy.deepcopy(unet_graph.unet)
    plain = FastUNet(copy.deepcopy(unet_graph.unet))
    fast = FastUNet(unet)
    before = tensor_bytes(unet)
    stats = quantize_unet_(fast, "cpu", "cpu")
    assert is_quantized(unet) and not is_quantized(plain.unet)
    left = [n for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    assert left == ["conv_in", "conv_out"]  # every other linear / conv layer is int8
    assert stats["layers"] == sum(isinstance(m, (Int8Linear, Int8Conv2d)) for m in unet.modules())
    attn1 = [m.attn1 for m in unet.modules() if hasattr(m, "attn1")]
    assert attn1 and all(a.to_q is None and hasattr(a, "pm_qkv_int8") and not hasattr(a, "pm_qkv") for a in attn1)
    # fp32 weights -> int8 + one fp32 scale per channel: the replaced layers shrink ~4x here
    assert tensor_bytes(unet) < before - 0.7 * stats["replaced_bytes"]
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500.0, 500.0])
    ck, cv = torch.randn(2, 2, 77, 32, generator=g)
    with torch.inference_mode():
        ref, out = plain(x, t, ck, cv), fast(x, t, ck, cv)
        FastUNet(unet)  # a new wrapper (low-memory mode makes one per load) leaves the int8 layers as they are
        again = fast(x, t, ck, cv)
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 0.05, rel  # quantized (not equal), and close
    assert torch.equal(out, again)
    # per-image K/V tables work from int8 K/V projections
    with torch.inference_mode():
        fast.allocate_context_tables(4, 77)
        fast.set_contexts(ck, cv)
        indexed = fast(x, t, kv_index=torch.tensor([0, 1]))
    assert float((indexed - out).abs().max()) <= 1e-5 * float(out.abs().max())


def test_sd15_shaped_unet_weights_halve():
    """Byte count at SD 1.5 shapes on the meta device (no memory, no compute): the UNet's fp16
    weights are 1.72 GB; int8 (with fp32 scales, fp16 biases, norms, conv_in/conv_out) ~0.86 GB."""
    pytest.importorskip("diffusers")
    import sys
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from pm_runtime.modeling.fast_unet import FastUNet
    from pm_runtime.modeling.int8_weights import quantize_unet_, tensor_bytes

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from random_models import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).half()
    fp16 = tensor_bytes(unet)
    quantize_unet_(FastUNet(unet), "meta", "meta")
    int8 = tensor_bytes(unet)
    assert 1.70e9 < fp16 < 1.74e9
    assert 0.84e9 < int8 < 0.88e9 and int8 / fp16 < 0.51


# ---------------------------------------------------------------------- the backend and pm-run
def test_backend_int8_weights(run_bundle):
    K.set_enabled(False)
    kw = dict(seed=7, steps=4, height=256, width=256)
    fp = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice")
    # (the VAE's packed CPU convolutions, which low-memory mode's parked VAE does not get, off in both:
    # bit-equality of the int8 UNet's two runs is what is tested)
    q = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", int8_weights=True,
                      cpu_packed_convs=False)
    low = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", int8_weights=True,
                        low_memory=True, kv_tables=True, sequential_guidance=False,  # the step as `q` runs it
                        cpu_packed_convs=False)
    a, b, c = (p.generate(PROMPT, **kw) for p in (fp, q, low))
    assert "UNet weights int8" in b.backend and "int8" not in a.backend
    assert q.backend.int8_stats["layers"] > 0
    assert not np.array_equal(a.images, b.images) and psnr(a.images, b.images) >= 25.0
    np.testing.assert_array_equal(b.images, c.images)  # low memory: same int8 weights, no tiles at 256 px
    assert low.backend.loads["unet"] == 1 and not low.backend._cache
    again = low.generate(PROMPT, **kw)  # the UNet goes back to the device: the int8 layers survive the moves
    np.testing.assert_array_equal(again.images, c.images)
    with pytest.raises(UserError, match="kernels"):
        Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", int8_weights=True, kernels=False)


def test_quantized_unet_ends_up_where_the_weights_rest(run_bundle):
    """The UNet is loaded into host memory, its layers quantized on the run device and kept at the
    backend's home; everything else must follow them there (on a GPU: the norms, conv_in, conv_out).
    Here the home is the meta device, a stand-in for "not where it was loaded"."""
    K.set_enabled(False)
    pipe = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice")
    backend = pipe.backend
    backend.home = torch.device("meta")
    fast = backend._quantized_unet(backend.modules["unet"])
    devices = {t.device.type for t in (*fast.parameters(), *fast.buffers())}
    assert devices == {"meta"} and backend.int8_stats["layers"] > 0


def test_pm_run_int8_weights_flag(run_bundle, tmp_path):
    from click.testing import CliRunner

    from pm_runtime.cli import main

    K.set_enabled(False)  # the kernels' references: the interpreter would take minutes for a whole image
    r = CliRunner().invoke(main, ["--engine", str(run_bundle), "--prompt", PROMPT, "--backend", "onnxruntime",
                                  "--int8-weights", "--out", str(tmp_path / "x.png"), "--steps", "1"])
    assert r.exit_code != 0 and "--int8-weights" in r.output and "torch-cuda" in r.output
    assert not (tmp_path / "x.png").exists()
    r = CliRunner().invoke(main, ["--engine", str(run_bundle), "--prompt", PROMPT, "--backend", "torch-cuda",
                                  "--device", "cpu", "--int8-weights", "--concept", "alice", "--out", str(tmp_path / "y.png"),
                                  "--steps", "2", "--height", "256", "--width", "256", "--seed", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "y.png").is_file() and "UNet weights int8" in r.output
    assert '"device_memory": null' in r.output  # only a GPU run reports its peak


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_int8_weights_in_the_step_graph(cuda_bundle):
    """Compiled dequantize kernel inside the captured step (fp16, channels-last), low-memory too."""
    kw = dict(seed=11, steps=6, height=256, width=256)
    fp16 = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice").generate(PROMPT, **kw)
    q = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", int8_weights=True)
    a, b = q.generate(PROMPT, **kw), q.generate(PROMPT, **kw)
    low = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", int8_weights=True, low_memory=True)
    c = low.generate(PROMPT, **kw)
    assert "CUDA graph, UNet weights int8" in a.backend
    memory = q.backend.device_memory()
    assert 0 < memory["peak_allocated_gib"] <= memory["peak_reserved_gib"]
    np.testing.assert_array_equal(a.images, b.images)
    assert psnr(a.images, fp16.images) >= 30.0 and psnr(c.images, a.images) >= 30.0
