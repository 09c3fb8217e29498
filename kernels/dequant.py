"""int8 weight-only quantization: per-output-channel symmetric int8 weights, dequantized to the
run dtype by one kernel right before the layer uses them (pm_runtime.modeling.int8_weights).

    quantize_int8(w) -> (q int8, scale float32 (O,)):  q = round(w / scale), |q| <= 127,
                         scale = max |w[o]| / 127 per output channel o (axis 0)
    dequant_int8(q, scale, dtype) -> q * scale[o] in `dtype` (computed in fp32, rounded once),
                         in q's memory format (contiguous or channels-last)

The Triton kernel reads each int8 once and writes the result once; PyTorch's reference does it
in three passes (int8 -> fp32, multiply, round to dtype) with two fp32 temporaries. Both compute
the same fp32 product and round it once: their results are equal bit for bit (bf16 under the Triton
interpreter excepted: its fp32 -> bf16 cast truncates where compiled Triton rounds to nearest)."""

from __future__ import annotations

import torch

from ._dispatch import kernel_path, pdl_options, pdl_prologue

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

QMAX = 127


def _check(q, scale) -> int:
    """Elements per output channel; q's axis 0 must be outermost in memory (true for contiguous
    and channels-last tensors) so that channel o is the flat range [o * per, (o + 1) * per)."""
    if q.dtype != torch.int8:
        raise ValueError(f"dequant_int8: q must be int8, got {q.dtype}")
    if scale.shape != (q.shape[0],):
        raise ValueError(f"dequant_int8: scale {tuple(scale.shape)} does not match q's {q.shape[0]} output channels")
    per = q.numel() // max(q.shape[0], 1)
    if q.shape[0] > 1 and q.stride(0) != per or not _dense(q):
        raise ValueError("dequant_int8: q must be dense with its output-channel axis outermost")
    return per


def _dense(t) -> bool:
    return t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of weight w (O, ...) in w's memory format; an all-zero channel gets scale 1."""
    wf = w.detach().float()
    amax = wf.abs().reshape(wf.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = torch.round(wf / scale.view(shape)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.contiguous()


def _reference(q, scale, dtype):
    shape = (-1,) + (1,) * (q.ndim - 1)
    return (q.float() * scale.float().view(shape)).to(dtype)


def dequant_int8_reference(q, scale, dtype):
    _check(q, scale)
    return _reference(q, scale, dtype)


if triton is not None:
    @triton.jit
    def _dequant(q_ptr, s_ptr, out_ptr, TOTAL, PER, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < TOTAL
        q = tl.load(q_ptr + offs, mask=m, other=0).to(tl.float32)
        s = tl.load(s_ptr + offs // PER, mask=m, other=0.0)
        tl.store(out_ptr + offs, (q * s).to(out_ptr.dtype.element_ty), mask=m)


def dequant_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """q (O, ...) int8 (contiguous or channels-last), scale (O,) float32 -> q * scale in `dtype`,
    same shape and memory format as q."""
    per = _check(q, scale)
    if kernel_path("dequant_int8", q) == "reference":
        return _reference(q, scale, dtype)  # (checked above)
    out = torch.empty_like(q, dtype=dtype)  # keeps q's memory format (same strides)
    total = q.numel()
    if total:
        block = 1024
        _dequant[(triton.cdiv(total, block),)](q, scale.float().contiguous(), out, total, per, BLOCK=block, **pdl_options(q))
    return out
