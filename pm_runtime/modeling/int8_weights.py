"""int8 weight-only UNet for the torch-cuda backend (its `int8_weights` option).

Every nn.Linear and nn.Conv2d of the UNet except conv_in and conv_out (the first and last layers,
11.5k weights each at SD 1.5 widths) keeps its weight as per-output-channel symmetric int8 plus
one float32 scale per output channel (pm_kernels.quantize_int8); the layer dequantizes it to the
run dtype with one kernel (pm_kernels.dequant_int8) each time it runs, then calls the same
F.linear / F.conv2d: activations, biases, norms and everything else stay in the run dtype. The
UNet's resident weights about halve (SD 1.5: 1.72 GB fp16 -> ~0.86 GB); each layer's fp16 copy
lives only while that layer runs (in a CUDA graph: in the graph's pool, reused layer after layer).
The price is the dequantize pass (the int8 read once, the fp16 copy written and read back) and
the rounding: the drift against fp16 is measured, not assumed (benchmarks/bench_int8_weights.py,
gpu_ours' torch-cuda-int8 variants).

Self-attention Q, K and V are quantized as FastUNet's one fused (3 inner, C) matrix
(`pm_qkv_int8`); the attention module's separate to_q/to_k/to_v (FastUNet never calls them) are
dropped so that nothing is held twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SKIP = ("conv_in", "conv_out")  # UNet attribute names of the layers that stay in the run dtype


class _Int8Weight(nn.Module):
    """Base: int8 `qweight` (O, ...) and float32 `scale` (O,) buffers, `bias` in the run dtype."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self.compute_dtype = dtype
        self.out_features = q.shape[0]

    def dequantized(self) -> torch.Tensor:
        import pm_kernels

        return pm_kernels.dequant_int8(self.qweight, self.scale, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.qweight.shape)}, int8 -> {str(self.compute_dtype).replace('torch.', '')}"


class Int8Linear(_Int8Weight):
    def __init__(self, q, scale, bias, dtype):
        super().__init__(q, scale, bias, dtype)
        self.in_features = q.shape[1]

    def forward(self, x):
        return F.linear(x, self.dequantized(), self.bias)


class Int8Conv2d(_Int8Weight):
    def __init__(self, q, scale, bias, dtype, conv: nn.Conv2d):
        super().__init__(q, scale, bias, dtype)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x):
        return F.conv2d(x, self.dequantized(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def weight_of(layer) -> torch.Tensor:
    """The layer's weight in the run dtype (dequantized where the layer is int8)."""
    return layer.dequantized() if isinstance(layer, _Int8Weight) else layer.weight


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, _Int8Weight) for m in module.modules())


def _quantize(w: torch.Tensor, device: torch.device, home: torch.device):
    import pm_kernels

    w = w.detach().to(device)
    if w.ndim == 4:
        w = w.contiguous(memory_format=torch.channels_last)  # what FastUNet's NHWC convolutions read
    q, scale = pm_kernels.quantize_int8(w)
    return q.to(home), scale.to(home)


def quantize_unet_(fast_unet, device, home) -> dict:
    """Replace, in place, the linear and convolution layers of FastUNet `fast_unet`'s UNet by
    int8 ones (quantized on `device`, one layer at a time, kept at `home`), then move the rest of it
    to `home` too and recompute the biases its fused epilogues add (a 1x1 shortcut's share of an
    input shift is its int8 weight's image of it); the run dtype is the UNet's current one. Returns
    {"layers": n, "int8_bytes": ..., "replaced_bytes": ...}."""
    device, home = torch.device(device), torch.device(home)
    unet = fast_unet.unet
    dtype = unet.conv_in.weight.dtype
    stats = {"layers": 0, "int8_bytes": 0, "replaced_bytes": 0}

    def int8(weight, bias, make):
        """make(q, scale, bias) for `weight` quantized; counted in stats."""
        q, scale = _quantize(weight, device, home)
        stats["layers"] += 1
        stats["int8_bytes"] += q.numel() + 4 * scale.numel()
        stats["replaced_bytes"] += weight.numel() * weight.element_size()
        return make(q, scale, None if bias is None else bias.detach().to(home))

    for attn in fast_unet.self_attn:  # only the fused Q/K/V matrix exists afterwards
        if hasattr(attn, "pm_qkv_int8"):
            continue
        attn.pm_qkv_int8 = int8(attn.pm_qkv, attn.pm_qkv_bias, lambda q, s, b: Int8Linear(q, s, b, dtype))
        del attn.pm_qkv
        attn.pm_qkv_bias = None
        attn.to_q = attn.to_k = attn.to_v = None
    skip = {id(getattr(unet, name, None)) for name in SKIP}
    for parent in list(unet.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in skip or type(child).forward not in (nn.Linear.forward, nn.Conv2d.forward):
                continue  # (a subclass that computes something else is left as it is)
            if isinstance(child, nn.Conv2d) and child.padding_mode != "zeros":
                continue
            make = ((lambda q, s, b: Int8Linear(q, s, b, dtype)) if isinstance(child, nn.Linear)
                    else (lambda q, s, b, c=child: Int8Conv2d(q, s, b, dtype, c)))
            setattr(parent, name, int8(child.weight, child.bias, make))
    fast_unet.to(home)  # the rest (norms, conv_in / conv_out) joins the int8 layers
    fast_unet.register_biases()  # the fused epilogues' biases from the int8 weights now in use
    return stats


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module`, each storage counted once."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        s = t.untyped_storage()
        key = (s.data_ptr(), t.device) if not t.is_meta else id(t)
        if key not in seen:
            seen.add(key)
            total += s.nbytes() if not t.is_meta else t.numel() * t.element_size()
    return total
