"""The denoising step's own arithmetic around the UNet, two kernels instead of ~30 small ones.

In the torch-cuda step graph (pm_runtime.modeling.step_graph) each step reads its per-step values
from device tables at the device-side step counter; written with PyTorch ops, the UNet's input
(scale, cast, one copy per guidance half) and the update after it (guidance combine, then the
scheduler's affine form, pm_runtime.schedulers.linear) take ~30 kernels on a (n, 4, h, w) latent:
a few microseconds each in a CUDA graph, for a few hundred KB of data. Here:

    scaled_copies(x, scale, step, copies, dtype, memory_format)
        y = [x * scale[step]] * copies, cast to dtype, in the UNet's input layout   (copies*n, C, h, w)
    guided_update(uncond, cond, x, x0_prev, noise, coef, step, guidance, clip)      in place: x, x0_prev
        o    = uncond + guidance * (cond - uncond)
        x0   = clamp(c[0] x + c[1] o, -clip, clip)             c = coef[step], COLUMNS of
        eps  = c[2] x + c[3] o                                  pm_runtime.schedulers.linear
        x    = c[4] x + c[5] o + c[6] x0 + c[7] eps + c[8] x0_prev + c[9] noise
        x0_prev = x0
x, x0_prev, noise: float32 contiguous (n, C, h, w); uncond, cond: the UNet's outputs in any dtype
and memory format (the same strides); scale (S,), coef (S, 10), step (int64), guidance and clip
(float32): device tensors, read inside the kernel (nothing read back to the host).
"""

from __future__ import annotations

import torch

from ._dispatch import jit as _jit, kernel_path, pdl_options, pdl_prologue

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

NCOEF = 10  # columns of the affine form (pm_runtime.schedulers.linear.COLUMNS)


def scaled_copies_reference(x, scale, step, copies: int, dtype, memory_format=torch.contiguous_format):
    xin = (x * scale.index_select(0, step.reshape(1))).to(dtype)
    y = torch.cat([xin] * copies) if copies > 1 else xin
    return y.contiguous(memory_format=memory_format)


def guided_update_reference(uncond, cond, x, x0_prev, noise, coef, step, guidance, clip) -> None:
    c = coef.index_select(0, step.reshape(1))[0]
    uncond = uncond.float()
    o = uncond + guidance * (cond.float() - uncond)
    x0 = torch.clamp(c[0] * x + c[1] * o, -clip, clip)
    eps = c[2] * x + c[3] * o
    prev = c[4] * x + c[5] * o + c[6] * x0 + c[7] * eps + c[8] * x0_prev + c[9] * noise
    x.copy_(prev)
    x0_prev.copy_(x0)


if triton is not None:
    @_jit("total", "C", "HW")
    def _scaled_copies(x_ptr, s_ptr, step_ptr, y_ptr, total, C, HW, COPIES: tl.constexpr, NHWC: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # x's (NCHW) element index
        m = offs < total
        scale = tl.load(s_ptr + tl.load(step_ptr))
        v = (tl.load(x_ptr + offs, mask=m, other=0.0) * scale).to(y_ptr.dtype.element_ty)
        if NHWC:
            chw = C * HW
            b, c, p = offs // chw, (offs // HW) % C, offs % HW
            out = b * chw + p * C + c
        else:
            out = offs
        for k in tl.static_range(COPIES):  # copy k is the k-th block of n samples
            tl.store(y_ptr + k * total + out, v, mask=m)

    @_jit("total", "C", "HW")
    def _guided_update(u_ptr, c_ptr, x_ptr, x0p_ptr, nz_ptr, coef_ptr, step_ptr, g_ptr, clip_ptr, total, C, HW,
                       o_n, o_c, o_p, NCOL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < total
        chw = C * HW
        o_off = (offs // chw) * o_n + ((offs // HW) % C) * o_c + (offs % HW) * o_p
        u = tl.load(u_ptr + o_off, mask=m, other=0.0).to(tl.float32)
        cond = tl.load(c_ptr + o_off, mask=m, other=0.0).to(tl.float32)
        k = coef_ptr + tl.load(step_ptr) * NCOL
        g, clip = tl.load(g_ptr), tl.load(clip_ptr)
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        x0p = tl.load(x0p_ptr + offs, mask=m, other=0.0)
        nz = tl.load(nz_ptr + offs, mask=m, other=0.0)
        o = u + g * (cond - u)
        x0 = tl.minimum(tl.maximum(tl.load(k) * x + tl.load(k + 1) * o, -clip), clip)
        eps = tl.load(k + 2) * x + tl.load(k + 3) * o
        prev = (tl.load(k + 4) * x + tl.load(k + 5) * o + tl.load(k + 6) * x0 + tl.load(k + 7) * eps
                + tl.load(k + 8) * x0p + tl.load(k + 9) * nz)
        tl.store(x_ptr + offs, prev, mask=m)
        tl.store(x0p_ptr + offs, x0, mask=m)


def _check_state(x, *others) -> None:
    for t in (x, *others):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != x.shape:
            raise ValueError("step kernels: the latent state must be float32, contiguous (NCHW), one shape")


def scaled_copies(x, scale, step, copies: int, dtype, memory_format=torch.contiguous_format):
    """(copies * n, C, h, w) in `dtype` and `memory_format`: `copies` times x * scale[step]."""
    _check_state(x)
    if x.dim() != 4 or copies < 1:
        raise ValueError(f"scaled_copies: x {tuple(x.shape)}, copies {copies}")
    if kernel_path("step_update", x) == "reference":
        return scaled_copies_reference(x, scale, step, copies, dtype, memory_format)
    n, c, h, w = x.shape
    y = torch.empty((copies * n, c, h, w), dtype=dtype, device=x.device, memory_format=memory_format)
    total, block = x.numel(), 1024
    _scaled_copies[(triton.cdiv(total, block),)](x, scale, step, y, total, c, h * w, COPIES=copies,
                                                  NHWC=memory_format == torch.channels_last and c > 1, BLOCK=block,
                                                  **pdl_options(x))
    return y


def guided_update(uncond, cond, x, x0_prev, noise, coef, step, guidance, clip) -> None:
    """One step of guidance + the scheduler's affine update, in place into x and x0_prev."""
    _check_state(x, x0_prev, noise)
    if uncond.shape != x.shape or cond.shape != x.shape or uncond.stride() != cond.stride():
        raise ValueError(f"guided_update: uncond {tuple(uncond.shape)}, cond {tuple(cond.shape)} for x "
                         f"{tuple(x.shape)} (same shape and strides)")
    if coef.shape[-1] != NCOEF:
        raise ValueError(f"guided_update: coef has {coef.shape[-1]} columns, not {NCOEF}")
    if kernel_path("step_update", x) == "reference":
        return guided_update_reference(uncond, cond, x, x0_prev, noise, coef, step, guidance, clip)
    n, c, h, w = x.shape
    total, block = x.numel(), 1024
    _guided_update[(triton.cdiv(total, block),)](uncond, cond, x, x0_prev, noise, coef, step, guidance, clip, total,
                                                  c, h * w, uncond.stride(0), uncond.stride(1), uncond.stride(3),
                                                  NCOL=NCOEF, BLOCK=block, **pdl_options(x))
