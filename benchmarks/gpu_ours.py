"""Our GPU backends for `pm-bench --gpu`: the torch-cuda fast path and its ablations, measured on a
bundle with torch weights (pm-export --target torch) of the same SD-1.5-shaped random model the
peers run. Not a test: nothing here asserts; every figure is a record.

Variants (each one a Pipeline on the same bundle; fp16, 512x512, batch 1 with guidance):
  torch-cuda                 FastUNet (fused kernels, channels-last, per-image cross-attention K/V
                             tables and time tables, fused epilogues) + one CUDA graph per step; the
                             text encoder's call as a CUDA graph too
  torch-cuda-pre-fusion      the same without the time tables, fused epilogues, step kernels and the
                             text encoder's graph (the default before them: their joint effect); -unfused-epilogues,
                             -no-time-tables, -no-step-kernels: each of the three off alone
  torch-cuda-no-te-graph     the same with the text encoder called eagerly (te_graph=False) instead of
                             as a CUDA graph
  torch-cuda-offload-te      the same with the text encoder's weights in pinned host memory, on the
                             GPU only for its call (offload_text_encoder: peak memory vs image time)
  torch-cuda-vae-graph       the same with the VAE decode captured as a CUDA graph in the step graph's
                             memory pool (vae_graph: the decode reuses the step's activation memory)
  torch-cuda-vae-nchw        the same with the VAE decoder in the NCHW layout (vae_channels_last=False:
                             what ran before channels-last became its default; decode time in
                             timings_last_image, image PSNR against torch-cuda's)
  torch-cuda-vae-bands       the same with the VAE decoder's full-resolution end in 32-row bands
                             (vae_bands: exact, less decode memory; PSNR against torch-cuda's image)
  torch-cuda-lean            offload-te + vae-graph together (the candidate for the 2.5 GB goal)
  torch-cuda-lean-bands      lean with the banded VAE decode (vae_bands=32) as well; -no-kv: and without
                             the K/V tables (0.12 GB; the text encoder's stage, with the step graph's pool
                             held, is where lean-bands' peak is expected)
  torch-cuda-shared-pool     the same with one memory pool for every CUDA graph and its warm-ups, the
                             VAE decode captured first, the K/V tables left to the decode (shared_pool:
                             the candidate for the 2.5 GB goal with every weight on the GPU; PSNR against
                             torch-cuda's image); -offload-te: with offload_text_encoder as well (its
                             weights then borrow the pool's memory for their stage);
                             -one-stream: with one_stream (every stage on the graphs' stream: one
                             cuBLAS workspace, not two; also torch-cuda-low-memory-1024-one-stream);
                             -phases: its per-stage memory (below)
  torch-cuda-gn-grouped      the same with pm_kernels' "grouped" GroupNorm (one or two kernel launches
                             per GroupNorm instead of three: gn_impl="grouped"); -gn-auto: grouped
                             where one launch covers a group, the default's elsewhere
  torch-cuda-generic-sizes   the same with pm_kernels' size-taking kernels (GroupNorm, residual,
                             add + LayerNorm, the step's two) compiled without size specialisation,
                             as before the rule in kernels/_dispatch.py: their 2-byte accesses
                             (pm_kernels.set_generic_sizes, around the whole variant)
  torch-cuda-untuned         the same with pm_kernels.tuning off (tune=False): every kernel call's untuned
                             default (the routing rules in pm_kernels), the A/B of the on-device choice
                             between implementations (torch-cuda's record lists its choices; PSNR
                             against torch-cuda's image)
  torch-cuda-geglu-gemm      the same with the feed-forward's GEGLU in its projection's GEMM
                             (geglu_gemm: pm_kernels.geglu_linear, a Triton GEMM, instead of cuBLAS + the
                             GEGLU kernel; PSNR against torch-cuda's image)
  torch-cuda-pdl             the same with pm_kernels' kernels launched with programmatic dependent
                             launch (pm_kernels.set_pdl: sm_90+; each kernel's launch overlaps the end of
                             the one before it; PSNR against torch-cuda's image)
  torch-cuda-hf-modules      the same with diffusers' / transformers' modules under FastUNet instead of
                             the standalone ones (hf_modules: the step went 6.80 -> 7.09 ms between
                             commits 8c3ff4a and 76e8a1a; this isolates one of the changes)
  torch-cuda-no-kv-tables    the same with K = to_k(C_k), V = to_v(C_v) computed inside every step
  torch-cuda-kv-tables       the same with a K/V table row per context, filled once per image (kv_step=False:
                             the default before; the default now keeps two rows and computes the step's
                             own row in the step, two GEMMs over all layers: ~0.24 GB less at 50 steps)
  torch-cuda-cudnn-attention the same with PyTorch's cuDNN attention preferred for self-attention
  torch-cuda-no-kernels      the plain diffusers UNet (split K/V, SDPA) in the same step graph
  torch-cuda-eager           FastUNet without the CUDA graph
  torch-cuda-low-memory      one network on the GPU at a time, tiled VAE decode (and, by default
                             there: no K/V tables, the guidance halves as two UNet calls, the
                             feed-forward in 2048-token chunks; -1024-no-ff-chunk: without those)
  torch-cuda-low-memory-1024-untiled  low-memory at 1024 px with the VAE decoded in one piece
                             (vae_tiling=False: exact, no seams; PSNR against the tiled image);
                             -1024-bands: the same in 32-row bands (vae_bands=32)
  torch-cuda-low-memory-batched  the same with the K/V tables and one UNet call on [uncond; cond]
                             (what low-memory did before: the two memory defaults' effect)
  torch-cuda-int8            torch-cuda with int8 UNet weights (int8_weights; PSNR also against the
                             fp16 torch-cuda image), and -low-memory-int8 / -low-memory-int8-1024
  torch-cuda-cudnn-heuristics  torch-cuda with cuDNN's heuristic algorithm choice instead of timing
                             them (cudnn_benchmark=False): step time, the first image's time and
                             peak (timing runs try algorithms with large workspaces); and
                             torch-cuda-low-memory-cudnn-heuristics (-1024: at 1024 px, where the
                             low-memory goal is missed by 0.03-0.13 GB)
  torch-cuda-phases, torch-cuda-low-memory-phases (-1024-phases: at 1024 px, the unmet goal's
                             setting)   one image after a first one, with the GPU
                             memory of each network's stage recorded apart (allocated before, peak
                             while loading, peak while running, allocated after; and after each stage
                             the allocator's segments by memory pool: the general pool and each graph's,
                             reserved / allocated / largest free block): where the peak is (with
                             shared_pool the decode's capture, made when the step graph is, shows
                             as a vae_decoder stage inside the unet one; maxima are merged)
  profile                    one step's kernels alone (torch.profiler, eager: a 4-step image less a
                             2-step one), by kernel and by class (convolution, GEMM, attention,
                             GroupNorm, ...); gpu_goals sets them beside the graphed step's p50
                             (profile-gn-auto: the same with gn_impl="auto")
Per variant: UNet step p20/p50/p80 (CUDA events around single graph replays: the whole step,
UNet + guidance + scheduler update), whole image p20/p50/p80 (text encoder + steps + VAE + to
uint8, wall clock), load time, peak memory of the whole pipeline (peak_*: load + first image with
its captures and warm-ups; steady_peak_*: the later images), and the PSNR of its image
against the reference image (the torch backend, fp32, same bundle, seed and steps).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

if __package__:  # pm_bench.gpu_ours
    from .records import cuda_peak as _peak
    from .records import cuda_reset as _reset
    from .records import pcts, psnr_db
else:  # imported by a script (python benchmarks/bench_gpu.py), benchmarks/ on sys.path
    from records import cuda_peak as _peak
    from records import cuda_reset as _reset
    from records import pcts, psnr_db

PROMPT = "a photo of <persona> as a knight on a horse"
DEVICE = "cuda"  # where the variants run (tests smoke-run them on "cpu", memory helpers stubbed)
BIG_SIZE = 1024  # the *-1024 variants' image size


def _restart_peak(torch) -> None:
    torch.cuda.reset_peak_memory_stats()


def _allocated_gib(torch) -> float:
    return round(torch.cuda.memory_allocated() / 2**30, 3)


def _db(value) -> str:
    """A PSNR field for the log: records.psnr_db's None is identical images."""
    return "identical" if value is None else f"{value} dB"


def replay_ms(torch, loop, reps: int) -> dict:
    """One graph replay = one whole denoising step; timed singly with CUDA events. Each replay
    advances the graph's step counter, which indexes tables of loop.max_steps rows (64 for a 50-step
    image) with no bounds check in the step kernels: the counter starts at 0 (the last image left it at
    its step count) and the replays stop before it reaches max_steps (on the CPU `timed` adds one
    untimed call)."""
    if __package__:  # pm_bench.gpu_ours
        from .bench_kernels import timed
    else:  # imported by a script (python benchmarks/bench_gpu.py)
        from bench_kernels import timed

    cuda = DEVICE != "cpu"
    reps = min(reps, loop.max_steps - (0 if cuda else 1))
    try:
        loop.refill()  # K/V tables in a shared pool: the decode has overwritten them since the last image
        loop.step.zero_()
        return {**timed(torch, loop.graph.replay if loop.graph is not None else loop._step, reps, cuda, warmup=0),
                "reps": reps}
    finally:
        loop.step.zero_()


def pool_map(torch, names: dict | None = None) -> dict:
    """The caching allocator's segments by memory pool, now: {pool: {reserved_mib, allocated_mib,
    segments, largest_free_mib}}; pool "general" (PyTorch's default pools) or a private pool (CUDA
    graphs, MemPools) named by `names` ({pool id: name}, TorchCudaBackend.graph_pools) where it
    knows it, else "pool A:B". Empty where torch.cuda has no memory_snapshot."""
    if not hasattr(torch.cuda, "memory_snapshot"):
        return {}
    mib = 2**20
    out: dict = {}
    for seg in torch.cuda.memory_snapshot():
        pid = tuple(seg.get("segment_pool_id") or (0, 0))
        key = "general" if pid == (0, 0) else (names or {}).get(pid, f"pool {pid[0]}:{pid[1]}")
        d = out.setdefault(key, {"reserved_mib": 0.0, "allocated_mib": 0.0, "segments": 0, "largest_free_mib": 0.0})
        d["reserved_mib"] += seg["total_size"] / mib
        d["allocated_mib"] += seg["allocated_size"] / mib
        d["segments"] += 1
        free = [b["size"] for b in seg.get("blocks", ()) if b.get("state") == "inactive"]
        d["largest_free_mib"] = max(d["largest_free_mib"], max(free, default=0) / mib)
    return {k: {f: round(v, 1) if isinstance(v, float) else v for f, v in d.items()} for k, d in out.items()}


def stage_memory(backend, torch) -> dict:
    """Record the GPU memory of every network stage of `backend` (its `network` context and `_load`)
    into the returned dict: {network: {before_alloc_gib, load_peak_alloc_gib, load_peak_reserved_gib,
    run_peak_alloc_gib, run_peak_reserved_gib, after_alloc_gib, after_reserved_gib}}, maxima over
    repeated entries. Resets the peak counters at every stage boundary."""
    import contextlib

    stages: dict = {}
    network, load = backend.network, backend._load

    def note(name, key, value_bytes):
        d = stages.setdefault(name, {})
        d[key] = max(d.get(key, 0.0), round(value_bytes / 2**30, 3))

    def peaks(name, what):
        torch.cuda.synchronize()
        note(name, f"{what}_peak_alloc_gib", torch.cuda.max_memory_allocated())
        note(name, f"{what}_peak_reserved_gib", torch.cuda.max_memory_reserved())
        torch.cuda.reset_peak_memory_stats()

    def loading(name):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = load(name)
        peaks(name, "load")
        return out

    @contextlib.contextmanager
    def stage(name):
        torch.cuda.synchronize()
        note(name, "before_alloc_gib", torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        with network(name) as net:
            yield net
            peaks(name, "run")
        torch.cuda.synchronize()
        note(name, "after_alloc_gib", torch.cuda.memory_allocated())
        note(name, "after_reserved_gib", torch.cuda.memory_reserved())
        pools = pool_map(torch, backend.graph_pools() if hasattr(backend, "graph_pools") else None)
        if pools:
            stages[name]["pools_after"] = pools

    backend.network, backend._load = stage, loading
    return stages


def measure_phases(name: str, bundle: Path, *, steps: int, size: int, **options) -> dict:
    """Per-stage GPU memory of the first image (loads, captures) and of the next one."""
    import torch

    from pm_runtime.pipeline import Pipeline

    _reset(torch)
    pipe = Pipeline.load(bundle, backend="torch-cuda", device=DEVICE, **options)
    after_load = _allocated_gib(torch)
    rec = {"variant": name, "status": "ok", "backend": pipe.backend.describe(), "size": size, "steps": steps,
           "after_pipeline_load_alloc_gib": after_load}
    for which in ("first_image", "second_image"):
        stages = stage_memory(pipe.backend, torch)
        pipe.generate(PROMPT, seed=233, steps=steps, height=size, width=size)
        rec[which] = stages
        del pipe.backend.network, pipe.backend._load  # back to the class's methods
    pipe.close()
    del pipe
    _reset(torch)
    return rec


def measure_variant(name: str, bundle: Path, *, steps: int, reps: int, images: int, size: int, reference=None,
                    keep: dict | None = None, compare: dict | None = None, **options) -> dict:
    """keep: a dict that receives this variant's last image under its name; compare: {name: image}
    -> psnr_vs_<name>_db in the record."""
    import torch

    from pm_runtime.pipeline import Pipeline

    import pm_kernels

    _reset(torch)
    before = _allocated_gib(torch)  # what earlier work in this process still holds (counted in the peaks)
    tuning_before = (*pm_kernels.tuning.spent(), pm_kernels.tuning.cut_short())
    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle, backend="torch-cuda", device=DEVICE, **options)
    load_s = time.perf_counter() - t0
    kw = dict(seed=233, steps=steps, height=size, width=size)
    t0 = time.perf_counter()
    first = pipe.generate(PROMPT, **kw)  # captures the step graph, compiles/loads kernels
    first_image_s = time.perf_counter() - t0
    first_peak = _peak(torch)  # load + first image (captures, warm-ups)
    _restart_peak(torch)  # from here: the steady state of later images
    walls, g = [], first
    for _ in range(images):
        t0 = time.perf_counter()
        g = pipe.generate(PROMPT, **kw)
        walls.append((time.perf_counter() - t0) * 1000)
    rec = {"variant": name, "status": "ok", "backend": g.backend, "size": size, "steps": steps,
           "before_load_alloc_gib": before, "load_s": round(load_s, 3), "first_image_s": round(first_image_s, 3),
           **({"image_ms": pcts(walls)} if walls else {}),
           "timings_last_image": {k: round(v, 4) for k, v in g.timings.items()}, **first_peak,
           **({f"steady_{k}": v for k, v in _peak(torch).items()} if walls else {})}
    loops = list(getattr(pipe.backend, "_loops", {}).values())
    if loops and not options.get("low_memory"):
        rec["unet_step_ms"] = replay_ms(torch, loops[0], reps)
    if reference is not None:
        rec["psnr_vs_reference_db"] = psnr_db(g.images, reference)  # None: identical
    for other, image in (compare or {}).items():
        rec[f"psnr_vs_{other}_db"] = psnr_db(g.images, image)
    if keep is not None:
        keep[name] = g.images
    rec["deterministic"] = bool(np.array_equal(first.images, g.images))
    rec.update(_tuning_fields(pipe.backend, tuning_before))
    pipe.close()
    del pipe
    _reset(torch)
    return rec


def _tuning_fields(backend, spent_before) -> dict:
    """A torch-cuda record's kernel tuning: on or off; the seconds this variant spent measuring
    candidates (its first image's; 0 where the choices came from this process or the cache file) and
    for how many calls, and how many it left at their default because the session's budget ran out
    (tuning_cut: measured by the next run, so a later variant's choices differ); the choices it ran with ({op|dtype|sizes: the chosen candidate and every
    candidate's microseconds per call, a CUDA graph's})."""
    import pm_kernels

    T = pm_kernels.tuning
    if not getattr(backend, "tune", False):
        return {"kernel_tuning": "off"}
    seconds, calls = T.spent()
    return {"kernel_tuning": "on", "tuning_s": round(seconds - spent_before[0], 3), "tuned_calls": calls - spent_before[1],
            "tuning_cut": T.cut_short() - spent_before[2],
            "kernel_choices": {k: {n: e[n] for n in ("choice", "default", "us") if n in e}
                               for k, e in T.choices(DEVICE).items()}}


def reference_image(bundle: Path, model: Path, *, steps: int, size: int, dtype: str = "float32"):
    """(image, record): the reference backend (torch, the original modules, on the GPU); fp32 is the
    PSNR reference, fp16 shows what fp16 alone costs on these random weights."""
    import torch

    from pm_runtime.pipeline import Pipeline

    _reset(torch)
    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle, backend="torch", device="cuda", model=model, dtype=dtype)
    g = pipe.generate(PROMPT, seed=233, steps=steps, height=size, width=size)
    rec = {"variant": f"torch-reference-{'fp32' if dtype == 'float32' else 'fp16'}", "status": "ok", "backend": g.backend, "size": size, "steps": steps,
           "image_s": round(time.perf_counter() - t0, 3),
           "non_finite_check": "passed (the pipeline checks the text encoder, loop and VAE outputs)", **_peak(torch)}
    pipe.close()
    del pipe
    _reset(torch)
    return g.images, rec


def warm_start_s(bundle: Path, steps: int, size: int) -> dict:
    """Bundle load to first image in a NEW process with the kernel caches now warm (Triton's on-disk
    cache; cuDNN re-benchmarks). Includes the interpreter and library imports."""
    code = ("import time; t0 = time.perf_counter()\n"
            "from pm_runtime.pipeline import Pipeline\n"
            f"p = Pipeline.load({str(bundle)!r}, backend='torch-cuda', device='cuda')\n"
            f"g = p.generate({PROMPT!r}, seed=233, steps={steps}, height={size}, width={size})\n"
            "print('WALL', time.perf_counter() - t0)\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    wall = time.perf_counter() - t0
    inner = [float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("WALL")]
    return {"variant": "torch-cuda-warm-start", "status": "ok" if r.returncode == 0 else "error",
            "process_wall_s": round(wall, 3), "import_load_first_image_s": round(inner[0], 3) if inner else None,
            "steps": steps, "size": size, "error": r.stderr[-500:] if r.returncode else None}


# What each kernel of a profile is, by its name (first match wins; cuDNN's convolution kernels carry
# "fprop"/"implicit_gemm"/"conv" in their names, so they are matched before the GEMMs)
KERNEL_CLASSES = (
    ("GroupNorm (Triton)", r"^_gn_"),
    ("cross-attention (Triton)", r"^_attn"),
    ("GEGLU (Triton)", r"^_geglu"),
    ("fused epilogues (Triton)", r"^_add_(layer_norm|bias_residual)"),
    ("step update (Triton)", r"^_(scaled_copies|guided_update)"),
    ("int8 dequantize (Triton)", r"^_dequant"),
    ("self-attention (SDPA)", r"flash|fmha|attention|mha_|sdpa|cudnn_generated_fort_native_sdpa"),
    ("convolution (cuDNN)", r"fprop|dgrad|wgrad|conv|implicit|winograd|cudnn|nchwToNhwc|nhwcToNchw"),
    ("GEMM (cuBLAS)", r"gemm|nvjet|cutlass|cublas|xmma|splitK|Kernel2"),
    ("LayerNorm (PyTorch)", r"layer_norm"),
    ("cat / copies (PyTorch)", r"CatArray|cat_|copy|Copy"),
    ("upsample (PyTorch)", r"upsample"),
    ("elementwise / reduce (PyTorch)", r"elementwise|vectorized|unrolled|reduce|index"),
)


def kernel_class(name: str) -> str:
    import re

    for cls, pattern in KERNEL_CLASSES:
        if re.search(pattern, name):
            return cls
    return "other"


def per_step(short: dict, long: dict, extra_steps: int) -> dict:
    """Per-step kernel time and launches from two profiles of the same image with `extra_steps` more
    steps in `long`: {name: (ms, launches)} each; what the text encoder and the decode launch cancels.
    Returns {"ms_by_class", "launches", "ms", "top": [(ms, launches, name)]} per step."""
    names = set(short) | set(long)
    rows = []
    for n in names:
        ms = (long.get(n, (0.0, 0))[0] - short.get(n, (0.0, 0))[0]) / extra_steps
        calls = (long.get(n, (0.0, 0))[1] - short.get(n, (0, 0))[1]) / extra_steps
        if calls > 0 or ms > 0:
            rows.append((ms, calls, n))
    rows.sort(reverse=True)
    by_class: dict = {}
    for ms, _, n in rows:
        cls = kernel_class(n)
        by_class[cls] = by_class.get(cls, 0.0) + ms
    return {"ms": sum(r[0] for r in rows), "launches": sum(r[1] for r in rows),
            "ms_by_class": dict(sorted(by_class.items(), key=lambda kv: -kv[1])), "top": rows}


def profile_step(bundle: Path, size: int, log=print, gn_impl: str | None = None) -> dict:
    """Where the step's GPU time goes: torch.profiler over an eager image of 2 steps and one of 4
    (the same prompt and seed), kernels grouped by name; their difference / 2 is one step's kernels
    alone (the text encoder and the VAE decode cancel), grouped into classes (KERNEL_CLASSES). The
    graphed step replays the same kernels: its p50 less this kernel time is what the launches and
    the gaps between kernels cost. The whole 2-step image's top kernels are kept too."""
    from torch.profiler import ProfilerActivity, profile

    from pm_runtime.pipeline import Pipeline

    options = {} if gn_impl is None else {"gn_impl": gn_impl}
    pipe = Pipeline.load(bundle, backend="torch-cuda", device="cuda", cuda_graph=False, **options)
    pipe.generate(PROMPT, seed=233, steps=2, height=size, width=size)  # warm-up: compiles, cuDNN's choices

    def kernels(steps: int) -> dict:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            pipe.generate(PROMPT, seed=233, steps=steps, height=size, width=size)
        out = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t > 0:
                out[e.key] = (t / 1000, e.count)
        return out

    two, four = kernels(2), kernels(4)
    pipe.close()
    step = per_step(two, four, 2)
    total = sum(t for t, _ in two.values())
    log(f"    one step's kernels: {step['ms']:.3f} ms GPU time, {step['launches']:.0f} launches")
    for cls, ms in step["ms_by_class"].items():
        log(f"    {ms:8.3f} ms {100 * ms / max(step['ms'], 1e-9):5.1f}%  {cls}")
    for ms, calls, name in step["top"][:15]:
        log(f"      {ms:8.3f} ms x{calls:<4.0f} {name[:90]}")
    name = "profile-eager-2-steps" + (f"-gn-{gn_impl}" if gn_impl else "")
    top_image = sorted(((t, c, k) for k, (t, c) in two.items()), reverse=True)
    return {"variant": name, "status": "ok", "gpu_ms_total": round(total, 3),
            "kernel_launches": sum(c for _, c in two.values()),
            "top": [{"ms": round(t, 3), "calls": c, "kernel": k[:120]} for t, c, k in top_image[:40]],
            "step_gpu_ms": round(step["ms"], 4), "step_launches": round(step["launches"], 1),
            "step_ms_by_class": {k: round(v, 4) for k, v in step["ms_by_class"].items()},
            "step_top": [{"ms": round(t, 4), "calls": round(c, 1), "kernel": k[:120], "class": kernel_class(k)}
                         for t, c, k in step["top"][:40]]}


ALL = ("reference", "torch-cuda", "torch-cuda-pre-fusion", "torch-cuda-unfused-epilogues", "torch-cuda-no-time-tables",
       "torch-cuda-no-step-kernels", "torch-cuda-no-te-graph",
       "torch-cuda-offload-te", "torch-cuda-vae-graph", "torch-cuda-vae-nchw", "torch-cuda-vae-bands",
       "torch-cuda-lean", "torch-cuda-lean-bands", "torch-cuda-lean-bands-no-kv",
       "torch-cuda-gn-grouped", "torch-cuda-gn-auto", "torch-cuda-generic-sizes", "torch-cuda-untuned", "torch-cuda-geglu-gemm",
       "torch-cuda-pdl",
       "torch-cuda-hf-modules",
       "torch-cuda-no-kv-tables", "torch-cuda-kv-tables",
       "torch-cuda-cudnn-attention", "torch-cuda-no-kernels", "torch-cuda-eager", "torch-cuda-low-memory",
       "torch-cuda-low-memory-1024", "torch-cuda-low-memory-1024-no-ff-chunk", "torch-cuda-low-memory-1024-untiled",
       "torch-cuda-low-memory-1024-bands",
       "torch-cuda-low-memory-batched",
       "torch-cuda-int8",
       "torch-cuda-low-memory-int8",
       "torch-cuda-low-memory-int8-1024", "torch-cuda-cudnn-heuristics", "torch-cuda-low-memory-cudnn-heuristics",
       "torch-cuda-low-memory-1024-cudnn-heuristics",
       "torch-cuda-shared-pool", "torch-cuda-shared-pool-one-stream", "torch-cuda-low-memory-1024-one-stream",
       "torch-cuda-shared-pool-offload-te",
       "torch-cuda-phases", "torch-cuda-low-memory-phases", "torch-cuda-low-memory-1024-phases",
       "torch-cuda-shared-pool-phases",
       "torch-cuda-warm-start", "profile", "profile-gn-auto")


def _switched_on(kept: str, field: str, fn):
    """fn() with one of pm_kernels' A/B switches on (kept: the name of its context manager,
    generic_sizes_kept: size-taking kernels unspecialised, their 2-byte accesses; pdl_kept:
    programmatic dependent launch, sm_90+), the setting before it again afterwards (the backend
    captures its graphs inside fn, so they keep those kernels). The switch was set in this process,
    not by its environment variable: the record says so itself, field = "1"."""
    import pm_kernels

    with getattr(pm_kernels, kept)(True):
        rec = fn()
    return {**rec, field: "1"}


def _gn_restored(fn):
    """fn(); then the GroupNorm implementation in force before it again (a variant's gn_impl is
    process-wide: the variants after it must not inherit it)."""
    import pm_kernels

    with pm_kernels.group_norm_impl_kept():
        return fn()


def run_ours(bundle: Path, model: Path | None, *, steps: int = 50, reps: int = 30, images: int = 3,
             size: int = 512, log=print, variants=ALL, on_record=None) -> list[dict]:
    """The chosen variants; a failing one is recorded as an error and the rest go on. on_record(rec)
    is called as each variant finishes (bench_gpu writes it then: a run cut short keeps what ran)."""
    out = []

    def guarded(name, fn):
        t0 = time.perf_counter()
        try:
            rec = fn()
        except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
            rec = {"variant": name, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
        rec.setdefault("wall_s", round(time.perf_counter() - t0, 2))
        log(f"  {rec.get('variant', name)}: {rec.get('status')} "
            + (f"step p50 {rec['unet_step_ms']['p50']:.2f} ms" if "unet_step_ms" in rec else "")
            + (f" image p50 {rec['image_ms']['p50']:.0f} ms" if "image_ms" in rec else "")
            + (f" peak {rec['peak_reserved_gib']:.2f} GiB" if "peak_reserved_gib" in rec else "")
            + (f" PSNR {_db(rec['psnr_vs_reference_db'])}" if "psnr_vs_reference_db" in rec else "")
            + (f" {rec.get('error')}" if rec.get("status") == "error" else ""))
        out.append(rec)
        if on_record is not None:
            on_record(rec)
        return rec

    ref = None
    if model is not None and "reference" in variants:
        holder = {}

        def do_ref():
            holder["img"], rec = reference_image(bundle, model, steps=steps, size=size)
            return rec
        guarded("torch-reference-fp32", do_ref)
        ref = holder.get("img")

        def do_ref16():
            img, rec = reference_image(bundle, model, steps=steps, size=size, dtype="float16")
            if ref is not None:
                rec["psnr_vs_reference_db"] = psnr_db(img, ref)
            return rec
        guarded("torch-reference-fp16", do_ref16)
    kept: dict = {}  # variant -> its image: what other variants' drift is measured against

    def only(name: str) -> dict:  # {name: image} once that variant has run (compare=...)
        return {name: kept[name]} if name in kept else {}

    common = dict(steps=steps, reps=reps, images=images, size=size, reference=ref)
    one = {**common, "images": 1}
    big = {**common, "images": 0, "size": BIG_SIZE, "reference": None}
    todo = {
        "torch-cuda": lambda: measure_variant("torch-cuda", bundle, keep=kept, **common),
        "torch-cuda-pre-fusion": lambda: measure_variant("torch-cuda-pre-fusion", bundle, fused_epilogues=False,
                                                         time_tables=False, step_kernels=False, te_graph=False,
                                                         compare=only("torch-cuda"), **common),
        "torch-cuda-unfused-epilogues": lambda: measure_variant("torch-cuda-unfused-epilogues", bundle,
                                                                fused_epilogues=False, compare=only("torch-cuda"),
                                                                **one),
        "torch-cuda-no-time-tables": lambda: measure_variant("torch-cuda-no-time-tables", bundle, time_tables=False,
                                                             compare=only("torch-cuda"), **one),
        "torch-cuda-no-step-kernels": lambda: measure_variant("torch-cuda-no-step-kernels", bundle,
                                                              step_kernels=False, compare=only("torch-cuda"), **one),
        "torch-cuda-no-te-graph": lambda: measure_variant("torch-cuda-no-te-graph", bundle, te_graph=False,
                                                          compare=only("torch-cuda"), **common),
        "torch-cuda-offload-te": lambda: measure_variant("torch-cuda-offload-te", bundle, offload_text_encoder=True,
                                                         **common),
        "torch-cuda-vae-graph": lambda: measure_variant("torch-cuda-vae-graph", bundle, vae_graph=True, **common),
        "torch-cuda-vae-nchw": lambda: measure_variant("torch-cuda-vae-nchw", bundle, vae_channels_last=False,
                                                       compare=only("torch-cuda"), **common),
        "torch-cuda-vae-bands": lambda: measure_variant("torch-cuda-vae-bands", bundle, vae_bands=32,
                                                        compare=only("torch-cuda"), **common),
        "torch-cuda-lean": lambda: measure_variant("torch-cuda-lean", bundle, vae_graph=True,
                                                   offload_text_encoder=True, **common),
        "torch-cuda-lean-bands": lambda: measure_variant("torch-cuda-lean-bands", bundle, vae_graph=True,
                                                         offload_text_encoder=True, vae_bands=32,
                                                         compare=only("torch-cuda"), **common),
        "torch-cuda-lean-bands-no-kv": lambda: measure_variant("torch-cuda-lean-bands-no-kv", bundle, vae_graph=True,
                                                               offload_text_encoder=True, vae_bands=32, kv_tables=False,
                                                               compare=only("torch-cuda"), **common),
        "torch-cuda-gn-grouped": lambda: _gn_restored(lambda: measure_variant(
            "torch-cuda-gn-grouped", bundle, gn_impl="grouped", compare=only("torch-cuda"), **common)),
        "torch-cuda-gn-auto": lambda: _gn_restored(lambda: measure_variant(
            "torch-cuda-gn-auto", bundle, gn_impl="auto", compare=only("torch-cuda"), **common)),
        "torch-cuda-generic-sizes": lambda: _switched_on("generic_sizes_kept", "kernels_generic_sizes", lambda: (
            measure_variant("torch-cuda-generic-sizes", bundle, compare=only("torch-cuda"), **common))),
        "torch-cuda-untuned": lambda: measure_variant("torch-cuda-untuned", bundle, tune=False,
                                                      compare=only("torch-cuda"), **common),
        "torch-cuda-geglu-gemm": lambda: measure_variant("torch-cuda-geglu-gemm", bundle, geglu_gemm=True,
                                                         compare=only("torch-cuda"), **common),
        "torch-cuda-pdl": lambda: _switched_on("pdl_kept", "kernels_pdl", lambda: (
            measure_variant("torch-cuda-pdl", bundle, compare=only("torch-cuda"), **common))),
        "torch-cuda-hf-modules": lambda: measure_variant("torch-cuda-hf-modules", bundle, hf_modules=True,
                                                         compare=only("torch-cuda"), **common),
        "torch-cuda-no-kv-tables": lambda: measure_variant("torch-cuda-no-kv-tables", bundle, kv_tables=False, **one),
        "torch-cuda-kv-tables": lambda: measure_variant("torch-cuda-kv-tables", bundle, kv_step=False,
                                                        compare=only("torch-cuda"), **common),
        "torch-cuda-cudnn-attention": lambda: measure_variant("torch-cuda-cudnn-attention", bundle, sdpa="cudnn", **one),
        "torch-cuda-no-kernels": lambda: measure_variant("torch-cuda-no-kernels", bundle, kernels=False, **common),
        "torch-cuda-eager": lambda: measure_variant("torch-cuda-eager", bundle, cuda_graph=False, **one),
        "torch-cuda-low-memory": lambda: measure_variant("torch-cuda-low-memory", bundle, low_memory=True, **one),
        "torch-cuda-low-memory-1024": lambda: measure_variant("torch-cuda-low-memory-1024", bundle, low_memory=True,
                                                              keep=kept, **big),
        "torch-cuda-low-memory-1024-no-ff-chunk": lambda: measure_variant(
            "torch-cuda-low-memory-1024-no-ff-chunk", bundle, low_memory=True, ff_chunk=0, **big),
        "torch-cuda-low-memory-1024-untiled": lambda: measure_variant(
            "torch-cuda-low-memory-1024-untiled", bundle, low_memory=True, vae_tiling=False, keep=kept,
            compare=only("torch-cuda-low-memory-1024"), **big),
        "torch-cuda-low-memory-1024-bands": lambda: measure_variant(
            "torch-cuda-low-memory-1024-bands", bundle, low_memory=True, vae_tiling=False, vae_bands=32,
            compare=only("torch-cuda-low-memory-1024-untiled"), **big),
        "torch-cuda-low-memory-batched": lambda: measure_variant(
            "torch-cuda-low-memory-batched", bundle, low_memory=True, kv_tables=True, sequential_guidance=False,
            **one),
        "torch-cuda-int8": lambda: measure_variant("torch-cuda-int8", bundle, int8_weights=True,
                                                   compare=only("torch-cuda"), **common),
        "torch-cuda-low-memory-int8": lambda: measure_variant("torch-cuda-low-memory-int8", bundle, low_memory=True,
                                                              int8_weights=True, compare=only("torch-cuda"), **one),
        "torch-cuda-low-memory-int8-1024": lambda: measure_variant(
            "torch-cuda-low-memory-int8-1024", bundle, low_memory=True, int8_weights=True, **big),
        "torch-cuda-cudnn-heuristics": lambda: measure_variant("torch-cuda-cudnn-heuristics", bundle,
                                                               cudnn_benchmark=False, **one),
        "torch-cuda-low-memory-cudnn-heuristics": lambda: measure_variant(
            "torch-cuda-low-memory-cudnn-heuristics", bundle, low_memory=True, cudnn_benchmark=False, **one),
        "torch-cuda-low-memory-1024-cudnn-heuristics": lambda: measure_variant(
            "torch-cuda-low-memory-1024-cudnn-heuristics", bundle, low_memory=True, cudnn_benchmark=False, **big),
        "torch-cuda-shared-pool": lambda: measure_variant("torch-cuda-shared-pool", bundle, shared_pool=True,
                                                          compare=only("torch-cuda"), **common),
        "torch-cuda-shared-pool-one-stream": lambda: measure_variant(
            "torch-cuda-shared-pool-one-stream", bundle, shared_pool=True, one_stream=True,
            compare=only("torch-cuda"), **common),
        "torch-cuda-low-memory-1024-one-stream": lambda: measure_variant(
            "torch-cuda-low-memory-1024-one-stream", bundle, low_memory=True, one_stream=True, **big),
        "torch-cuda-shared-pool-offload-te": lambda: measure_variant(
            "torch-cuda-shared-pool-offload-te", bundle, shared_pool=True, offload_text_encoder=True,
            compare=only("torch-cuda"), **common),
        "torch-cuda-phases": lambda: measure_phases("torch-cuda-phases", bundle, steps=steps, size=size),
        "torch-cuda-low-memory-phases": lambda: measure_phases("torch-cuda-low-memory-phases", bundle, steps=steps,
                                                               size=size, low_memory=True),
        "torch-cuda-low-memory-1024-phases": lambda: measure_phases(
            "torch-cuda-low-memory-1024-phases", bundle, steps=steps, size=BIG_SIZE, low_memory=True),
        "torch-cuda-shared-pool-phases": lambda: measure_phases("torch-cuda-shared-pool-phases", bundle, steps=steps,
                                                                size=size, shared_pool=True),
        "torch-cuda-warm-start": lambda: warm_start_s(bundle, steps, size),
        "profile": lambda: profile_step(bundle, size, log),
        "profile-gn-auto": lambda: _gn_restored(lambda: profile_step(bundle, size, log, gn_impl="auto")),
    }
    for name, fn in todo.items():
        if name in variants:
            guarded(name, fn)
    return out
