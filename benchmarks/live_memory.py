"""Activation memory counted on the meta device: the peak of live tensor bytes that a network's
forward creates (weights excluded), eager, at full SD-1.5 shapes, in seconds and without a GPU.
Not a test: nothing here asserts.

What is counted: every tensor an op returns (torch dispatch) that is not a view of (or written in
place into) its inputs, by storage, from its creation until its storage is freed, in the run dtype. Fused kernels are counted by what their GPU path allocates:
pm_kernels' group_norm_silu / geglu / attention / dequant_int8 stand in as one output tensor each
(their Triton paths allocate exactly that, plus a few KB of statistics; group_norm_silu with out=
as none; add_layer_norm as its two,
add_bias_residual as none where it writes into `out`), and PyTorch's
scaled_dot_product_attention as its output (flash / memory-efficient attention; the math path's
(N, N) score matrix is what a GPU does NOT allocate). What is NOT counted: cuDNN / cuBLAS
workspaces, the CUDA caching allocator's rounding and caching, CUDA-graph pools (which hold this
peak between replays). So this is a floor for the GPU's `max_memory_allocated` above the weights,
and a fair comparison between two ways of computing the same network; the GPU check measures the
real thing (gpu_ours variants).

  python benchmarks/live_memory.py --out benchmarks/results/live-memory-meta.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import weakref

HERE = pathlib.Path(__file__).resolve().parent
if __package__:
    from .records import environment, save_records
else:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from records import environment, save_records

SCHEMA = "pm-live-memory/1"
MIB = 2**20


def live_bytes_mode():
    """A TorchDispatchMode counting live bytes of the tensors ops create: .now, .peak."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.now, self.peak = {}, 0, 0

        def _free(self, key):
            self.now -= self.live.pop(key, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(r.alias_info is not None for r in func._schema.returns):
                return out  # a view of (or in-place on) an input: no new memory (weights' views included)
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    if s._cdata not in self.live:
                        self.live[s._cdata] = s.nbytes()
                        self.now += s.nbytes()
                        self.peak = max(self.peak, self.now)
                        weakref.finalize(s, self._free, s._cdata)
            return out

    return LiveBytes()


@contextlib.contextmanager
def cuda_conv_layout():
    """Convolutions on the meta device return the memory format cuDNN's do on CUDA. PyTorch's meta
    convolution returns a plain contiguous (NCHW) tensor whatever its inputs; on CUDA, cuDNN's
    returns channels-last where the input or the weight suggests it (aten's
    cudnn_conv_suggest_memory_format). Without this every layer after a UNet's first convolution
    ran NCHW on the meta device, so its pm_kernels calls took (and compile_check compiled) their
    NCHW variants, not the channels-last ones the GPU runs."""
    import torch
    import torch.nn.functional as F

    from pm_kernels._dispatch import layout

    conv2d = F.conv2d
    cl = torch.channels_last

    def conv(x, weight, *args, **kwargs):
        y = conv2d(x, weight, *args, **kwargs)
        if y.device.type == "meta" and y.dim() == 4 and cl in (layout(x), layout(weight)):
            # the same storage seen with channels-last strides (a view: meta has no data to move, and
            # the counting modes see no new op or allocation, as on CUDA)
            n, c, h, w = y.shape
            y = y.as_strided(y.shape, (h * w * c, 1, w * c, c))
        return y

    F.conv2d = conv
    try:
        yield
    finally:
        F.conv2d = conv2d


@contextlib.contextmanager
def gpu_footprints():
    """pm_kernels' fused kernels and PyTorch's SDPA replaced, for counting, by what their GPU paths
    allocate: one output tensor (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    import pm_kernels

    def attention(q, k, v, heads, scale=None, kv_index=None):
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)

    fakes = {
        "group_norm_silu": lambda x, *a, out=None, **k: torch.empty_like(x) if out is None else out,
        "geglu": lambda h: torch.empty((*h.shape[:-1], h.shape[-1] // 2), dtype=h.dtype, device=h.device),
        "geglu_linear": lambda x, w, b=None, **kw: torch.empty((*x.shape[:-1], w.shape[0] // 2), dtype=x.dtype,
                                                               device=x.device),
        "attention": attention,
        "dequant_int8": lambda q, scale, dtype=torch.float16: torch.empty_like(q, dtype=dtype),
        # the residual kernel writes into `out` when given (FastUNet: conv2's output), else a new tensor
        "add_bias_residual": lambda h, x, bias=None, out=None: torch.empty_like(h) if out is None else out,
        "add_layer_norm": lambda a, r, *args, **kw: (torch.empty_like(a), torch.empty_like(a)),  # (a + r, its norm)
        # the step graph's arithmetic around the UNet: its input (copies of the scaled latent), and an
        # update in place (nothing new)
        "scaled_copies": lambda x, scale, step, copies, dtype, fmt=torch.contiguous_format: torch.empty(
            (copies * x.shape[0], *x.shape[1:]), dtype=dtype, device=x.device, memory_format=fmt),
        "guided_update": lambda *args: None,
    }
    saved = {name: getattr(pm_kernels, name) for name in fakes}
    sdpa = F.scaled_dot_product_attention
    try:
        for name, fn in fakes.items():
            setattr(pm_kernels, name, fn)
        F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: torch.empty(
            (*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
        with cuda_conv_layout():  # the layouts the GPU's kernels see
            yield
    finally:
        for name, fn in saved.items():
            setattr(pm_kernels, name, fn)
        F.scaled_dot_product_attention = sdpa


def peak_of(fn) -> tuple[int, int]:
    """(peak live bytes while fn runs, bytes still live from it after)."""
    import torch

    with torch.inference_mode(), gpu_footprints():
        mode = live_bytes_mode()
        with mode:
            out = fn()
        kept = mode.now
        del out
    return mode.peak, kept


def sd15_networks(dtype):
    """SD-1.5-shaped diffusers UNet and VAE and the standalone VAE decoder, on the meta device."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pm_runtime.modeling import standalone
    from pm_runtime.specs import VAE_DECODER

    if __package__:  # pm_bench.live_memory (installed), or python benchmarks/live_memory.py
        from .random_models import SD15_UNET_CONFIG, SD15_VAE_CONFIG
    else:
        from random_models import SD15_UNET_CONFIG, SD15_VAE_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(dtype).eval()
        vae = AutoencoderKL(**SD15_VAE_CONFIG).to(dtype).eval()
    state = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    ours_vae = standalone.build(VAE_DECODER, state, dict(vae.config)).eval()
    return unet, vae, ours_vae


CONTEXT_ROWS, STEPS = 32, 64  # the torch-cuda loop's table capacities for a 50-step SD-1.5 image


def sd15_fast_unet(unet):
    """FastUNet around `unet` (sd15_networks') with the per-image tables the torch-cuda loop gives
    it: cross-attention K/V for CONTEXT_ROWS contexts of 77 tokens, time vectors for STEPS steps."""
    from pm_runtime.modeling.fast_unet import FastUNet

    fast = FastUNet(unet)
    fast.allocate_context_tables(CONTEXT_ROWS, 77)
    fast.allocate_time_tables(STEPS)
    return fast


def fast_unet_call(fast, size: int, batch: int, dtype):
    """() -> one call of sd15_fast_unet's FastUNet on the meta device as torch-cuda's step makes it:
    channels-last latents, contexts as K/V table rows, the time vectors as a time-table row where
    the epilogues are fused (else from the timestep). The inputs are made here, not in the call."""
    import torch

    x = torch.empty(batch, 4, size // 8, size // 8, device="meta", dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    t = torch.full((batch,), 500.0, device="meta")
    idx = torch.zeros(batch, dtype=torch.long, device="meta")
    return lambda: fast(x, t, kv_index=idx, t_index=idx[:1] if fast.fused_epilogues else None)


def sd15_step_graph(unet, size: int, dtype, **options):
    """torch-cuda's StepGraph for one image of `size` px around `unet` on the meta device (SD 1.5's
    77 x 768 contexts, the tables' capacities above); options: StepGraph's (sequential, ...)."""
    from pm_runtime.modeling.step_graph import StepGraph

    return StepGraph(unet, n=1, latent_shape=(4, size // 8, size // 8), context_shape=(77, 768), rows=CONTEXT_ROWS,
                     dtype=dtype, device="meta", max_steps=STEPS, **options)


def measure(sizes=(512, 1024), dtype_name: str = "float16") -> list[dict]:
    import copy

    import torch

    from pm_runtime.backends.torch_cuda import FF_CHUNK
    from pm_runtime.modeling.fast_unet import FastUNet
    from pm_runtime.modeling.int8_weights import quantize_unet_

    dtype = getattr(torch, dtype_name)
    unet, vae, ours_vae = sd15_networks(dtype)
    fast = FastUNet(unet)
    q_unet = copy.deepcopy(unet)
    fast_int8 = FastUNet(q_unet)
    quantize_unet_(fast_int8, "meta", "meta")
    meta = dict(device="meta", dtype=dtype)
    recs = []

    def rec(what, variant, size, fn, **extra):
        peak, kept = peak_of(fn)
        r = {"network": what, "variant": variant, "size": size, "dtype": dtype_name,
             "peak_live_mib": round(peak / MIB, 1), "kept_mib": round(kept / MIB, 1), **extra}
        print(f"{what:12s} {variant:36s} {size:5d} px  peak {r['peak_live_mib']:8.1f} MiB", flush=True)
        recs.append(r)

    for size in sizes:
        lat = size // 8
        z = torch.empty(1, 4, lat, lat, **meta)
        rec("vae-decode", "diffusers AutoencoderKL.decode", size, lambda: vae.decode(z).sample)
        rec("vae-decode", "standalone VAE (torch-cuda)", size, lambda: ours_vae(z))
        for band in (32, 64):
            ours_vae.band_rows = band
            rec("vae-decode", f"standalone VAE, {band}-row bands (vae_bands)", size, lambda: ours_vae(z))
        ours_vae.band_rows = None
        t2, t1 = torch.full((2,), 500.0, device="meta"), torch.full((1,), 500.0, device="meta")
        rows = 32
        fast.allocate_context_tables(rows, 77)
        fast_int8.allocate_context_tables(rows, 77)
        for n, t in ((2, t2), (1, t1)):
            x = torch.empty(n, 4, lat, lat, **meta).contiguous(memory_format=torch.channels_last)
            idx = torch.zeros(n, dtype=torch.long, device="meta")
            c = torch.empty(n, 77, 768, **meta)
            how = "[uncond; cond] in one call" if n == 2 else "one guidance half (sequential)"
            rec("unet-call", f"FastUNet, K/V tables, batch {n}", size, lambda: fast(x, t, kv_index=idx), note=how)
            rec("unet-call", f"FastUNet, contexts, batch {n}", size, lambda: fast(x, t, c, c), note=how)
            rec("unet-call", f"FastUNet int8 weights, K/V tables, batch {n}", size,
                lambda: fast_int8(x, t, kv_index=idx), note=how)
            if n == 1:  # low-memory mode's UNet call: contexts, one guidance half, chunked feed-forward
                fast.ff_chunk = FF_CHUNK
                rec("unet-call", f"FastUNet, contexts, batch 1, feed-forward in {FF_CHUNK}-token chunks", size,
                    lambda: fast(x, t, c, c), note=how)
                fast.ff_chunk, fast.geglu_gemm = None, True  # the GEGLU in its GEMM: no 8x-wide projection
                rec("unet-call", "FastUNet, contexts, batch 1, GEGLU in the GEMM (geglu_gemm)", size,
                    lambda: fast(x, t, c, c), note=how)
                fast.ff_chunk = FF_CHUNK
                rec("unet-call", f"FastUNet, contexts, batch 1, GEGLU in the GEMM, {FF_CHUNK}-token chunks", size,
                    lambda: fast(x, t, c, c), note=how)
                fast.ff_chunk, fast.geglu_gemm = None, False
    return recs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", type=pathlib.Path, default=None, help="append the records to this JSON-lines file")
    a = ap.parse_args(argv)
    recs = measure(tuple(int(s) for s in a.sizes.split(",")), a.dtype)
    env = environment("meta", a.commit)
    command = "python benchmarks/live_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    records = [{"schema": SCHEMA, **env, "command": command,
                "counts": "live tensor bytes created by the forward, meta device, fused kernels and SDPA as their "
                          "GPU paths' outputs; no workspaces, allocator rounding or graph pools", **r} for r in recs]
    save_records(a.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
