"""Convolution weights prepacked for oneDNN, the CPU path of the torch-cuda backend (--device cpu).

PyTorch's CPU convolution (oneDNN) takes its weights in PyTorch's layout and reorders them into the
blocked layout its kernels read on EVERY call. For SD's deep layers (1280 and 2560 channels at 4x4
to 16x16 latents) that reorder of up to 59 MB of weights costs more than the convolution itself:
measured on a 2-core AMD EPYC (torch 2.13, bfloat16, batch 2, channels-last), a [1280, 2560, 3, 3]
convolution at 4x4 took 26 ms, 4.9 ms with its weights reordered once beforehand; at 64x64 and
larger the two are equal (one-off timings; the whole-image A/B is bench_run's torch-bf16-unpacked). PackedConv2d does the reorder once, at its first call (oneDNN picks the
layout for that input's shape; the same packed weights serve every other size), and drops the
plain weights, so the weights are not held twice.

It uses the two oneDNN operators PyTorch's own CPU compiler path uses for the same purpose
(torch.ops.mkldnn._reorder_convolution_weight and _convolution_pointwise, inductor's freezing
passes). They are private: `unavailable()` probes them once against F.conv2d and the backend keeps
the plain convolutions, saying why, where they are missing or disagree.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = (torch.float32, torch.bfloat16)  # oneDNN's CPU convolutions for these; float16 not packed
MIN_CHANNELS = 8  # SD's conv_in (4 in) and conv_out (4 or 3 out) are not packed: tiny weights, nothing to gain


def _ops():
    mk = torch.ops.mkldnn
    return mk._reorder_convolution_weight, mk._convolution_pointwise


@functools.lru_cache(maxsize=None)
def unavailable(dtype: torch.dtype) -> str | None:
    """None where packed convolutions run in `dtype` on this CPU and match F.conv2d; else why not."""
    if dtype not in DTYPES:
        return f"{str(dtype).removeprefix('torch.')} is not packed (only float32 and bfloat16)"
    if not torch.backends.mkldnn.is_available():
        return "PyTorch was built without oneDNN (mkldnn)"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bfloat16 convolutions on this CPU"
    # what the UNet asks of it: stride 1 and 2 (downsamplers), a second call at another size and batch
    # after packing (later images, other resolutions), with and without the bias (fused epilogues)
    g = torch.Generator().manual_seed(0)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for stride in (1, 2):
        conv = nn.Conv2d(64, 48, 3, stride=stride, padding=1).to(dtype).to(memory_format=torch.channels_last)
        w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
        packed = PackedConv2d(conv)
        for n, h, wd, bias in ((2, 5, 7, True), (1, 9, 4, False)):
            x = torch.randn(n, 64, h, wd, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
            try:
                with torch.no_grad():
                    out = packed(x, bias=bias).float()
            except Exception as e:  # noqa: BLE001 (a private operator missing or refusing: keep the plain path)
                return f"oneDNN's packed convolution failed: {type(e).__name__}: {e}"
            ref = F.conv2d(x.float(), w.float(), b.float() if bias else None, stride, 1)
            if out.shape != ref.shape:
                return f"oneDNN's packed convolution disagrees with F.conv2d (shape {tuple(out.shape)})"
            err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
            if not err <= tol:
                return f"oneDNN's packed convolution disagrees with F.conv2d (relative error {err:.2e})"
    return None


class PackedConv2d(nn.Module):
    """An nn.Conv2d (zero padding) whose weights oneDNN reorders once, at the first call, instead of at
    every call. Inference only (no autograd through the packed weights). Keeps the attributes FastUNet
    reads (bias, in/out channels, kernel size, stride, padding, dilation, groups, padding_mode)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("PackedConv2d needs explicit zero padding")
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode"):
            setattr(self, name, getattr(conv, name))
        self.weight = conv.weight  # until the first call
        self.bias = conv.bias
        self.packed = None  # oneDNN's opaque tensor (not a parameter: .to() and state_dict leave it alone)

    def _pack(self, x: torch.Tensor) -> None:
        reorder, _ = _ops()
        w = self.weight.detach().to(x.dtype).contiguous(memory_format=torch.channels_last)
        self.packed = reorder(w, list(self.padding), list(self.stride), list(self.dilation), self.groups,
                              list(x.shape))
        self.weight = None  # the packed copy is the only one now

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or self.weight is not None
                                                                   and self.weight.requires_grad)):
            raise RuntimeError("PackedConv2d runs inference on the CPU only")
        if self.packed is None:
            self._pack(x)
        _, conv = _ops()
        b = self.bias if bias else None
        if b is not None:
            b = b.detach().to(x.dtype)
        return conv(x, self.packed, b, list(self.padding), list(self.stride), list(self.dilation), self.groups,
                    "none", [], "")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"packed={self.packed is not None}")


def packable(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size != (1, 1) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str) and min(m.in_channels, m.out_channels) >= MIN_CHANNELS
            and m.weight.device.type == "cpu" and m.weight.dtype in DTYPES)


def pack_convs_(module: nn.Module) -> int:
    """Replace, in place, every packable convolution of `module` (kernel > 1x1, >= MIN_CHANNELS in and
    out, float32/bfloat16 CPU weights) by a PackedConv2d; returns how many. 1x1 convolutions are left
    as they are (FastUNet reads their weights as matrices). Idempotent."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if packable(child):
                setattr(parent, name, PackedConv2d(child))
                count += 1
    return count
