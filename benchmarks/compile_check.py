"""pm_kernels' Triton kernels compiled ahead of time for NVIDIA GPUs, on a machine without one.

The torch-cuda backend's networks run on the meta device at SD-1.5 shapes in the GPU's layout
(channels-last) with every pm_kernels call sent down its Triton path: the UNet call at 512 and
1024 px (guidance batched and sequential, epilogues fused and not, the low-memory feed-forward
chunks), the whole step (its two step kernels), each GroupNorm implementation, the int8 UNet
(the dequantize kernel at its weight shapes) and the standalone VAE decoder, whole and in row
bands. Each launch is compiled by Triton for the target architecture instead of run
(JITFunction.run(..., warmup=True): Triton's compiler and the ptxas it ships, down to a cubin),
and each distinct kernel is checked against that architecture's per-block limits the way Triton
checks them when it loads a kernel (CompiledKernel._init_handles): shared memory, and threads per
block against the registers each thread uses (read from the cubin with the cuobjdump Triton
ships). Local memory (register spills) is reported, not failed. So is each kernel's global memory
access width (its PTX's ld.global / st.global instructions by bytes per access: 16 is a vectorised
access of eight fp16 values, 2 one fp16 value): a memory-bound kernel compiled to 2-byte accesses
issues eight times the instructions for its bytes, which is how the GroupNorm, residual and
LayerNorm kernels compiled until their sizes were specialised (kernels/_dispatch.py, jit).

What this shows: every kernel the backend launches at those shapes compiles for that GPU with
this Triton and fits the GPU's limits. What it does not: that it computes the right values
(tests/test_kernels.py under the interpreter; the gpu-marked tests on a GPU) or how fast it runs
(benchmarks/bench_kernels.py on a GPU). The lent GPUs run another Triton version than this machine
may: run it under that version too (PYTHONPATH=<a folder with that triton> python ...).

  python benchmarks/compile_check.py [--arch 90,89,87,86,80,75] [--dtypes float16,bfloat16] [--quick]
                                     [--details] [--out F]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
if __package__:
    from .live_memory import cuda_conv_layout, fast_unet_call, sd15_fast_unet, sd15_networks, sd15_step_graph
    from .records import environment, save_records
else:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from live_memory import cuda_conv_layout, fast_unet_call, sd15_fast_unet, sd15_networks, sd15_step_graph
    from records import environment, save_records

SCHEMA = "pm-compile-check/1"
# Maximum shared memory per thread block (opt-in), bytes: CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability" (what cudaDevAttrMaxSharedMemoryPerBlockOptin reports,
# which Triton compares against). GPUs: 9.0 H100/H200, 8.9 RTX 40xx/L4/L40, 8.7 Jetson Orin,
# 8.6 RTX 30xx/A10, 8.0 A100, 7.5 RTX 20xx/T4, 7.0 V100, 6.1 GTX 10xx (not in the default list).
MAX_SHARED = {90: 227 * 1024, 89: 99 * 1024, 87: 163 * 1024, 86: 99 * 1024, 80: 163 * 1024, 75: 64 * 1024,
              70: 96 * 1024, 61: 48 * 1024}
REGS_PER_BLOCK = 65536  # 32-bit registers per block, every architecture above
REG_UNIT = 256  # registers are allocated per warp in units of 256
MAX_THREADS = 1024
DEFAULT_ARCHS = (90, 89, 87, 86, 80, 75)


def max_threads(regs_per_thread: int) -> int:
    """Threads a block may have when each uses `regs_per_thread` registers (whole warps)."""
    per_warp = -(-max(1, regs_per_thread) * 32 // REG_UNIT) * REG_UNIT
    return min(MAX_THREADS, REGS_PER_BLOCK // per_warp * 32)


def _tool(name: str) -> str:
    import triton

    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resource_usage(cubin: bytes) -> dict:
    """{"regs", "local", "shared_static"} of the one kernel in `cubin` (cuobjdump --dump-resource-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return {"regs": int(m.group(1)), "shared_static": int(m.group(2)), "local": int(m.group(3))}


_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)")


def global_accesses(ptx: str) -> dict:
    """{"loads": {bytes per access: count}, "stores": {...}} of the ld.global / st.global
    instructions in `ptx` (each instruction once, whatever its predicate or cache hints; bytes =
    vector length x element width, e.g. ld.global.v4.b32: 16)."""
    out: dict = {"loads": {}, "stores": {}}
    for m in _ACCESS.finditer(ptx):
        parts = m.group(2).split(".")[1:]
        vec = next((int(q[1:]) for q in parts if q in ("v2", "v4", "v8")), 1)
        bits = next((int(q[1:]) for q in reversed(parts) if re.fullmatch(r"[bfsu](8|16|32|64)", q)), None)
        if bits is None:
            continue
        d = out["loads" if m.group(1) == "ld" else "stores"]
        key = str(vec * bits // 8)
        d[key] = d.get(key, 0) + 1
    return {k: dict(sorted(v.items(), key=lambda kv: -int(kv[0]))) for k, v in out.items()}


def mma_kind(ptx: str) -> str | None:
    """The tensor-core instructions in `ptx`: "wgmma" (Hopper's warpgroup MMA), "mma" (mma.sync,
    Ampere-style), or None (no tl.dot compiled to tensor cores)."""
    return "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else None


class _TargetDriver:
    """Triton's active driver, answering as one GPU of architecture `arch` would (nothing is launched).
    Its device id is the architecture: Triton caches a kernel's binder (target included) per device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("meta")


def load_problems(arch: int, kernel) -> list[str]:
    """Why Triton would refuse to load `kernel` on a GPU of architecture `arch` (its checks in
    CompiledKernel._init_handles: shared memory per block; threads per block against the
    registers each thread uses); empty where it fits."""
    md, use = kernel.metadata, _usage(kernel)
    problems = []
    if md.shared > MAX_SHARED[arch]:
        problems.append(f"shared memory {md.shared} > {MAX_SHARED[arch]} bytes per block")
    if md.num_warps * 32 > max_threads(use["regs"]):
        problems.append(f"{md.num_warps * 32} threads but {use['regs']} registers each allow {max_threads(use['regs'])}")
    return problems


_USAGE: dict = {}  # kernel hash -> resource_usage


def _usage(kernel) -> dict:
    if kernel.hash not in _USAGE:
        _USAGE[kernel.hash] = resource_usage(kernel.asm["cubin"])
    return _USAGE[kernel.hash]


@contextlib.contextmanager
def compile_only(arch: int, seen: dict, pdl: bool = False):
    """Every pm_kernels call takes its Triton path on any tensor and each launch `kernel[grid](...)`
    is compiled for `arch` instead of run (outputs stay uninitialised: run on the meta device); a
    kernel Triton would refuse to load there raises OutOfResources as Triton's loader does (the
    dispatch may then pick a smaller configuration). Every compiled kernel lands in `seen`:
    (arch, kernel name, Triton's hash) -> (CompiledKernel, its load problems). pdl: the kernels as
    pm_kernels.set_pdl(True) launches them on a GPU of this architecture (programmatic dependent
    launch from compute capability 9.0; below it they launch as without)."""
    import importlib

    import triton
    from triton.runtime import jit
    from triton.runtime.driver import driver
    from triton.runtime.errors import OutOfResources

    import pm_kernels
    from pm_kernels import _dispatch

    modules = [importlib.import_module(f"pm_kernels.{m}") for m in
               ("attention", "dequant", "geglu", "group_norm", "layer_norm", "residual", "step_update")]
    saved_paths = {m: (m.kernel_path, m.pdl_options) for m in modules}
    options = _dispatch.pdl_keywords(pdl and divmod(arch, 10) >= _dispatch.PDL_MIN_CAPABILITY)
    saved_getitem = jit.JITFunction.__getitem__

    def getitem(self, grid):
        def launch(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            problems = load_problems(arch, kernel)
            seen[(arch, self.fn.__name__, kernel.hash)] = (kernel, problems)
            if problems:
                md = kernel.metadata
                raise OutOfResources(md.shared, MAX_SHARED[arch], "shared memory") if md.shared > MAX_SHARED[arch] \
                    else OutOfResources(md.num_warps * 32, max_threads(_usage(kernel)["regs"]), "threads")
            return kernel
        return launch

    attention = modules[0]
    saved_stages, attention._STAGES = attention._STAGES, {}  # per device, and every arch here is "meta"
    saved_driver = driver._active  # (reset_active() would look for a real GPU)
    driver.set_active(_TargetDriver(arch))
    jit.JITFunction.__getitem__ = getitem
    for m in modules:
        m.kernel_path = lambda *a, **k: "triton"
        m.pdl_options = lambda *a, **k: dict(options)
    try:
        assert pm_kernels.triton_available() and triton is not None
        yield
    finally:
        jit.JITFunction.__getitem__ = saved_getitem
        for m, (path, pdl_options) in saved_paths.items():
            m.kernel_path, m.pdl_options = path, pdl_options
        driver._active = saved_driver
        attention._STAGES = saved_stages


def edge_workloads(dtype_name: str):
    """(label, callable) pairs: each pm_kernels kernel called with sizes of 1 and odd sizes on the
    meta device. Triton turns an integer argument equal to 1 into a constant (its specialisation),
    and a kernel that uses such an argument as a tensor (`HW.to(tl.float32)`) then fails to compile:
    every kernel must compile with any of its sizes at 1."""
    import torch

    import pm_kernels

    dtype = getattr(torch, dtype_name)
    cl = torch.channels_last

    def t(*shape, fmt=None):
        x = torch.empty(*shape, device="meta", dtype=dtype)
        return x if fmt is None else x.contiguous(memory_format=fmt)

    def gn(shape, groups, fmt=None, impl="tiled", temb=False):
        def run():
            with pm_kernels.group_norm_impl_kept(impl):
                c = shape[1]
                pm_kernels.group_norm_silu(t(*shape, fmt=fmt), t(c), t(c), groups, 1e-5,
                                           temb=t(shape[0], c) if temb else None)
        return run

    for impl in ("tiled", "grouped"):
        yield f"GroupNorm {impl}, 1 x 1 pixels", gn((2, 64, 1, 1), 32, impl=impl)
        yield f"GroupNorm {impl}, one channel per group, channels-last", gn((2, 32, 8, 8), 32, cl, impl, temb=True)
        yield f"GroupNorm {impl}, one sample, one channel, 5 x 7", gn((1, 1, 5, 7), 1, impl=impl)
        yield f"GroupNorm {impl}, one odd-sized group of 3 x 129 x 129", gn((1, 3, 129, 129), 1, impl=impl)  # grouped: 2 launches
    yield "add + LayerNorm, one channel", lambda: pm_kernels.add_layer_norm(t(1, 1, 1), t(1, 1, 1), t(1), t(1), 1e-5)
    yield "add + LayerNorm, one row", lambda: pm_kernels.add_layer_norm(t(1, 1, 320), t(1, 1, 320), t(320), t(320), 1e-5)
    yield "bias + residual, one element", lambda: pm_kernels.add_bias_residual(t(1, 1, 1, 1), t(1, 1, 1, 1), t(1))
    yield "bias + residual, one channel, channels-last", lambda: pm_kernels.add_bias_residual(
        t(1, 1, 4, 4, fmt=cl), t(1, 1, 4, 4, fmt=cl), t(1))
    yield "attention, one head, one key", lambda: pm_kernels.attention(t(1, 5, 40), t(1, 1, 40), t(1, 1, 40), 1)
    yield "attention, one query", lambda: pm_kernels.attention(t(1, 1, 80), t(1, 77, 80), t(1, 77, 80), 1)
    yield "GEGLU, one feature", lambda: pm_kernels.geglu(t(1, 3, 2))
    yield "int8 dequantize, one weight", lambda: pm_kernels.dequant_int8(
        torch.empty(1, 1, device="meta", dtype=torch.int8), torch.empty(1, device="meta", dtype=torch.float32), dtype)

    def step_kernels():
        f32 = dict(device="meta", dtype=torch.float32)
        x = torch.empty(1, 1, 1, 1, **f32)
        step = torch.zeros((), device="meta", dtype=torch.int64)
        pm_kernels.scaled_copies(x, torch.empty(4, **f32), step, 2, dtype, cl)
        out = t(2, 1, 1, 1, fmt=cl)
        pm_kernels.guided_update(out[:1], out[1:], x, torch.empty_like(x), torch.empty_like(x),
                                 torch.empty(4, 10, **f32), step, torch.empty((), **f32), torch.empty((), **f32))
    yield "step kernels, one latent element", step_kernels


def workloads(dtype_name: str, quick: bool = False):
    """(label, callable) pairs: the backend's calls of pm_kernels at SD-1.5 shapes on the meta device
    (quick: the 512 px UNet call and step, and beside them the kernel benchmark's GroupNorm and
    attention variants and the UNet call with the GEGLU in its GEMM)."""
    import copy
    import importlib

    import torch

    import pm_kernels
    from pm_runtime.modeling.int8_weights import quantize_unet_

    dtype = getattr(torch, dtype_name)
    cl = torch.channels_last
    unet, _, vae = sd15_networks(dtype)
    unet.to(memory_format=cl)  # as the backend keeps it on CUDA
    fast = sd15_fast_unet(unet)
    fast.sample_format = lambda device: cl  # the layout it computes in on CUDA

    def unet_call(size, batch, fused=True, ff_chunk=None, net=fast, geglu_gemm=None):
        def run():
            net.fused_epilogues, net.ff_chunk, net.geglu_gemm = fused, ff_chunk, geglu_gemm
            try:
                fast_unet_call(net, size, batch, dtype)()
            finally:
                net.geglu_gemm = None  # (the default: the tuned projection)
        return run

    def step(size, sequential):
        def run():
            fast.fused_epilogues, fast.ff_chunk = True, None
            sd15_step_graph(fast, size, dtype, sequential=sequential)._step()
        return run

    def vae_decode(size, band_rows=None):
        def run():
            vae.to(memory_format=cl)
            vae.band_rows = band_rows
            vae(torch.empty(1, 4, size // 8, size // 8, device="meta", dtype=dtype).contiguous(memory_format=cl))
        return run

    def int8_unet():
        q = sd15_fast_unet(copy.deepcopy(unet))
        q.sample_format = fast.sample_format
        quantize_unet_(q, "meta", "meta")
        return unet_call(512, 2, net=q)()

    def with_gn(impl, fn):
        def run():
            with pm_kernels.group_norm_impl_kept(impl):
                fn()
        return run

    def grouped_norms():  # one (sample, group) per program: 10 ... 80 channels per group
        for c, px in ((320, 64), (640, 32), (960, 32), (1280, 16), (1920, 16), (2560, 8)):
            x = torch.empty(2, c, px, px, device="meta", dtype=dtype).contiguous(memory_format=cl)
            w = torch.empty(c, device="meta", dtype=dtype)
            with pm_kernels.group_norm_impl_kept("grouped"):
                pm_kernels.group_norm_silu(x, w, w, 32, 1e-5, temb=torch.empty(2, c, device="meta", dtype=dtype))

    def attention_head_dim_40():  # SDPA's in the UNet (attention.SDPA_MAX_HEAD_DIM); the Triton kernel here
        attention = importlib.import_module("pm_kernels.attention")
        q = torch.empty(2, 4096, 320, device="meta", dtype=dtype)
        old, attention.ALWAYS_TRITON = attention.ALWAYS_TRITON, True
        try:
            kv = torch.empty(2, 77, 320, device="meta", dtype=dtype)
            pm_kernels.attention(q, kv, kv, 8)
            pm_kernels.attention(q, q, q, 8)
        finally:
            attention.ALWAYS_TRITON = old

    def tuning_candidates():  # the Triton configurations pm_kernels.tuning times besides the defaults
        attention = importlib.import_module("pm_kernels.attention")
        for c, px in ((320, 64), (640, 32), (1280, 16), (1280, 8)):
            q = torch.empty(2, px * px, c, device="meta", dtype=dtype)
            kv = torch.empty(2, 77, c, device="meta", dtype=dtype)
            for keys, index in ((kv, torch.zeros(2, dtype=torch.int64, device="meta")), (q, None)):
                for config in attention.tuning_configs(c // 8, keys.shape[1]):
                    attention._triton(q, keys, keys, 8, (c // 8) ** -0.5, index, config)
        for m, c in ((8192, 320), (2048, 640), (512, 1280)):  # the feed-forward's GEGLU GEMM, 128-column tiles
            pm_kernels.geglu_linear(torch.empty(m, c, device="meta", dtype=dtype),
                                    torch.empty(8 * c, c, device="meta", dtype=dtype), None, block_n=128)

    yield "unet 512 px batch 2", unet_call(512, 2)
    yield "step 512 px, guidance batched", step(512, False)
    # what bench_kernels.py measures beside the UNet's choices: the grouped GroupNorm at each group
    # size of SD's layers, the Triton attention at head dim 40 (cross- and self-attention)
    yield "GroupNorm grouped at SD 1.5's group sizes", grouped_norms
    yield "attention in Triton at head dim 40", attention_head_dim_40
    yield "unet 512 px batch 2, GEGLU in its GEMM (geglu_gemm)", unet_call(512, 2, geglu_gemm=True)
    yield "the tuning's other Triton candidates at SD 1.5's shapes (attention tilings, GEGLU GEMM tiles)", \
        tuning_candidates
    if quick:
        return
    yield "unet 1024 px batch 1, GEGLU in its GEMM, ff chunks of 2048", unet_call(1024, 1, ff_chunk=2048,
                                                                                 geglu_gemm=True)
    yield "unet 512 px batch 2, epilogues unfused", unet_call(512, 2, fused=False)
    yield "unet 1024 px batch 2", unet_call(1024, 2)
    yield "step 512 px, guidance sequential (low memory)", step(512, True)
    yield "unet 1024 px batch 1, ff chunks of 2048 (low memory)", unet_call(1024, 1, ff_chunk=2048)
    for impl in ("grouped", "auto"):
        yield f"unet 512 px batch 2, GroupNorm {impl}", with_gn(impl, unet_call(512, 2))
        yield f"unet 1024 px batch 1, GroupNorm {impl}", with_gn(impl, unet_call(1024, 1))
    yield "unet 512 px batch 2, int8 weights", int8_unet
    yield "vae decode 512 px", vae_decode(512)
    yield "vae decode 512 px, 32-row bands", vae_decode(512, 32)
    yield "vae decode 1024 px", vae_decode(1024)


def constexprs(kernel) -> dict:
    """{argument name: value} of the compiled kernel's constexpr arguments (block sizes, flags)."""
    src, out = kernel.src, {}
    for k, v in getattr(src, "constants", {}).items():
        name = k if isinstance(k, str) else src.fn.arg_names[k[0]] if len(k) == 1 else ",".join(map(str, k))
        v = getattr(v, "value", v)
        if isinstance(v, (int, float, bool, str)):
            out[name] = v
    return out


def check(archs=DEFAULT_ARCHS, dtypes=("float16",), quick: bool = False, log=print, edge: bool = False,
          pdl: bool = False) -> list[dict]:
    """One record per (arch, dtype, distinct compiled kernel): launch options, resources, `fits`
    (Triton would load it there) with the reasons where not; and one record per workload that
    raised (`ok` False: a compile error, or a kernel that does not fit and that the dispatch had no
    smaller configuration for). A kernel that does not fit in a workload that still ran is one the
    dispatch replaced (a smaller configuration, or PyTorch's op): `ok` True."""
    import torch

    recs = []
    for arch in archs:
        if arch not in MAX_SHARED:
            raise SystemExit(f"--arch {arch}: limits known for {sorted(MAX_SHARED)}")
        for dtype_name in dtypes:
            seen: dict = {}
            where: dict = {}
            errors = []
            t0 = time.perf_counter()
            for label, fn in (edge_workloads(dtype_name) if edge else workloads(dtype_name, quick)):
                before = set(seen)
                try:
                    with compile_only(arch, seen, pdl), cuda_conv_layout(), torch.inference_mode():
                        fn()
                except Exception as e:  # the finding: record it, go on
                    errors.append({"workload": label, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
                    log(f"sm_{arch} {dtype_name} {label}: FAILED {type(e).__name__}: {str(e)[:300]}")
                for key in set(seen) - before:
                    where.setdefault(key, label)
            failed = {e["workload"] for e in errors}
            for key, (kernel, problems) in sorted(seen.items(), key=lambda kv: kv[0][1]):
                md, use = kernel.metadata, _usage(kernel)
                recs.append({"arch": f"sm_{arch}", "dtype": dtype_name, "kernel": key[1], "first_seen": where[key],
                             "constexprs": constexprs(kernel), "num_warps": md.num_warps, "num_stages": md.num_stages,
                             "shared_bytes": md.shared, "max_shared_bytes": MAX_SHARED[arch], **use,
                             "max_threads_for_regs": max_threads(use["regs"]),
                             "global_access_bytes": global_accesses(kernel.asm["ptx"]),
                             "mma": mma_kind(kernel.asm["ptx"]),
                             "pdl": "griddepcontrol.wait" in kernel.asm["ptx"], "fits": not problems,
                             "ok": not problems or where[key] not in failed, "problems": problems})
            for e in errors:
                recs.append({"arch": f"sm_{arch}", "dtype": dtype_name, "kernel": None, "first_seen": e["workload"],
                             "ok": False, "problems": [e["error"]]})
            mine = [r for r in recs if r["arch"] == f"sm_{arch}" and r["dtype"] == dtype_name]
            refused = sum(1 for r in mine if r["kernel"] and not r["fits"])
            spills = sum(1 for r in mine if r.get("local", 0) > 0)
            log(f"sm_{arch} {dtype_name}: {len(seen)} kernels compiled in {time.perf_counter() - t0:.1f} s; "
                f"{len(errors)} workloads failed; {refused} kernels over the limits (the dispatch took a smaller "
                f"configuration or PyTorch's op where their workload ran); {spills} with register spills")
    return recs


def summarize(recs: list[dict]) -> list[dict]:
    """One record per (arch, dtype) of check()'s: kernels compiled (distinct specialisations, per
    kernel), the workloads that failed, the configurations over the limits (which the dispatch
    replaced where their workload ran), the largest register and shared-memory use that loads."""
    out = []
    for key in dict.fromkeys((r["arch"], r["dtype"]) for r in recs):
        mine = [r for r in recs if (r["arch"], r["dtype"]) == key]
        kernels = [r for r in mine if r["kernel"]]
        fits = [r for r in kernels if r["fits"]]
        out.append({"record": "summary", "arch": key[0], "dtype": key[1], "kernels": len(kernels),
                    "by_kernel": dict(sorted(collections.Counter(r["kernel"] for r in kernels).items())),
                    "workloads_failed": [{"workload": r["first_seen"], "error": r["problems"][0]}
                                         for r in mine if not r["kernel"]],
                    "over_limits": [{k: r[k] for k in ("kernel", "constexprs", "num_warps", "num_stages",
                                                       "shared_bytes", "max_shared_bytes", "regs", "problems")}
                                    for r in kernels if not r["fits"]],
                    "max_regs": max((r["regs"] for r in fits), default=None),
                    "max_shared_bytes": max((r["shared_bytes"] for r in fits), default=None),
                    "with_spills": sum(1 for r in kernels if r["local"] > 0),
                    # kernels with 2-byte global stores (fp16 values written one by one): by design only
                    # the step's scatter between the latent's layouts
                    "two_byte_stores": sorted({r["kernel"] for r in kernels
                                               if r["global_access_bytes"]["stores"].get("2")}),
                    # kernels compiled with programmatic dependent launch's wait (--pdl, sm_90+)
                    "pdl_kernels": sum(1 for r in kernels if r.get("pdl")),
                    "ok": all(r["ok"] for r in mine)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                    help="compute capabilities as numbers: 90 (H100/H200), 89, 87 (Jetson Orin), 86, 80, 75")
    ap.add_argument("--dtypes", default="float16", help="run dtypes of the networks (float16, bfloat16, float32)")
    ap.add_argument("--quick", action="store_true",
                    help="the 512 px UNet call and step, the kernel benchmark's grouped GroupNorm and head-dim-40 "
                         "attention, the UNet call with the GEGLU in its GEMM")
    ap.add_argument("--edge-sizes", action="store_true",
                    help="instead of the SD workloads: every kernel at sizes of 1 and odd sizes (compiles at all?)")
    ap.add_argument("--pdl", action="store_true",
                    help="the kernels as pm_kernels.set_pdl(True) launches them (programmatic dependent launch, sm_90+)")
    ap.add_argument("--details", action="store_true",
                    help="also one record per compiled kernel (default: one summary per architecture and dtype)")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", type=pathlib.Path, default=None, help="append the records to this JSON-lines file")
    a = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check compiles for a GPU: unset TRITON_INTERPRET")
    import triton

    # the tree's state as the run starts (the kernels compiled are the ones read now)
    env = {**environment("cpu", a.commit), "triton_compiler": triton.__version__}  # the Triton that compiles
    recs = check(tuple(int(x) for x in a.arch.split(",")), tuple(a.dtypes.split(",")), a.quick, edge=a.edge_sizes,
                 pdl=a.pdl)
    for r in recs:
        if not r.get("fits", r["ok"]):
            what = "NOT OK" if not r["ok"] else "over the limits, replaced by the dispatch"
            print(f"{what} {r['arch']} {r['dtype']} {r['kernel']} ({r['first_seen']}): {'; '.join(r['problems'])}")
    command = "python benchmarks/compile_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = summarize(recs) + ([{"record": "kernel", **r} for r in recs] if a.details else [])
    save_records(a.out, [{"schema": SCHEMA, **env, "command": command, **r} for r in out])
    return 0 if all(r["ok"] for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
