"""GroupNorm (+ the ResNet's time-embedding add) (+ SiLU) in three small passes, any memory format.

    y = silu(group_norm(x + temb[:, :, None, None]) * weight + bias)      x (N, C, H, W)

PyTorch's GroupNorm on a channels-last tensor copies it to NCHW and back; this reads x in place
through its strides. Every pass works on [BLOCK_P pixels, BLOCK_C channels] tiles of ALL channels
(not one group's few channels), so in channels-last (NHWC) each tile row is BLOCK_C contiguous
channels: fully coalesced loads. Odd channels-per-group (C=320, 32 groups: 10) cost nothing here.
  pass 1  _gn_partial  grid (N, SPLIT, C/BLOCK_C): per-channel sums of (x - x[pixel 0]) and of
          its square over a range of pixels -> part (N, SPLIT, 2, C) fp32
  pass 2  _gn_finalize grid (N*G,): combine a group's partials -> mean, rstd; fold weight, bias
          and temb into one per-(n, c) affine: y = x * scale + shift -> ss (N, 2, C) fp32
  pass 3  _gn_apply    grid (N, HW/BLOCK_P, C/BLOCK_C): y = silu(x * scale + shift), x's format
Statistics in fp32, numerically safe for activations whose mean is >> their spread: sums are
taken about a per-channel pivot (the channel's first pixel, close to its mean) and channels are
combined Chan-style (M2_group = sum M2_c + HW * sum (mean_c - mean_group)^2). temb shifts every
pixel of a channel equally, so it cancels from the pivoted sums: only pass 2 reads it.

A second implementation, "grouped" (set_group_norm_impl; PM_GN_IMPL), launches fewer kernels: in
a CUDA-graph-captured UNet step a GroupNorm at SD 1.5's sizes costs more in launches than in bytes
(61 of them per step, three launches each here); the step got ~0.3 ms slower on an H200 between
two commits, and this three-pass version replacing a two-launch one is among the changes between
them (a suspect, not a finding). Its programs work on one (sample, group) and a
range of its pixels, the group's channels contiguous in channels-last (shorter rows than the tiles
above: less coalesced; channels per group is a constexpr, so a row is read in accesses as wide as
its alignment allows: 16 bytes at 40 or 80 fp16 channels, 8 at 20 or 60, 4 at 10 or 30), with the
same pivoted, Chan-combined fp32 statistics:
  small groups (CPG * HW <= FUSE_MAX)  _gn_grp_apply, FUSED: ONE launch, grid (N*G,): the program
          takes its group's statistics, then normalises it (a second read, from cache)
  larger  _gn_grp_stats grid (N*G, SPLIT): (mean, M2) of each pixel range -> part (N*G, SPLIT, 2);
          _gn_grp_apply grid (N*G, SPLIT): combines its group's SPLIT partials, normalises its range
"auto" takes grouped's one launch where it covers the group and tiled's coalesced passes elsewhere.
Which is faster at which size is for the GPU benchmark to say (bench_kernels.py measures tiled and
grouped, the torch-cuda variants torch-cuda-gn-grouped / -gn-auto the step); "tiled" stays the
default until it has.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import tuning
from ._dispatch import _kept, dense, jit as _jit, kernel_path, layout, next_pow2, pdl_options, pdl_prologue

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works
    triton = None


def group_norm_silu_reference(x, weight, bias, num_groups: int, eps: float, *, temb=None, silu: bool = True):
    y = x.float().contiguous()  # NCHW: PyTorch's CPU channels-last GroupNorm loses digits when mean >> std
    if temb is not None:
        y = y + temb.float()[:, :, None, None]
    y = F.group_norm(y, num_groups, weight.float(), bias.float(), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=layout(x))


def _native_cpu(x, weight, bias, num_groups: int, eps: float, silu: bool):
    """bfloat16 on a CPU (the torch-cuda backend's CPU run): PyTorch's own GroupNorm in x's dtype and
    layout (its CPU kernels keep the statistics in fp32), where the reference would make an fp32 NCHW
    copy of x and convert back (2-core Xeon with AMX, SD-1.5-shaped VAE decode at 256 px: ~1.1 ->
    ~0.85 s). Not with temb: the add would round in bfloat16 before the statistics (the reference
    adds in fp32)."""
    y = F.group_norm(x, num_groups, weight.float(), bias.float(), eps)  # (mixed types: the affine in fp32)
    return F.silu(y, inplace=True) if silu else y


# auto: grouped where one launch does (CPG * HW <= FUSE_MAX), else tiled; tuned: per shape, tiled or grouped
# as pm_kernels.tuning measured them on this GPU, tiled where it has not
IMPLS = ("tiled", "grouped", "auto", "tuned")
_IMPL = os.environ.get("PM_GN_IMPL", "tuned")
FUSE_MAX = 32768  # grouped: a (sample, group) of at most this many elements is normalised in one launch
# (counted at SD 1.5's shapes: 43 of the UNet's 61 GroupNorms at 512 px, 16 at 1024 px; the largest group
# then is 64 KB in fp16, read twice by one program)
GROUPED_TILE = 2048  # grouped: elements per [pixels, group channels] tile


def set_group_norm_impl(name: str) -> None:
    """Which Triton implementation group_norm_silu launches from now on: "tiled" (three passes over
    all-channel tiles), "grouped" (one or two launches per call), "auto" (grouped where its one
    launch covers the group, tiled elsewhere) or "tuned" (the default: per shape, the faster of tiled
    and grouped as pm_kernels.tuning measured them on this GPU; tiled where it has not). A CUDA graph
    keeps the kernels it captured: set this before capturing."""
    global _IMPL
    if name not in IMPLS:
        raise ValueError(f"group norm implementation {name!r}: one of {', '.join(IMPLS)}")
    _IMPL = name


def group_norm_impl() -> str:
    return _IMPL


def group_norm_impl_kept(name: str | None = None):
    """A block run with implementation `name` (None: whatever the block itself sets, e.g. a torch-cuda
    backend's gn_impl); the implementation in force before it is back afterwards."""
    return _kept(group_norm_impl, set_group_norm_impl, name)


def _takes_grouped(group_elements: int, impl: str) -> bool:
    """Whether implementation `impl` normalises a (sample, group) of this many elements with the
    grouped kernels (else the tiled passes)."""
    if impl not in IMPLS:
        raise ValueError(f"group norm implementation {impl!r} (PM_GN_IMPL): one of {', '.join(IMPLS)}")
    return impl == "grouped" or (impl == "auto" and group_elements <= FUSE_MAX)  # (tuned: resolved by the caller)


if triton is not None:
    # Sizes and strides are specialised (_dispatch.jit): a unit stride tells Triton which tile axis is
    # contiguous, and sizes and strides divisible by 16 let it vectorise the masked loads and stores
    # along it; SD's sizes all divide by 16, so a few compiled variants serve every layer of a UNet.
    @_jit("C", "HW", "SPLIT", "CHUNK")
    def _gn_partial(x_ptr, part_ptr, C, HW, SPLIT, CHUNK, s_n, s_c, s_p,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        n, sp, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels
        cmask = cs < C
        base = x_ptr + n * s_n + cs[None, :] * s_c
        pivot = tl.load(base, mask=cmask[None, :], other=0.0).to(tl.float32)  # (1, BLOCK_C) pixel 0
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, HW)
        for p0 in range(start, start + CHUNK, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)  # (BLOCK_P,) pixels
            m = (ps[:, None] < end) & cmask[None, :]
            v = tl.load(base + ps[:, None] * s_p, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - pivot, 0.0)
            acc += d
            acc2 += d * d
        out = part_ptr + (n * SPLIT + sp) * 2 * C + cs  # part (N, SPLIT, 2, C)
        tl.store(out, tl.sum(acc, 0), mask=cmask)
        tl.store(out + C, tl.sum(acc2, 0), mask=cmask)

    @_jit("C", "HW", "G", "CPG", "SPLIT")
    def _gn_finalize(x_ptr, t_ptr, w_ptr, b_ptr, part_ptr, ss_ptr, C, HW, G, CPG, SPLIT, eps, s_n, s_c, t_n,
                     HAS_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        ng = tl.program_id(0)
        n, g = ng // G, ng % G
        js = tl.arange(0, BLOCK_G)
        jmask = js < CPG
        cs = g * CPG + js  # (BLOCK_G,) the group's channels
        ss = tl.arange(0, BLOCK_S)
        pm = (ss[:, None] < SPLIT) & jmask[None, :]
        p = part_ptr + (n * SPLIT + ss[:, None]) * 2 * C + cs[None, :]  # (BLOCK_S, BLOCK_G)
        s1 = tl.sum(tl.load(p, mask=pm, other=0.0), 0)  # (BLOCK_G,) sum (x - pivot)
        s2 = tl.sum(tl.load(p + C, mask=pm, other=0.0), 0)  # sum (x - pivot)^2
        hw = tl.cast(HW, tl.float32)
        pivot = tl.load(x_ptr + n * s_n + cs * s_c, mask=jmask, other=0.0).to(tl.float32)
        if HAS_T:
            tv = tl.load(t_ptr + n * t_n + cs, mask=jmask, other=0.0).to(tl.float32)
            pivot += tv
        mean_c = pivot + s1 / hw
        m2_c = tl.maximum(s2 - s1 * (s1 / hw), 0.0)
        mean = tl.sum(tl.where(jmask, mean_c, 0.0), 0) / tl.cast(CPG, tl.float32)
        dev = tl.where(jmask, mean_c - mean, 0.0)
        var = (tl.sum(tl.where(jmask, m2_c, 0.0), 0) + hw * tl.sum(dev * dev, 0)) / (hw * tl.cast(CPG, tl.float32))
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + cs, mask=jmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cs, mask=jmask, other=0.0).to(tl.float32)
        scale = w * rstd
        shift = b - mean * scale
        if HAS_T:
            shift += tv * scale  # (x + t - mean) * scale + b
        tl.store(ss_ptr + n * 2 * C + cs, scale, mask=jmask)  # ss (N, 2, C)
        tl.store(ss_ptr + n * 2 * C + C + cs, shift, mask=jmask)

    @_jit("C", "HW")
    def _gn_apply(x_ptr, ss_ptr, y_ptr, C, HW, s_n, s_c, s_p, o_n, o_c, o_p, SILU: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        n, pb, cb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cs = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        ps = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        m = (ps[:, None] < HW) & cmask[None, :]
        scale = tl.load(ss_ptr + n * 2 * C + cs, mask=cmask, other=0.0)
        shift = tl.load(ss_ptr + n * 2 * C + C + cs, mask=cmask, other=0.0)
        v = tl.load(x_ptr + n * s_n + cs[None, :] * s_c + ps[:, None] * s_p, mask=m, other=0.0).to(tl.float32)
        y = v * scale[None, :] + shift[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + n * o_n + cs[None, :] * o_c + ps[:, None] * o_p, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _grp_range_stats(x_ptr, t_ptr, n, g, G, CPG: tl.constexpr, start, end, s_n, s_c, s_p, t_n, HAS_T: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """(mean, M2) of x + temb over one group's channels and pixels [start, end): per-channel sums
        about the channel's first pixel, channels combined Chan-style."""
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < CPG
        chan = g * CPG + cs
        base = x_ptr + n * s_n + chan[None, :] * s_c
        pivot = tl.load(base, mask=cmask[None, :], other=0.0).to(tl.float32)  # (1, BLOCK_C): pixel 0
        acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        acc2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for p0 in range(start, end, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            m = (ps[:, None] < end) & cmask[None, :]
            d = tl.where(m, tl.load(base + ps[:, None] * s_p, mask=m, other=0.0).to(tl.float32) - pivot, 0.0)
            acc += d
            acc2 += d * d
        s1 = tl.sum(acc, 0)  # (BLOCK_C,)
        s2 = tl.sum(acc2, 0)
        npix = tl.cast(end - start, tl.float32)
        mean_c = tl.sum(pivot, 0) + s1 / npix
        if HAS_T:
            mean_c += tl.load(t_ptr + n * t_n + chan, mask=cmask, other=0.0).to(tl.float32)
        m2_c = tl.maximum(s2 - s1 * (s1 / npix), 0.0)
        mean = tl.sum(tl.where(cmask, mean_c, 0.0), 0) / tl.cast(CPG, tl.float32)
        dev = tl.where(cmask, mean_c - mean, 0.0)
        return mean, tl.sum(tl.where(cmask, m2_c, 0.0), 0) + npix * tl.sum(dev * dev, 0)

    @_jit("HW", "G", "SPLIT", "CHUNK")
    def _gn_grp_stats(x_ptr, t_ptr, part_ptr, HW, G, CPG: tl.constexpr, SPLIT, CHUNK, s_n, s_c, s_p, t_n, HAS_T: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        ng, sp = tl.program_id(0), tl.program_id(1)
        start = sp * CHUNK
        mean, m2 = _grp_range_stats(x_ptr, t_ptr, ng // G, ng % G, G, CPG, start, tl.minimum(start + CHUNK, HW),
                                    s_n, s_c, s_p, t_n, HAS_T, BLOCK_P, BLOCK_C)
        tl.store(part_ptr + (ng * SPLIT + sp) * 2, mean)
        tl.store(part_ptr + (ng * SPLIT + sp) * 2 + 1, m2)

    @_jit("HW", "G", "SPLIT", "CHUNK")
    def _gn_grp_apply(x_ptr, t_ptr, w_ptr, b_ptr, y_ptr, part_ptr, HW, G, CPG: tl.constexpr, SPLIT, CHUNK, eps, s_n, s_c, s_p,
                      t_n, o_n, o_c, o_p, HAS_T: tl.constexpr, SILU: tl.constexpr, FUSED: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        ng, sp = tl.program_id(0), tl.program_id(1)
        n, g = ng // G, ng % G
        hw = tl.cast(HW, tl.float32)
        if FUSED:  # the whole group in this program: its statistics first (SPLIT == 1)
            mean, m2 = _grp_range_stats(x_ptr, t_ptr, n, g, G, CPG, 0, HW, s_n, s_c, s_p, t_n, HAS_T, BLOCK_P,
                                        BLOCK_C)
        else:  # Chan-combine the group's SPLIT (mean, M2) partials, each over cnt pixels x CPG channels
            ss = tl.arange(0, BLOCK_S)
            smask = ss < SPLIT
            means = tl.load(part_ptr + (ng * SPLIT + ss) * 2, mask=smask, other=0.0)
            m2s = tl.load(part_ptr + (ng * SPLIT + ss) * 2 + 1, mask=smask, other=0.0)
            cnt = tl.where(smask, tl.minimum(CHUNK, HW - ss * CHUNK), 0).to(tl.float32)
            mean = tl.sum(cnt * means, 0) / hw
            dm = tl.where(smask, means - mean, 0.0)
            m2 = tl.sum(m2s, 0) + tl.cast(CPG, tl.float32) * tl.sum(cnt * dm * dm, 0)
        rstd = 1.0 / tl.sqrt(m2 / (hw * tl.cast(CPG, tl.float32)) + eps)
        cs = tl.arange(0, BLOCK_C)
        cmask = cs < CPG
        chan = g * CPG + cs
        scale = tl.load(w_ptr + chan, mask=cmask, other=0.0).to(tl.float32) * rstd
        shift = tl.load(b_ptr + chan, mask=cmask, other=0.0).to(tl.float32) - mean * scale
        if HAS_T:  # (x + t - mean) * scale + b
            shift += tl.load(t_ptr + n * t_n + chan, mask=cmask, other=0.0).to(tl.float32) * scale
        start = sp * CHUNK
        end = tl.minimum(start + CHUNK, HW)
        for p0 in range(start, end, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            m = (ps[:, None] < end) & cmask[None, :]
            v = tl.load(x_ptr + n * s_n + chan[None, :] * s_c + ps[:, None] * s_p, mask=m, other=0.0).to(tl.float32)
            y = v * scale[None, :] + shift[None, :]
            if SILU:
                y = y / (1.0 + tl.exp(-y))
            tl.store(y_ptr + n * o_n + chan[None, :] * o_c + ps[:, None] * o_p, y.to(y_ptr.dtype.element_ty), mask=m)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _tile(hw: int, c: int, channels_last: bool, elems: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of about `elems` elements, longest along the contiguous axis."""
    if channels_last:
        block_c = min(128, max(16, next_pow2(c)))
        return max(1, min(next_pow2(hw), elems // block_c)), block_c
    block_p = min(256, max(16, next_pow2(hw)))
    return block_p, max(1, min(next_pow2(c), elems // block_p))


def group_norm_silu(x, weight, bias, num_groups: int, eps: float, *, temb=None, silu: bool = True, out=None):
    """silu(group_norm(x + temb)) with fp32 statistics; the output has x's shape, dtype and memory
    format. x (N, C, H, W); temb None or (N, C); silu=False: the plain GroupNorm. out: a tensor of
    x's shape and dtype to write the result into and return, x itself included (in place: every
    pass reads what it normalises before the last pass writes it, each element by the program that
    read it; for a caller whose input is dead after the norm, one full-size tensor fewer alive)."""
    if x.dim() != 4 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_silu: x {tuple(x.shape)} with {num_groups} groups")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"group_norm_silu: out {tuple(out.shape)} {out.dtype} for x {tuple(x.shape)} {x.dtype}")
    if kernel_path("group_norm_silu", x) == "reference":
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and temb is None:
            y = _native_cpu(x, weight, bias, num_groups, eps, silu)
        else:
            y = group_norm_silu_reference(x, weight, bias, num_groups, eps, temb=temb, silu=silu)
        return y if out is None else out.copy_(y)
    impl = _IMPL
    if impl == "tuned":
        impl = _tuned(x, weight, bias, num_groups, eps, temb, silu)
    return _launch(x, weight, bias, num_groups, eps, temb, silu, out, impl)


def _tuned(x, weight, bias, num_groups, eps, temb, silu) -> str:
    """"tiled" or "grouped" for this call's shape: pm_kernels.tuning's choice (its candidates write
    fresh outputs, never `out`), "tiled" where it has made none."""
    candidates = {impl: lambda impl=impl: _launch(x, weight, bias, num_groups, eps, temb, silu, None, impl)
                  for impl in ("tiled", "grouped")}
    key = (x.dtype, *x.shape, num_groups, temb is not None, bool(silu), layout(x) == torch.channels_last)
    return tuning.choose("group_norm_silu", key, candidates, x.device)


def _launch(x, weight, bias, num_groups: int, eps: float, temb, silu: bool, out, impl: str):
    """group_norm_silu's Triton path with implementation `impl` (tiled, grouped or auto)."""
    n, c, h, w = x.shape
    x, fmt = dense(x)
    if out is None:
        y = torch.empty_like(x, memory_format=fmt)
    else:  # written through its own strides where dense in either layout (x itself included)
        y, _ = dense(out)
        if y is not out:  # not dense: computed apart, copied in
            return out.copy_(_launch(x, weight, bias, num_groups, eps, temb, silu, None, impl))
    hw, cpg = h * w, c // num_groups
    s_n, s_c, s_p = x.stride(0), x.stride(1), x.stride(3)  # pixel p = h*W + w: stride(2) == W*stride(3)
    o_n, o_c, o_p = y.stride(0), y.stride(1), y.stride(3)
    t = x  # a dummy pointer when temb is absent
    if temb is not None:  # (N, C) with unit channel stride; a row expanded over the batch (stride 0) is read as it is
        if temb.shape != (n, c):
            raise ValueError(f"group_norm_silu: temb {tuple(temb.shape)} for x {tuple(x.shape)}")
        t = temb if temb.stride(1) == 1 else temb.contiguous()
    t_n = t.stride(0) if temb is not None else 0
    if _takes_grouped(cpg * hw, impl):
        _grouped(x, t, t_n, weight, bias, y, num_groups, eps, temb is not None, silu, (s_n, s_c, s_p), (o_n, o_c, o_p))
        return y
    nhwc = s_c == 1 and c > 1
    pdl = pdl_options(x)

    # pass 1: enough programs (~512) to fill a big GPU, each looping over whole tiles of its pixel range
    block_p, block_c = _tile(hw, c, nhwc, 2048)
    c_blocks = _ceil(c, block_c)
    split = max(1, min(64, _ceil(512, n * c_blocks), _ceil(hw, block_p)))
    chunk = _ceil(_ceil(hw, split), block_p) * block_p  # ceil(hw / split), rounded up to whole tiles
    split = _ceil(hw, chunk)
    part = torch.empty((n, split, 2, c), dtype=torch.float32, device=x.device)
    _gn_partial[(n, split, c_blocks)](x, part, c, hw, split, chunk, s_n, s_c, s_p, BLOCK_P=block_p, BLOCK_C=block_c,
                                      **pdl)

    # pass 2: one program per (sample, group)
    ss = torch.empty((n, 2, c), dtype=torch.float32, device=x.device)
    _gn_finalize[(n * num_groups,)](x, t, weight, bias, part, ss, c, hw, num_groups, cpg, split, float(eps), s_n,
                                    s_c, t_n, HAS_T=temb is not None, BLOCK_S=max(2, next_pow2(split)),
                                    BLOCK_G=max(2, next_pow2(cpg)), **pdl)

    # pass 3: one tile per program
    block_p, block_c = _tile(hw, c, nhwc, 4096)
    _gn_apply[(n, _ceil(hw, block_p), _ceil(c, block_c))](x, ss, y, c, hw, s_n, s_c, s_p, o_n, o_c, o_p,
                                                         SILU=bool(silu), BLOCK_P=block_p, BLOCK_C=block_c, **pdl)
    return y


def _grouped_plan(shape, num_groups: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_P, SPLIT, CHUNK) of the grouped implementation for x of `shape` (N, C, H, W)."""
    n, c, h, w = shape
    hw, cpg = h * w, c // num_groups
    block_c = max(2, next_pow2(cpg))
    block_p = max(1, min(next_pow2(hw), GROUPED_TILE // block_c))
    split = 1 if cpg * hw <= FUSE_MAX else max(1, min(64, _ceil(512, n * num_groups), _ceil(hw, block_p)))
    chunk = _ceil(_ceil(hw, split), block_p) * block_p  # whole tiles per program
    return block_c, block_p, _ceil(hw, chunk), chunk


def launches(shape, num_groups: int, impl: str | None = None) -> int:
    """Kernel launches of one group_norm_silu call on x of `shape` with implementation `impl`
    (default: the current one) on the Triton path: what a CUDA graph of a UNet step multiplies. "tuned"
    counts as "tiled", what it takes without a choice made on a GPU."""
    n, c, h, w = shape
    if not _takes_grouped(c // num_groups * h * w, impl or _IMPL):
        return 3
    return 1 if _grouped_plan(shape, num_groups)[2] == 1 else 2


def _grouped(x, t, t_n, weight, bias, y, num_groups: int, eps: float, has_t: bool, silu: bool, xs, ys) -> None:
    """The "grouped" implementation into y: one launch for small groups, two otherwise."""
    n, c, h, w = x.shape
    hw, cpg = h * w, c // num_groups
    block_c, block_p, split, chunk = _grouped_plan(x.shape, num_groups)
    part = y  # a dummy pointer for the one-launch case
    pdl = pdl_options(x)
    if split > 1:
        part = torch.empty((n * num_groups, split, 2), dtype=torch.float32, device=x.device)
        _gn_grp_stats[(n * num_groups, split)](x, t, part, hw, num_groups, cpg, split, chunk, *xs, t_n, HAS_T=has_t,
                                               BLOCK_P=block_p, BLOCK_C=block_c, **pdl)
    _gn_grp_apply[(n * num_groups, split)](x, t, weight, bias, y, part, hw, num_groups, cpg, split, chunk, float(eps),
                                           *xs, t_n, *ys, HAS_T=has_t, SILU=bool(silu), FUSED=split == 1,
                                           BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_S=max(2, next_pow2(split)), **pdl)
