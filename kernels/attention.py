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

import os

import torch
import torch.nn.functional as F

from . import tuning
from ._dispatch import deepest_that_loads, kernel_path, next_pow2, pdl_options, pdl_prologue

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
# The d 40 figure is of a kernel whose head dim was a runtime integer: 40 is not a multiple of 16,
# so Triton could not prove a head's row (80 bytes) aligned and compiled every q/k/v load and output
# store to 2 bytes, with no asynchronous copies (cp.async) into shared memory (its sm_90 PTX).
# The head dim is a constexpr now (one compile per head dim, as BLOCK_D already was): 16-byte
# accesses and cp.async at every head dim. Not measured on a GPU yet; this rule stands until the
# kernel benchmark (cross_attention_77 at d 40 against SDPA) says otherwise.
SDPA_MAX_HEAD_DIM = 64
# The head dim as two column tiles where that saves padding (head_dim_tiles: 40 -> 32 + 16 instead of
# 64, 80 -> 64 + 16, 160 -> 128 + 32): fewer multiply-adds, two smaller dots. Off until the GPU sweep
# (benchmarks/sweep_kernels.py) measures it; PM_ATTN_SPLIT_D=1 turns it on.
SPLIT_HEAD_DIM = os.environ.get("PM_ATTN_SPLIT_D", "0") == "1"


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
    def _attn(q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, NQ, NK, H, D: tl.constexpr, qk_scale, sq_b, sq_n, sk_b, sk_n,
              sv_b, sv_n, so_b, so_n, HAS_IDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, D_B: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr):
        pdl_prologue(PDL)
        # grid (Nq / BLOCK_M, B * H): a block of queries of one (batch, head) against all its keys.
        # The head dim as one tile of BLOCK_D columns (D padded to a power of 2: 40 -> 64), or, with
        # D_B > 0, as two: BLOCK_D real columns (a power of 2 <= D) and D_B more (the rest, padded):
        # 40 = 32 + 16, 80 = 64 + 16, 160 = 128 + 32: two dots each, 25-37% fewer multiply-adds.
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        kb = tl.load(idx_ptr + b) if HAS_IDX else b  # the K/V row: kv_index[b], or b itself
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < NQ
        ds = tl.arange(0, BLOCK_D)
        dmask = ds < D
        q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_n + h * D + ds[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        if F32_DOT:
            q = q.to(tl.float32)
        if D_B > 0:  # the second tile of head-dim columns
            db = BLOCK_D + tl.arange(0, D_B)
            dbmask = db < D
            q2 = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_n + h * D + db[None, :],
                         mask=rmask[:, None] & dbmask[None, :], other=0.0)  # (BLOCK_M, D_B)
            if F32_DOT:
                q2 = q2.to(tl.float32)
            acc2 = tl.zeros([BLOCK_M, D_B], tl.float32)
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
            if D_B > 0:
                kv_mask2 = kmask[:, None] & dbmask[None, :]
                k2 = tl.load(k_ptr + kb * sk_b + cols[:, None] * sk_n + h * D + db[None, :], mask=kv_mask2, other=0.0)
                v2 = tl.load(v_ptr + kb * sv_b + cols[:, None] * sv_n + h * D + db[None, :], mask=kv_mask2, other=0.0)
                if F32_DOT:
                    s += tl.dot(q2, tl.trans(k2.to(tl.float32)), input_precision="ieee")
                else:
                    s += tl.dot(q2, tl.trans(k2))
            s = tl.where(kmask[None, :], s * qk_scale, float("-inf"))  # qk_scale = scale * log2(e)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if F32_DOT:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            if D_B > 0:
                if F32_DOT:
                    acc2 = acc2 * alpha[:, None] + tl.dot(p, v2.to(tl.float32), input_precision="ieee")
                else:
                    acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2)
            m_i = m_new
        o = o_ptr + b * so_b + rows[:, None] * so_n + h * D
        tl.store(o + ds[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
        if D_B > 0:
            tl.store(o + db[None, :], (acc2 / l_i[:, None]).to(o_ptr.dtype.element_ty),
                     mask=rmask[:, None] & dbmask[None, :])


def head_dim_tiles(d: int, split: bool) -> tuple[int, int]:
    """(BLOCK_D, D_B): the head dim as one power-of-2 tile (D_B 0), or with split=True, where it
    saves columns, as a power-of-2 tile of real columns and a second of at least 16 (tl.dot's least)."""
    whole = max(16, next_pow2(d))
    first = 1 << (max(16, d).bit_length() - 1)  # the largest power of 2 <= d (16 at least)
    second = max(16, next_pow2(d - first)) if d > first else 0
    return (first, second) if split and second and first + second < whole else (whole, 0)


def default_config(d: int, nk: int) -> dict:
    """attention()'s launch configuration for head dim d and nk keys: launch()'s block_m, block_n and
    split_d keywords."""
    block_d, d_b = head_dim_tiles(d, SPLIT_HEAD_DIM)
    width = block_d + d_b
    return {"block_m": 128 if width <= 64 else 64 if width <= 128 else 32,
            "block_n": min(64, max(16, next_pow2(nk))),  # 77 keys: two blocks of 64 beat one of 128 (H200 sweep)
            "split_d": SPLIT_HEAD_DIM}


def _check(q, k, v, heads: int, kv_index) -> None:
    b, nq, inner = q.shape
    rows, nk = k.shape[:2]
    if kv_index is not None and tuple(kv_index.shape) != (b,):
        raise ValueError(f"attention: kv_index {tuple(kv_index.shape)} for q {tuple(q.shape)}: one row per query batch")
    if kv_index is None and rows != b or k.shape != (rows, nk, inner) or v.shape != k.shape or inner % heads \
            or nk < 1:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, {heads} heads")


def launch(q, k, v, heads: int, scale: float | None = None, kv_index=None, *, block_m: int, block_n: int,
           split_d: bool = False, num_warps: int | None = None, num_stages: int | None = None):
    """The Triton kernel with this configuration (what attention() launches with default_config and
    benchmarks/sweep_kernels.py with each of its candidates) -> (B, Nq, H*d). Raises Triton's
    OutOfResources where the GPU cannot load it (before anything runs)."""
    _check(q, k, v, heads, kv_index)
    b, nq, inner = q.shape
    d = inner // heads
    scale = d ** -0.5 if scale is None else float(scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, nq, inner), dtype=q.dtype, device=q.device)
    block_d, d_b = head_dim_tiles(d, split_d)
    # fp32 inputs: exact fp32 products (no TF32). bf16 under the interpreter (CPU tensors): its tl.dot
    # multiplies bf16 bit patterns as integers (triton-lang/triton#11584), so upcast there.
    f32_dot = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type == "cpu")
    idx = kv_index.contiguous() if kv_index is not None else out  # a dummy pointer when absent
    options = {k_: v_ for k_, v_ in (("num_warps", num_warps), ("num_stages", num_stages)) if v_ is not None}
    _attn[(triton.cdiv(nq, block_m), b * heads)](
        q, k, v, out, idx, nq, k.shape[1], heads, d, scale * 1.4426950408889634, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), HAS_IDX=kv_index is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, D_B=d_b, F32_DOT=f32_dot, **options, **pdl_options(q))
    return out


def attention(q, k, v, heads: int, scale: float | None = None, kv_index=None):
    """q (B, Nq, H*d), k, v (B, Nk, H*d), last axes contiguous (other strides free: slices of a
    fused QKV projection are fine) -> (B, Nq, H*d) contiguous. With kv_index (B,) int, k and v are
    tables (R, Nk, H*d) and query row b attends to table row kv_index[b] (read in place, no gather).
    Which implementation runs: pm_kernels.tuning's choice for this shape where one was made (SDPA,
    SDPA with cuDNN's or the memory-efficient attention first, the Triton kernel in one of
    tuning_configs), else the rule
    below (Triton for short key axes and head dims above SDPA_MAX_HEAD_DIM, SDPA elsewhere)."""
    _check(q, k, v, heads, kv_index)
    nk, d = k.shape[1], q.shape[2] // heads
    scale = d ** -0.5 if scale is None else float(scale)
    if kernel_path("attention", q) == "reference":
        return attention_sdpa(q, k, v, heads, scale, kv_index)  # PyTorch's own fused attention on views
    if ALWAYS_TRITON:
        return _triton_or_sdpa(q, k, v, heads, scale, kv_index, default_config(d, nk))
    candidates = _candidates(q, k, v, heads, scale, kv_index)
    key = (q.dtype, q.shape[0], q.shape[1], nk, heads, d, kv_index is not None)
    return candidates[tuning.choose("attention", key, candidates, q.device)]()


def _triton_or_sdpa(q, k, v, heads, scale, kv_index, config):
    """The Triton kernel with `config` at the deepest pipelining depth this GPU loads; SDPA where none does."""
    out = _triton(q, k, v, heads, scale, kv_index, config)
    # no depth fits this GPU: PyTorch's attention, as for the shapes routed there
    return out if out is not None else attention_sdpa(q, k, v, heads, scale, kv_index)


def _triton(q, k, v, heads, scale, kv_index, config):
    """The Triton kernel with `config` at the deepest of STAGES this GPU loads, or None where none does."""
    d = q.shape[2] // heads
    key = (q.device, q.dtype, d, *sorted(config.items()))
    return deepest_that_loads(_STAGES, key, STAGES,
                              lambda stages: launch(q, k, v, heads, scale, kv_index, **config, num_stages=stages))


def config_name(config: dict) -> str:
    """A Triton candidate's name in tuning choices: triton-m<BLOCK_M>-n<BLOCK_N>[-split][-w<warps>]."""
    return (f"triton-m{config['block_m']}-n{config['block_n']}" + ("-split" if config.get("split_d") else "")
            + (f"-w{config['num_warps']}" if config.get("num_warps") else ""))


def tuning_configs(d: int, nk: int) -> list:
    """The Triton launch configurations pm_kernels.tuning measures for head dim d and nk keys: the
    default's block sizes with the head dim as one tile and, where that saves columns, as two (each one
    more compile in a cold start; benchmarks/sweep_kernels.py measures more block sizes and warps)."""
    base = {**default_config(d, nk), "split_d": False}
    configs = [base]
    if head_dim_tiles(d, True) != head_dim_tiles(d, False):
        configs.append({**base, "split_d": True})
    return configs


def _candidates(q, k, v, heads, scale, kv_index) -> dict:
    """{name: call} for pm_kernels.tuning, the untuned rule's choice first."""
    nk, d = k.shape[1], q.shape[2] // heads
    sdpa = {"sdpa": lambda: attention_sdpa(q, k, v, heads, scale, kv_index)}
    default = default_config(d, nk)
    triton_default = {config_name(default): lambda: _triton_or_sdpa(q, k, v, heads, scale, kv_index, default)}
    out = {**sdpa, **triton_default} if nk > SHORT_KEYS or d <= SDPA_MAX_HEAD_DIM else {**triton_default, **sdpa}
    if not tuning.enabled():
        return out
    if q.is_cuda:  # SDPA with one of its backends first (where this PyTorch has it and it is enabled)
        for name in _sdpa_backends():
            out[f"sdpa-{name}"] = lambda name=name: _sdpa_first(name, q, k, v, heads, scale, kv_index)
    for config in tuning_configs(d, nk):
        name = config_name(config)
        if name not in out:
            out[name] = lambda config=config: _triton(q, k, v, heads, scale, kv_index, config)
    return out


def _sdpa_backends() -> list:
    """The SDPA backends tried first as tuning candidates ("cudnn": cuDNN's attention, "efficient":
    the memory-efficient kernel; "sdpa" itself is PyTorch's own order, flash first): those this
    PyTorch has and has enabled."""
    try:
        from torch.nn.attention import SDPBackend  # noqa: F401
    except ImportError:
        return []
    found = []
    if hasattr(SDPBackend, "CUDNN_ATTENTION") and torch.backends.cuda.cudnn_sdp_enabled():
        found.append("cudnn")
    if torch.backends.cuda.mem_efficient_sdp_enabled():
        found.append("efficient")
    return found


def _sdpa_first(name: str, q, k, v, heads, scale, kv_index):
    """SDPA with backend `name` (_sdpa_backends) first, then flash, memory-efficient, math: where it does
    not take the shape, what SDPA would pick anyway."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
                       if b != first]
    with sdpa_kernel(order, set_priority=True):
        return attention_sdpa(q, k, v, heads, scale, kv_index)


# Software-pipelining depths of _attn, tried in this order until the GPU's shared memory per block
# holds the kernel (Triton raises OutOfResources as it loads one that does not, before it runs; the
# first call of each configuration runs eagerly, before any CUDA graph capture); where none does,
# SDPA. 3 is Triton's default and what the H200 records measured; with it the head dim 160 blocks
# (BLOCK_D 256) need 148 KB of shared memory in fp16, more than consumer Ampere / Ada GPUs give a
# block (99 KB; 2 stages fit), and 96 KB at any depth on Turing (64 KB: SDPA there). Found without a
# GPU by benchmarks/compile_check.py, which compiles every kernel for those architectures.
STAGES = (3, 2, 1)
_STAGES: dict = {}  # (device, dtype, head dim, the launch configuration) -> (the depth that loaded,) or ()
