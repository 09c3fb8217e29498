"""GEGLU in one pass: h (..., 2F) -> h[..., :F] * gelu(h[..., F:]) (exact erf GELU, as diffusers'
GEGLU). PyTorch does chunk + gelu + mul: the gate is read twice and an (..., F) temporary is
written and read back; here each element is read once and the result written once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import tuning
from ._dispatch import deepest_that_loads, kernel_path, pdl_options, pdl_prologue

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def geglu_reference(h):
    a, gate = h.float().chunk(2, dim=-1)
    return (a * F.gelu(gate)).to(h.dtype)


if triton is not None:
    @triton.jit
    def _geglu(h_ptr, y_ptr, FEAT, s_row, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        row, blk = tl.program_id(0), tl.program_id(1)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        m = cols < FEAT
        a = tl.load(h_ptr + row * s_row + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(h_ptr + row * s_row + FEAT + cols, mask=m, other=0.0).to(tl.float32)
        y = a * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
        tl.store(y_ptr + row * FEAT + cols, y.to(y_ptr.dtype.element_ty), mask=m)


def geglu(h):
    """h (..., 2F) with a contiguous last axis -> (..., F), dtype of h, computed in fp32."""
    if h.shape[-1] % 2:
        raise ValueError(f"geglu: last axis {h.shape[-1]} is odd")
    if kernel_path("geglu", h) == "reference":
        return geglu_reference(h)
    feat = h.shape[-1] // 2
    h2 = h.reshape(-1, 2 * feat)  # a view when the leading axes are contiguous
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    y = torch.empty(h2.shape[0], feat, dtype=h.dtype, device=h.device)
    block = 1024 if feat >= 1024 else max(16, 1 << (feat - 1).bit_length())
    _geglu[(h2.shape[0], -(-feat // block))](h2, y, feat, h2.stride(0), BLOCK=block, **pdl_options(h2))
    return y.view(*h.shape[:-1], feat)


# ---------------------------------------------------------------------------------------------------
# GEGLU inside its projection: y = (x W_a^T + b_a) * gelu(x W_g^T + b_g), W = [W_a; W_g] (2F, K), the
# feed-forward's first Linear (diffusers' GEGLU.proj). The (M, 2F) projection is never written: each
# program computes a (BLOCK_M, BLOCK_N) tile of both halves in two fp32 accumulators and writes only
# y's tile. At SD 1.5's 64x64 layers that is 42 MB written and read back less per call (the split
# GEMM + GEGLU kernel: cuBLAS 29 us + GEGLU 27 us on an H200 at [8192, 320, 2560], kernels record at
# 76e8a1a). Whether a Triton GEMM gets within reach of cuBLAS there is for the GPU to say: the kernel
# benchmark (op geglu_linear), and per shape pm_kernels.tuning (geglu_projection, FastUNet's default
# feed-forward path; geglu_gemm=True forces it).

def geglu_linear_reference(x, weight, bias=None):
    """geglu(F.linear(x, weight, bias)) in fp32, cast to x's dtype."""
    return geglu_reference(F.linear(x.float(), weight.float(), None if bias is None else bias.float()))


if triton is not None:
    @triton.jit
    def _geglu_mm(x_ptr, w_ptr, b_ptr, y_ptr, M, FEAT, K, s_xm, s_wn, s_ym, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  F32_DOT: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        # programs in groups of GROUP_M row blocks that walk the column blocks together: the weight
        # tiles they share stay in L2
        pid = tl.program_id(0)
        blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(FEAT, BLOCK_N)
        group = pid // (GROUP_M * blocks_n)
        first_m = group * GROUP_M
        rows_in_group = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * blocks_n)) % rows_in_group
        pid_n = (pid % (GROUP_M * blocks_n)) // rows_in_group
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mmask, nmask = rm < M, rn < FEAT
        acc_a = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + rk
            kmask = ks < K
            x = tl.load(x_ptr + rm[:, None] * s_xm + ks[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            wmask = kmask[:, None] & nmask[None, :]
            wa = tl.load(w_ptr + rn[None, :] * s_wn + ks[:, None], mask=wmask, other=0.0)  # (BLOCK_K, BLOCK_N): W_a^T
            wg = tl.load(w_ptr + (rn[None, :] + FEAT) * s_wn + ks[:, None], mask=wmask, other=0.0)
            if F32_DOT:
                x = x.to(tl.float32)
                acc_a += tl.dot(x, wa.to(tl.float32), input_precision="ieee")
                acc_g += tl.dot(x, wg.to(tl.float32), input_precision="ieee")
            else:
                acc_a += tl.dot(x, wa)
                acc_g += tl.dot(x, wg)
        if HAS_BIAS:
            acc_a += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(b_ptr + FEAT + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        y = acc_a * (0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476)))
        tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


def geglu_linear_config(m: int) -> dict:
    """The launch configuration geglu_linear takes for M rows (sweepable through its keywords)."""
    return {"block_m": 128 if m >= 1024 else 64, "block_n": 64, "block_k": 64, "num_warps": 8}


GEMM_STAGES = (3, 2, 1)  # pipelining depths tried in turn until the GPU loads the kernel (as attention's)
_GEMM_STAGES: dict = {}  # (device, dtype, block_m, block_n, block_k, num_warps) -> (the depth that loaded,)


def geglu_linear(x, weight, bias=None, *, block_m: int | None = None, block_n: int | None = None,
                 block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """x (..., K) with a contiguous last axis, weight (2F, K), bias (2F,) or None -> (..., F) in x's
    dtype: geglu(F.linear(x, weight, bias)) without the (..., 2F) projection in memory (fp32
    accumulation and GELU; the split path rounds the projection to x's dtype first). Elsewhere than
    the Triton path: that split path (PyTorch's linear, then geglu). The keywords override the launch
    configuration (geglu_linear_config; num_stages: that depth only, OutOfResources where it does
    not load, instead of the deepest of GEMM_STAGES that does)."""
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k or weight.shape[0] % 2 or \
            (bias is not None and tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"geglu_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    if kernel_path("geglu", x) == "reference":
        return geglu(F.linear(x, weight, bias))
    feat = weight.shape[0] // 2
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, feat, dtype=x.dtype, device=x.device)
    cfg = geglu_linear_config(m)
    cfg.update({key: v for key, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k),
                                      ("num_warps", num_warps)) if v is not None})
    f32_dot = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type == "cpu")  # as attention's
    grid = (triton.cdiv(m, cfg["block_m"]) * triton.cdiv(feat, cfg["block_n"]),)
    key = (x.device, x.dtype, cfg["block_m"], cfg["block_n"], cfg["block_k"], cfg["num_warps"])

    def launch(stages):
        _geglu_mm[grid](x2, w, bias if bias is not None else w, y, m, feat, k, x2.stride(0), w.stride(0),
                        y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                        BLOCK_K=cfg["block_k"], GROUP_M=8, F32_DOT=f32_dot, num_warps=cfg["num_warps"],
                        num_stages=stages, **pdl_options(x2))
        return y.view(*x.shape[:-1], feat)

    if num_stages is not None:
        return launch(num_stages)
    out = deepest_that_loads(_GEMM_STAGES, key, GEMM_STAGES, launch)
    return out if out is not None else geglu(F.linear(x, weight, bias))  # no depth fits this GPU: the split path


def geglu_projection(x, weight, bias=None, *, fused: bool | None = None):
    """geglu(F.linear(x, weight, bias)), the feed-forward's first half: the split path (PyTorch's
    GEMM, cuBLAS on a GPU, then the GEGLU kernel) or geglu_linear (fused=True; fused=False: the split
    path). fused=None: pm_kernels.tuning's choice for this shape where one was made (the split path,
    geglu_linear with its default tiles or with 128-column ones), else the split path. A caller that
    holds no other reference to x has it freed once projected (the split path's peak: the
    projection and the output, not x besides)."""
    if fused is False or kernel_path("geglu", x) == "reference":
        choice = "split"
    else:
        choice = "geglu-gemm" if fused else _projection_choice(x, weight, bias)
    if choice == "split":
        h = F.linear(x, weight, bias)
        del x
        return geglu(h)
    return geglu_linear(x, weight, bias, **({"block_n": 128} if choice == "geglu-gemm-n128" else {}))


def _projection_choice(x, weight, bias) -> str:
    m = x.numel() // x.shape[-1]
    candidates = {"split": lambda: geglu(F.linear(x, weight, bias)), "geglu-gemm": lambda: geglu_linear(x, weight, bias)}
    if m >= 1024:
        candidates["geglu-gemm-n128"] = lambda: geglu_linear(x, weight, bias, block_n=128)
    key = (x.dtype, m, x.shape[-1], weight.shape[0], bias is not None)
    return tuning.choose("geglu_projection", key, candidates, x.device)
