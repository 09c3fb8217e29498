"""Attention read in place from the projections' layout: q (B, Nq, H*d), k and v (B, Nk, H*d)
-> (B, Nq, H*d), softmax(q k^T * scale) v per head, no transposes or copies around it.

The cross-attention of DESIGN §1 takes K from the key context and V from the value context:
here they are simply two tensors. Its key axis is short (77 tokens): one program holds a block
of queries of one (batch, head) and loops over two key blocks of 64 with an online softmax (the
same loop covers any Nk). Long key axes (self-attention, 4096 tokens at 512 px) go to PyTorch's
flash attention on (B, H, N, d) views, and so do head dims <= 64 (measured, below), unless
ALWAYS_TRITON is set (tests and benchmarks/bench_kernels.py use it to run the kernel everywhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import kernel_path, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SHORT_KEYS = 128  # Nk up to this: the Triton kernel; longer: SDPA (flash) on views
ALWAYS_TRITON = False
# Head dims up to this go to SDPA even with short key axes. Measured in CUDA graphs on an H200
# (bench_kernels.py graph timings + a sweep of BLOCK_M/BLOCK_N/warps), Nk 77, batch 2, 8 heads, fp16:
#   d 40, Nq 4096: best Triton config 19.8 us, SDPA 13.7 us  -> SDPA
#   d 80, Nq 1024: Triton 6.6 us, SDPA 8.4 us; d 160, Nq 256 / 64: 6.9 / 6.9 us vs 9.0 / 8.4 us -> Triton
SDPA_MAX_HEAD_DIM = 64


def _heads_view(t, heads: int):
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2) if t.stride(-1) == 1 else \
        t.contiguous().view(b, n, heads, inner // heads).transpose(1, 2)


def _gather(k, v, kv_index):
    return (k, v) if kv_index is None else (k.index_select(0, kv_index), v.index_select(0, kv_index))


def attention_reference(q, k, v, heads: int, scale: float | None = None, kv_index=None):
    k, v = _gather(k, v, kv_index)
    b, nq, inner = q.shape
    qh, kh, vh = (_heads_view(t.float(), heads) for t in (q, k, v))
    scale = (inner // heads) ** -0.5 if scale is None else scale
    p = torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1)
    return (p @ vh).transpose(1, 2).reshape(b, nq, inner).to(q.dtype)


def attention_sdpa(q, k, v, heads: int, scale: float | None = None, kv_index=None):
    k, v = _gather(k, v, kv_index)
    b, nq, inner = q.shape
    out = F.scaled_dot_product_attention(_heads_view(q, heads), _heads_view(k, heads), _heads_view(v, heads),
                                         scale=scale)
    return out.transpose(1, 2).reshape(b, nq, inner)


if triton is not None:
    @triton.jit
    def _attn(q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, NQ, NK, H, D, qk_scale, sq_b, sq_n, sk_b, sk_n, sv_b, sv_n,
              so_b, so_n, HAS_IDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, F32_DOT: tl.constexpr):
        # grid (Nq / BLOCK_M, B * H): a block of queries of one (batch, head) against all its keys
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        kb = tl.load(idx_ptr + b) if HAS_IDX else b  # the K/V row: kv_index[b], or b itself
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ds = tl.arange(0, BLOCK_D)  # head dim padded to a power of 2 (40 -> 64, 80 -> 128, 160 -> 256)
        dmask = ds < D
        q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_n + h * D + ds[None, :],
                    mask=(rows[:, None] < NQ) & dmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        if F32_DOT:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, NK, BLOCK_N):  # one iteration for cross-attention's 77 keys
            cols = n0 + tl.arange(0, BLOCK_N)
            kmask = cols < NK
            kv_mask = kmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + kb * sk_b + cols[:, None] * sk_n + h * D + ds[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kb * sv_b + cols[:, None] * sv_n + h * D + ds[None, :], mask=kv_mask, other=0.0)
            if F32_DOT:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(kmask[None, :], s * qk_scale, float("-inf"))  # qk_scale = scale * log2(e)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if F32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * so_b + rows[:, None] * so_n + h * D + ds[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(rows[:, None] < NQ) & dmask[None, :])


def attention(q, k, v, heads: int, scale: float | None = None, kv_index=None):
    """q (B, Nq, H*d), k, v (B, Nk, H*d), last axes contiguous (other strides free: slices of a
    fused QKV projection are fine) -> (B, Nq, H*d) contiguous. With kv_index (B,) int, k and v are
    tables (R, Nk, H*d) and query row b attends to table row kv_index[b] (read in place, no gather)."""
    b, nq, inner = q.shape
    rows, nk = k.shape[:2]
    if kv_index is not None and tuple(kv_index.shape) != (b,):
        raise ValueError(f"attention: kv_index {tuple(kv_index.shape)} for q {tuple(q.shape)}: one row per query batch")
    if kv_index is None and rows != b or k.shape != (rows, nk, inner) or v.shape != k.shape or inner % heads \
            or nk < 1:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, {heads} heads")
    d = inner // heads
    scale = d ** -0.5 if scale is None else float(scale)
    sdpa_wins = nk > SHORT_KEYS or d <= SDPA_MAX_HEAD_DIM
    if kernel_path("attention", q) == "reference" or (sdpa_wins and not ALWAYS_TRITON):
        return attention_sdpa(q, k, v, heads, scale, kv_index)  # PyTorch's own fused attention on views
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, nq, inner), dtype=q.dtype, device=q.device)
    block_d = max(16, next_pow2(d))
    block_n = min(64, max(16, next_pow2(nk)))  # 77 keys: two blocks of 64 beat one of 128 (H200 sweep)
    block_m = 128 if block_d <= 64 else 64 if block_d <= 128 else 32
    # fp32 inputs: exact fp32 products (no TF32). bf16 under the interpreter (CPU tensors): its tl.dot
    # multiplies bf16 bit patterns as integers (triton-lang/triton#11584), so upcast there.
    f32_dot = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type == "cpu")
    grid = (triton.cdiv(nq, block_m), b * heads)
    idx = kv_index.contiguous() if kv_index is not None else out  # a dummy pointer when absent
    args = (q, k, v, out, idx, nq, nk, heads, d, scale * 1.4426950408889634, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1))
    config = dict(HAS_IDX=kv_index is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, F32_DOT=f32_dot)
    key = (q.device, q.dtype, block_m, block_n, block_d, f32_dot)
    for stages in _STAGES.get(key, STAGES):
        try:
            _attn[grid](*args, **config, num_stages=stages)
        except OutOfResources:  # raised as Triton loads the kernel, before anything runs: one stage less
            continue
        _STAGES[key] = (stages,)
        return out
    _STAGES[key] = ()  # no depth fits this GPU: PyTorch's attention, as for the shapes routed there above
    return attention_sdpa(q, k, v, heads, scale, kv_index)


# Software-pipelining depths of _attn, tried in this order until the GPU's shared memory per block
# holds the kernel (Triton raises OutOfResources as it loads one that does not, before it runs; the
# first call of each configuration runs eagerly, before any CUDA graph capture); where none does,
# SDPA. 3 is Triton's default and what the H200 records measured; with it the head dim 160 blocks
# (BLOCK_D 256) need 148 KB of shared memory in fp16, more than consumer Ampere / Ada GPUs give a
# block (99 KB; 2 stages fit), and 96 KB at any depth on Turing (64 KB: SDPA there). Found without a
# GPU by benchmarks/compile_check.py, which compiles every kernel for those architectures.
STAGES = (3, 2, 1)
_STAGES: dict = {}  # (device, dtype, BLOCK_M, BLOCK_N, BLOCK_D, F32_DOT) -> (the depth that loaded,) or ()
try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # no Triton: the kernel never runs
    class OutOfResources(Exception):
        pass
