"""pm_kernels: fused kernels for the GPU fast path (Triton), each with its PyTorch reference.

    group_norm_silu(x, weight, bias, num_groups, eps, *, temb=None, silu=True)   kernels/group_norm.py
    geglu(h)                                                                     kernels/geglu.py
    attention(q, k, v, heads, scale=None)                                        kernels/attention.py

Each runs its Triton kernel on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1, which
is how the tests run them on machines without a GPU) and its PyTorch reference (`*_reference`,
or PyTorch's SDPA for attention) where Triton cannot run. set_enabled(False) / PM_KERNELS=0
forces the references; kernel_path(tensor) says which path a call takes. Benchmarks:
benchmarks/bench_kernels.py (GB/s and TFLOP/s beside PyTorch's).
"""

from ._dispatch import enabled, kernel_path, set_enabled, triton_available
from .attention import attention, attention_reference, attention_sdpa
from .geglu import geglu, geglu_reference
from .group_norm import group_norm_silu, group_norm_silu_reference

__all__ = ["attention", "attention_reference", "attention_sdpa", "enabled", "geglu", "geglu_reference",
           "group_norm_silu", "group_norm_silu_reference", "kernel_path", "set_enabled", "triton_available"]
