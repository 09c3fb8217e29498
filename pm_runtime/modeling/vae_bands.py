"""The standalone VAE decoder's full-resolution end computed in row bands: the same function as
VAE.forward (exact: every GroupNorm uses the whole tensor's statistics, every convolution sees its
neighbouring rows), with less memory alive at once. torch-cuda's `vae_bands` option.

Where the plain decode peaks (fp16, SD 1.5 widths, one 512 px image; benchmarks/live_memory.py):
256 MiB, twice: the last upsampler's nearest-2x copy of its input and its output (256 channels at
512x512, 128 MiB each); then the last block's first ResNet with that output (normalised in place
after its 1x1 shortcut ran: Resnet.consume), the shortcut's and conv1's outputs (64 MiB each).
(Before the blocks consumed their inputs: 320 MiB there, the input's normalised copy besides.) Here:
- the last upsampler and the first ResNet after it are one step, in three passes over row bands:
  (A) the upsampler's output, band by band, only for its GroupNorm statistics (merged exactly, in
  float64, per band: Chan's parallel variance); (B) the same bands again (the upsampler is computed
  twice, about 0.3 TFLOP more at 512 px), normalised, into conv1 and the 1x1 shortcut; (C) conv2
  band by band, added into the shortcut's output. The 256-channel full-resolution tensor never
  exists: alive at once are the block input, conv1's output and the result (+ one band).
- the other full-resolution ResNets: conv1's output, then conv2 added in place into the input;
- the output norm + SiLU + conv_out band by band.
Band rows are a parameter (more rows: fewer, larger kernel calls; fewer rows: less memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GroupStats:
    """Per-(sample, group) mean and variance of a tensor fed band by band, merged exactly (float64)."""

    def __init__(self, norm, n: int, device):
        self.norm, self.groups = norm, norm.num_groups
        self.count = 0
        self.mean = torch.zeros(n, self.groups, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)

    def add(self, xb: torch.Tensor) -> None:
        n = xb.shape[0]
        var, mean = torch.var_mean(xb.reshape(n, self.groups, -1).float(), dim=2, correction=0)
        k = xb[0].numel() // self.groups
        total = self.count + k
        delta = mean.double() - self.mean
        self.mean += delta * (k / total)
        self.m2 += var.double() * k + delta * delta * (self.count * k / total)
        self.count = total

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) float32 (N, C, 1, 1): norm(x) = x * scale + shift."""
        rstd = torch.rsqrt(self.m2 / self.count + self.norm.eps)  # (N, G)
        c = self.norm.num_channels
        per = c // self.groups
        w = self.norm.weight.double().view(1, self.groups, per)
        b = self.norm.bias.double().view(1, self.groups, per)
        scale = w * rstd[:, :, None]
        shift = b - self.mean[:, :, None] * scale
        return (scale.reshape(-1, c, 1, 1).float(), shift.reshape(-1, c, 1, 1).float())


def _bands(h: int, band: int):
    """(r0, r1) of each band of `band` rows over h rows."""
    for r0 in range(0, h, band):
        yield r0, min(r0 + band, h)


def _with_halo(r0: int, r1: int, k: int, h: int) -> tuple[int, int, int, int]:
    """Rows [r0 - k, r1 + k) of an h-row image: (a, b, top, bottom) = the rows [a, b) that exist and
    the zero rows to pad above and below (a convolution's zero padding at the image's edges)."""
    a, b = max(r0 - k, 0), min(r1 + k, h)
    return a, b, k - (r0 - a), k - (b - r1)


def _stats_of(x: torch.Tensor, norm, band: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = GroupStats(norm, x.shape[0], x.device)
    for r0, r1 in _bands(x.shape[2], band):
        s.add(x[:, :, r0:r1])
    return s.affine()


def _norm_silu(xb, affine, dtype):
    scale, shift = affine
    return F.silu(torch.addcmul(shift, xb.float(), scale)).to(dtype)


def _pad_rows(t, top: int, bottom: int):
    return F.pad(t, (0, 0, top, bottom)) if top or bottom else t


def _conv_rows(conv, t):
    """A 3x3 (or 1x1) stride-1 convolution of rows that already carry their neighbours (padded with
    zero rows at the image's edges): padding along the width only."""
    return F.conv2d(t, conv.weight, conv.bias, 1, (0, conv.padding[1]), conv.dilation, conv.groups)


def _halo(conv) -> int:
    return conv.padding[0]


def norm_conv(x, norm, conv, band: int, out=None, add: bool = False):
    """conv(SiLU(norm(x))) band by band; into `out` (added when add=True), or a new tensor."""
    h = x.shape[2]
    affine = _stats_of(x, norm, band)
    k = _halo(conv)
    if out is None:
        out = torch.empty((x.shape[0], conv.out_channels, h, x.shape[3]), dtype=x.dtype, device=x.device)
    for r0, r1 in _bands(h, band):
        a, b, top, bottom = _with_halo(r0, r1, k, h)
        y = _conv_rows(conv, _pad_rows(_norm_silu(x[:, :, a:b], affine, x.dtype), top, bottom))
        if add:
            out[:, :, r0:r1] += y
        else:
            out[:, :, r0:r1] = y
    return out


def resnet(box: list, r, band: int):
    """ResNet block r on box.pop() (the caller keeps no reference: the input is freed, or becomes
    the output in place, as early as possible)."""
    x = box.pop()
    a = norm_conv(x, r.norm1, r.conv1, band)
    if r.conv_shortcut is not None:
        s = torch.empty((x.shape[0], r.conv_shortcut.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device)
        for r0, r1 in _bands(x.shape[2], band):
            s[:, :, r0:r1] = r.conv_shortcut(x[:, :, r0:r1])
    else:
        s = x  # the residual: conv2's output is added into it in place
    del x
    return norm_conv(a, r.norm2, r.conv2, band, out=s, add=True)


def upsample_resnet(box: list, up_conv, r, band: int):
    """r(up_conv(nearest 2x(box.pop()))) without the upsampler's full output (module docstring)."""
    src = box.pop()
    n, _, hs, ws = src.shape
    h = 2 * hs
    k = _halo(up_conv)

    def up_rows(src, a: int, b: int):
        """Rows [a, b) of up_conv(nearest 2x(src))."""
        ua, ub, top, bottom = _with_halo(a, b, k, h)  # rows of the upsampled image the convolution reads
        sa, sb = ua // 2, (ub - 1) // 2 + 1
        u = F.interpolate(src[:, :, sa:sb], scale_factor=2.0, mode="nearest")[:, :, ua - 2 * sa:ub - 2 * sa]
        return _conv_rows(up_conv, _pad_rows(u, top, bottom))

    stats = GroupStats(r.norm1, n, src.device)  # pass A: statistics only
    for r0, r1 in _bands(h, band):
        stats.add(up_rows(src, r0, r1))
    affine = stats.affine()
    k1 = _halo(r.conv1)
    mid = torch.empty((n, r.conv1.out_channels, h, 2 * ws), dtype=src.dtype, device=src.device)
    c_out = (r.conv2 if r.conv_shortcut is None else r.conv_shortcut).out_channels
    s = torch.empty((n, c_out, h, 2 * ws), dtype=src.dtype, device=src.device)
    for r0, r1 in _bands(h, band):  # pass B: conv1 and the shortcut
        a, b, top, bottom = _with_halo(r0, r1, k1, h)
        x = up_rows(src, a, b)
        mid[:, :, r0:r1] = _conv_rows(r.conv1, _pad_rows(_norm_silu(x, affine, src.dtype), top, bottom))
        core = x[:, :, r0 - a:r0 - a + (r1 - r0)]
        s[:, :, r0:r1] = core if r.conv_shortcut is None else r.conv_shortcut(core)
    del src, x
    return norm_conv(mid, r.norm2, r.conv2, band, out=s, add=True)  # pass C


def decode(vae, z, band: int):
    """VAE.forward(z) with its full-resolution end in row bands (an SD-style decoder: the last
    block has no upsampler and the one before it has; anything else runs the plain forward)."""
    from .standalone import _Sampler

    last = len(vae.up_resnets) - 1
    if last < 1 or isinstance(vae.upsamplers[last], _Sampler) or not isinstance(vae.upsamplers[last - 1], _Sampler):
        return vae.forward_plain(z)
    h = vae.conv_in(vae.post_quant_conv(z))
    h = vae.mid_resnets[1](vae.mid_attention(vae.mid_resnets[0](h)))
    for resnets, up in zip(vae.up_resnets[:last - 1], vae.upsamplers[:last - 1]):
        for r in resnets:
            h = r(h)
        if isinstance(up, _Sampler):
            h = up.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
    for r in vae.up_resnets[last - 1]:
        h = r(h)
    box = [h]
    del h
    first, *rest = vae.up_resnets[last]
    h = upsample_resnet(box, vae.upsamplers[last - 1].conv, first, band)
    for r in rest:
        box = [h]
        del h
        h = resnet(box, r, band)
    return norm_conv(h, vae.conv_norm_out, vae.conv_out, band)
