"""pm_kernels: fused kernels for the GPU fast path (Triton), each with its PyTorch reference.

    group_norm_silu(x, weight, bias, num_groups, eps, *, temb=None, silu=True)   kernels/group_norm.py
        silu(group_norm(x + temb[:, :, None, None])), x (N, C, H, W) in any memory format (read in
        place; fast for channels-last), output in x's format; fp32 statistics, safe for mean >> std;
        two Triton implementations, set_group_norm_impl("tuned" (default: per shape as
        pm_kernels.tuning chose) | "tiled" | "grouped" | "auto") (PM_GN_IMPL)
    geglu(h)                                                                     kernels/geglu.py
        h (..., 2F) -> h[..., :F] * gelu(h[..., F:]) (exact erf GELU, as diffusers' GEGLU), one pass
    geglu_linear(x, weight, bias)                                                kernels/geglu.py
        geglu(F.linear(x, weight, bias)) as one Triton GEMM whose epilogue applies the GEGLU: the
        (..., 2F) projection is never written
    geglu_projection(x, weight, bias, fused=None)                                kernels/geglu.py
        geglu(F.linear(...)) as the split path (PyTorch's GEMM + geglu) or geglu_linear, per shape
        as pm_kernels.tuning chose (FastUNet's feed-forward)
    attention(q, k, v, heads, scale=None, kv_index=None)                         kernels/attention.py
        q (B, Nq, H*d), k, v (B, Nk, H*d) read in place (strided slices are fine; K and V may come
        from different contexts) -> (B, Nq, H*d); kv_index (B,): k, v are (R, Nk, H*d) tables read
        by row. Per shape as pm_kernels.tuning chose (SDPA, SDPA with cuDNN's or the memory-efficient attention first, the
        Triton kernel in a few launch configurations); untuned: Triton for Nk <= attention.SHORT_KEYS
        and head dims above attention.SDPA_MAX_HEAD_DIM (cross-attention), PyTorch's SDPA on
        (B, H, N, d) views elsewhere (self-attention: flash attention is faster there); fewer
        pipeline stages where a GPU's shared memory per block is short, SDPA where none fit
    quantize_int8(w) -> (q, scale); dequant_int8(q, scale, dtype)                 kernels/dequant.py
        per-output-channel symmetric int8 weights (the torch-cuda backend's int8_weights option),
        dequantized in one pass in q's memory format; bit-equal to its reference
    add_bias_residual(h, x, bias=None, out=None)                                 kernels/residual.py
        h + x + bias[c] for (N, C, H, W) in either memory format, one pass: a ResNet block's end with
        its convolutions run bias-free (cuDNN's bias is a separate pass in PyTorch)
    add_layer_norm(a, r, weight, bias, eps, s_bias=None) -> (s, y)              kernels/layer_norm.py
        s = a + r, y = layer_norm(s) (fp32 statistics) in one pass: the transformer block's residual
        add and the LayerNorm after it; s_bias: the returned s also carries it (y does not see it)
    scaled_copies(x, scale, step, copies, dtype, memory_format)                 kernels/step_update.py
    guided_update(uncond, cond, x, x0_prev, noise, coef, step, guidance, clip)
        the denoising step's arithmetic around the UNet (its input; guidance + the scheduler's affine
        update), per-step values read at the device-side step counter: two kernels instead of ~30

Dispatch (kernels/_dispatch.py, one rule for all): the Triton kernel runs on CUDA tensors when
Triton imports and the GPU is one it compiles for (compute capability 7.0+), and on CPU tensors
under TRITON_INTERPRET=1 (how the tests run them without a GPU); elsewhere the PyTorch reference
(`*_reference`; SDPA for attention) runs. set_enabled(False) or PM_KERNELS=0 forces the references;
kernel_path(name, tensor) -> "triton" | "reference" says which path a call takes. A kernel that can
run but fails raises: no silent fallback after an error. set_generic_sizes(True) (or
PM_KERNELS_GENERIC_SIZES=1) launches the size-taking kernels compiled without size
specialisation, their 2-byte-access form before it: an A/B switch for the GPU benchmark.
set_pdl(True) (or PM_KERNELS_PDL=1) launches them with programmatic dependent launch on Hopper and
newer (each waits for the kernel before it first, then lets the next launch): off until measured.
Tuning (kernels/tuning.py, pm_kernels.tuning): where a computation has several implementations,
the one that runs for a shape is the fastest measured on this GPU in a tuning session (the
torch-cuda backend opens one for one eager step before it first captures a shape), checked against
the others' output first; the choices persist in a cache file per GPU and software. Without a choice,
or with PM_KERNELS_TUNE=0, each call takes its untuned default (the rules in the code).
Tests: tests/test_kernels.py, tests/test_tuning.py; benchmark: benchmarks/bench_kernels.py (GB/s and TFLOP/s beside
PyTorch's).
"""

import sys as _sys


def _hand_over() -> bool:
    """Imported as `kernels`, not as pm_kernels: this checkout's root is on sys.path (python -m pytest
    or python -c run from it, a benchmark script run from the tree) and the folder shadows Hugging
    Face's `kernels` package, which transformers (5.25 and newer: a dependency) imports by that name.
    Where that package is installed it is loaded in this module's place (sys.modules["kernels"]: what
    the import returns) and True comes back; else False, and this folder loads as a copy of
    pm_kernels under that name (harmless: nothing else asked for one)."""
    import importlib.machinery
    import importlib.util
    import os

    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = [p for p in _sys.path if isinstance(p, str) and os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        return False
    real = importlib.util.module_from_spec(spec)
    _sys.modules["kernels"] = real
    try:
        spec.loader.exec_module(real)
    except BaseException:
        del _sys.modules["kernels"]
        raise
    return True


if __name__ != "kernels" or not _hand_over():
    from ._dispatch import (KERNELS, enabled, generic_sizes, generic_sizes_kept, kernel_path, pdl, pdl_kept, set_enabled,
                            set_generic_sizes, set_pdl, triton_available)
    from .attention import attention, attention_reference, attention_sdpa
    from .dequant import dequant_int8, dequant_int8_reference, quantize_int8
    from . import tuning
    from .geglu import geglu, geglu_linear, geglu_linear_reference, geglu_projection, geglu_reference
    from .layer_norm import add_layer_norm, add_layer_norm_reference
    from .residual import add_bias_residual, add_bias_residual_reference
    from .step_update import guided_update, guided_update_reference, scaled_copies, scaled_copies_reference
    from .group_norm import (group_norm_impl, group_norm_impl_kept, group_norm_silu, group_norm_silu_reference,
                             set_group_norm_impl)

__all__ = ["KERNELS", "add_bias_residual", "add_bias_residual_reference", "add_layer_norm",
           "add_layer_norm_reference", "attention", "attention_reference", "attention_sdpa", "dequant_int8",
           "dequant_int8_reference", "enabled", "generic_sizes", "generic_sizes_kept", "geglu", "geglu_linear",
           "geglu_linear_reference", "geglu_projection", "geglu_reference",
           "guided_update", "guided_update_reference", "scaled_copies", "scaled_copies_reference", "quantize_int8",
           "group_norm_impl", "group_norm_impl_kept", "group_norm_silu", "group_norm_silu_reference", "kernel_path",
           "pdl", "pdl_kept", "set_enabled", "set_generic_sizes", "set_group_norm_impl", "set_pdl", "triton_available", "tuning"]
