"""A ResNet block's output in one pass: out = h + x + bias[c], 4-D (N, C, H, W) in either memory format.

PyTorch's cuDNN convolution adds its bias in a separate pass over the output (aten's
_convolution: cudnn_convolution, then output.add_(bias)), and the block's residual add is a third
pass. FastUNet runs conv2 (and the 1x1 shortcut) without their biases and finishes the block here:
h and x read once, out written once, the two biases summed beforehand into one vector."""

from __future__ import annotations

import torch

from ._dispatch import dense, jit as _jit, kernel_path, layout, pdl_options, pdl_prologue

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def add_bias_residual_reference(h, x, bias=None, out=None):
    y = h.float() + x.float()
    if bias is not None:
        y = y + bias.float()[None, :, None, None]
    y = y.to(h.dtype).contiguous(memory_format=layout(h))
    return y if out is None else out.copy_(y)


if triton is not None:
    @_jit("total", "C", "HW")
    def _add_bias_residual(h_ptr, x_ptr, b_ptr, y_ptr, total, C, HW, HAS_B: tl.constexpr, NHWC: tl.constexpr,
                           BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < total
        y = tl.load(h_ptr + offs, mask=m, other=0.0).to(tl.float32) + tl.load(x_ptr + offs, mask=m, other=0.0).to(
            tl.float32)
        if HAS_B:
            c = offs % C if NHWC else (offs // HW) % C
            y += tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def add_bias_residual(h, x, bias=None, out=None):
    """h + x + bias[None, :, None, None] (fp32 sum, rounded once) in h's dtype and memory format;
    x is read in h's format (converted first if it differs); out: write there (may be h itself)."""
    if h.dim() != 4 or x.shape != h.shape or (bias is not None and bias.shape != (h.shape[1],)):
        raise ValueError(f"add_bias_residual: h {tuple(h.shape)}, x {tuple(x.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    if kernel_path("add_bias_residual", h) == "reference":
        return add_bias_residual_reference(h, x, bias, out)
    h, fmt = dense(h)
    x = x.contiguous(memory_format=fmt)  # no copy when it already is
    y = torch.empty_like(h, memory_format=fmt) if out is None else out
    if y.stride() != h.stride():
        raise ValueError("add_bias_residual: out must have h's shape and memory format")
    n, c, hh, w = h.shape
    total, block = h.numel(), 1024
    _add_bias_residual[(triton.cdiv(total, block),)](h, x, h if bias is None else bias.contiguous(), y, total, c,
                                                      hh * w, HAS_B=bias is not None,
                                                      NHWC=fmt == torch.channels_last and c > 1, BLOCK=block,
                                                      **pdl_options(h))
    return y
