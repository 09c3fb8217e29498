"""GEGLU in one pass: h (..., 2F) -> h[..., :F] * gelu(h[..., F:]) (exact erf GELU, as diffusers'
GEGLU). PyTorch does chunk + gelu + mul: the gate is read twice and an (..., F) temporary is
written and read back; here each element is read once and the result written once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import kernel_path

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
    def _geglu(h_ptr, y_ptr, FEAT, s_row, BLOCK: tl.constexpr):
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
    _geglu[(h2.shape[0], -(-feat // block))](h2, y, feat, h2.stride(0), BLOCK=block)
    return y.view(*h.shape[:-1], feat)
