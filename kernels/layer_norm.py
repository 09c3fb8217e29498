"""A residual add and the LayerNorm that follows it, in one pass ("skip layer norm", as ONNX
Runtime and TensorRT fuse it):

    s = a + r           (stored in a's dtype: the transformer block's residual stream)
    y = layer_norm(s)   (statistics in fp32 of the stored s)
    s + s_bias          (what is returned as s, when an s_bias (C,) is given: a bias the residual
                         stream takes on for a later in-place GEMM (FastUNet's feed-forward), which
                         the LayerNorm must not see)

In SD's transformer block the attention outputs are added to the residual stream and the sum is
normalised right away (norm2 after self-attention, norm3 after cross-attention); PyTorch does an
add kernel, then a LayerNorm kernel that reads the sum back. Here each program takes a few whole
rows (the channel axis, <= 2048 wide at SD's widths, sits in registers), so a and r are read once
and s and y written once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import jit as _jit, kernel_path, next_pow2, pdl_options, pdl_prologue

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_WIDTH = 8192  # wider rows take the reference (no SD layer is wider than 1280)


def add_layer_norm_reference(a, r, weight, bias, eps: float, s_bias=None):
    s = a + r
    y = F.layer_norm(s.float(), (s.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return (s if s_bias is None else s + s_bias), y.to(s.dtype)


if triton is not None:
    @_jit("M", "C")
    def _add_layer_norm(a_ptr, r_ptr, w_ptr, b_ptr, sb_ptr, s_ptr, y_ptr, M, C, eps, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, HAS_SB: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        cm = cols < C
        m = (rows[:, None] < M) & cm[None, :]
        off = rows[:, None].to(tl.int64) * C + cols[None, :]
        s = tl.load(a_ptr + off, mask=m, other=0.0).to(tl.float32) + tl.load(r_ptr + off, mask=m, other=0.0).to(
            tl.float32)
        s = s.to(s_ptr.dtype.element_ty).to(tl.float32)  # the residual stream as stored; its LayerNorm reads this
        if HAS_SB:
            sb = tl.load(sb_ptr + cols, mask=cm, other=0.0).to(tl.float32)
            tl.store(s_ptr + off, (s + sb[None, :]).to(s_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(s_ptr + off, s.to(s_ptr.dtype.element_ty), mask=m)
        width = tl.cast(C, tl.float32)
        mean = tl.sum(s, 1) / width
        d = tl.where(m, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / width + eps)
        y = d * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=m)


def add_layer_norm(a, r, weight, bias, eps: float, s_bias=None):
    """(s, y): s = a + r in a's dtype, y = layer_norm(s) over the last axis with fp32 statistics;
    a and r (..., C) of the same shape and dtype; weight, bias (C,) or None; s_bias (C,): returned
    s is a + r + s_bias (y still the norm of a + r)."""
    if a.shape != r.shape or a.dtype != r.dtype or a.dim() < 1:
        raise ValueError(f"add_layer_norm: a {tuple(a.shape)} {a.dtype}, r {tuple(r.shape)} {r.dtype}")
    width = a.shape[-1]
    for name, p in (("weight", weight), ("bias", bias), ("s_bias", s_bias)):
        if p is not None and p.shape != (width,):
            raise ValueError(f"add_layer_norm: {name} {tuple(p.shape)} for width {width}")
    if kernel_path("add_layer_norm", a) == "reference" or width > MAX_WIDTH:
        return add_layer_norm_reference(a, r, weight, bias, eps, s_bias)
    a, r = a.contiguous(), r.contiguous()
    s, y = torch.empty_like(a), torch.empty_like(a)
    rows = a.numel() // max(1, width)
    block = max(16, next_pow2(width))
    per = max(1, min(16, 4096 // block))  # rows per program: ~4096 elements per tile
    dummy = a
    pick = lambda t: dummy if t is None else t  # noqa: E731
    _add_layer_norm[(triton.cdiv(rows, per),)](a, r, pick(weight), pick(bias), pick(s_bias), s, y, rows, width,
                                               float(eps), HAS_W=weight is not None, HAS_B=bias is not None,
                                               HAS_SB=s_bias is not None, ROWS=per, BLOCK=block,
                                               **pdl_options(a))
    return s, y
