"""GroupNorm (+ the ResNet's time-embedding add) (+ SiLU) in two passes, any memory format.

    y = silu(group_norm(x + temb[:, :, None, None]) * weight + bias)      x (N, C, H, W)

PyTorch's GroupNorm on a channels-last tensor copies it to NCHW and back; this reads x in place
through its strides (channels-last: channel stride 1, pixel stride C; NCHW: the reverse), with
the pixels of each (sample, group) split over SPLIT programs for parallelism:
  pass 1  grid (N*G, SPLIT): partial sum and sum of squares of its pixel range, fp32
  pass 2  grid (N*G, SPLIT): combine the SPLIT partials -> mean, rstd; normalise its range,
          affine, SiLU; write y in x's memory format
Statistics in fp32 (sum/sumsq: fine for activations whose mean is not >> their spread).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import kernel_path, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works
    triton = None


def group_norm_silu_reference(x, weight, bias, num_groups: int, eps: float, *, temb=None, silu: bool = True):
    y = x.float()
    if temb is not None:
        y = y + temb.float()[:, :, None, None]
    y = F.group_norm(y, num_groups, weight.float(), bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=_format(x))


def _format(x) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


if triton is not None:
    # Sizes are not specialised on (one compiled kernel serves every layer of a UNet); strides are
    # (their divisibility by 16 lets Triton vectorise the channel-contiguous loads).
    _SIZES = ["HW", "G", "CPG", "SPLIT", "CHUNK"]

    @triton.jit(do_not_specialize=_SIZES)
    def _gn_stats(x_ptr, t_ptr, part_ptr, HW, G, CPG, SPLIT, CHUNK, s_n, s_c, s_p, HAS_T: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        ng, sp = tl.program_id(0), tl.program_id(1)
        n, g = ng // G, ng % G
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < CPG
        chan = g * CPG + cs  # (BLOCK_C,)
        base = x_ptr + n * s_n + chan[None, :] * s_c
        if HAS_T:
            tv = tl.load(t_ptr + n * G * CPG + chan, mask=cmask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        start = sp * CHUNK
        for p0 in range(start, start + CHUNK, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            m = (ps[:, None] < tl.minimum(start + CHUNK, HW)) & cmask[None, :]
            v = tl.load(base + ps[:, None] * s_p, mask=m, other=0.0).to(tl.float32)
            if HAS_T:
                v = tl.where(m, v + tv[None, :], 0.0)
            acc += v
            acc2 += v * v
        tl.store(part_ptr + (ng * SPLIT + sp) * 2, tl.sum(tl.sum(acc, 1), 0))
        tl.store(part_ptr + (ng * SPLIT + sp) * 2 + 1, tl.sum(tl.sum(acc2, 1), 0))

    @triton.jit(do_not_specialize=_SIZES + ["eps"])
    def _gn_apply(x_ptr, t_ptr, w_ptr, b_ptr, y_ptr, part_ptr, HW, G, CPG, SPLIT, CHUNK, eps, s_n, s_c, s_p,
                  o_n, o_c, o_p, HAS_T: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        ng, sp = tl.program_id(0), tl.program_id(1)
        n, g = ng // G, ng % G
        ss = tl.arange(0, BLOCK_S)
        smask = ss < SPLIT
        s1 = tl.sum(tl.load(part_ptr + (ng * SPLIT + ss) * 2, mask=smask, other=0.0), 0)
        s2 = tl.sum(tl.load(part_ptr + (ng * SPLIT + ss) * 2 + 1, mask=smask, other=0.0), 0)
        count = (HW * CPG).to(tl.float32)
        mean = s1 / count
        var = tl.maximum(s2 / count - mean * mean, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < CPG
        chan = g * CPG + cs
        w = tl.load(w_ptr + chan, mask=cmask, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + chan, mask=cmask, other=0.0).to(tl.float32)
        scale = w * rstd  # y = v * scale + shift
        shift = b - mean * scale
        if HAS_T:
            tv = tl.load(t_ptr + n * G * CPG + chan, mask=cmask, other=0.0).to(tl.float32)
        start = sp * CHUNK
        for p0 in range(start, start + CHUNK, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            m = (ps[:, None] < tl.minimum(start + CHUNK, HW)) & cmask[None, :]
            v = tl.load(x_ptr + n * s_n + chan[None, :] * s_c + ps[:, None] * s_p, mask=m, other=0.0).to(tl.float32)
            if HAS_T:
                v = v + tv[None, :]
            y = v * scale[None, :] + shift[None, :]
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            tl.store(y_ptr + n * o_n + chan[None, :] * o_c + ps[:, None] * o_p,
                     y.to(y_ptr.dtype.element_ty), mask=m)


def _plan(n_groups: int, hw: int, cpg: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, SPLIT): a tile of ~2K elements; enough programs to fill a big GPU."""
    block_c = max(2, next_pow2(cpg))
    block_p = max(1, min(next_pow2(hw), 2048 // block_c))
    split = max(1, min(64, -(-512 // max(n_groups, 1)), -(-hw // block_p)))
    return block_c, block_p, split


def group_norm_silu(x, weight, bias, num_groups: int, eps: float, *, temb=None, silu: bool = True):
    """silu(group_norm(x + temb)) with fp32 statistics; the output has x's shape, dtype and memory
    format. x (N, C, H, W); temb None or (N, C); silu=False: the plain GroupNorm."""
    if x.dim() != 4 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_silu: x {tuple(x.shape)} with {num_groups} groups")
    if kernel_path(x) == "reference":
        return group_norm_silu_reference(x, weight, bias, num_groups, eps, temb=temb, silu=silu)
    n, c, h, w = x.shape
    fmt = _format(x)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
        fmt = torch.contiguous_format
    y = torch.empty_like(x, memory_format=fmt)
    hw, cpg = h * w, c // num_groups
    block_c, block_p, split = _plan(n * num_groups, hw, cpg)
    chunk = -(-hw // split)
    chunk = -(-chunk // block_p) * block_p  # whole tiles per program
    split = -(-hw // chunk)
    part = torch.empty((n * num_groups, split, 2), dtype=torch.float32, device=x.device)
    t = temb.contiguous() if temb is not None else x  # (N, C); a dummy pointer when absent
    s_n, s_c, s_p = x.stride(0), x.stride(1), x.stride(3)  # pixel p = h*W + w: stride(2) == W*stride(3)
    o_n, o_c, o_p = y.stride(0), y.stride(1), y.stride(3)
    grid = (n * num_groups, split)
    _gn_stats[grid](x, t, part, hw, num_groups, cpg, split, chunk, s_n, s_c, s_p, HAS_T=temb is not None,
                    BLOCK_P=block_p, BLOCK_C=block_c)
    _gn_apply[grid](x, t, weight, bias, y, part, hw, num_groups, cpg, split, chunk, float(eps), s_n, s_c, s_p,
                    o_n, o_c, o_p, HAS_T=temb is not None, SILU=bool(silu), BLOCK_P=block_p, BLOCK_C=block_c,
                    BLOCK_S=max(2, next_pow2(split)))
    return y
