"""pm_kernels against PyTorch at SD 1.5's shapes (512 px, batch 2 for guidance, fp16), on a GPU.

Prints achieved GB/s (memory-bound ops: the bytes an op must move, input read once + output
written once, / time) or TFLOP/s (attention, GEMMs) beside PyTorch's, and appends one JSON line
per case (schema pm-bench-kernels/1) to --out. Each op is timed twice, CUDA events, p20/p50/p80
of --reps: "eager" (one Python call per rep: includes launch overhead, which dominates ops of a
few microseconds) and "graph" (--graph-calls calls captured in one CUDA graph, replayed: the GPU
time, which is what the torch-cuda backend's step graph pays). Cases: GroupNorm+SiLU (channels-
last; PyTorch on the same channels-last tensor and on NCHW), GroupNorm with the time-embedding
add, ours on NCHW, GEGLU, GEGLU inside its projection's GEMM (vs cuBLAS + the GEGLU kernel), residual add + LayerNorm, a ResNet's conv bias + residual add, the step's
arithmetic around the UNet (scaled_copies + guided_update vs the PyTorch ops), cross-attention with 77 keys (split K/V), self-attention (the Triton
kernel, forced even where attention() dispatches to SDPA, vs PyTorch's SDPA), the int8 weight
dequantize (vs its three-pass PyTorch reference), and fp8 e4m3 GEMMs (activation quantised per call, weights once) vs fp16 where
torch._scaled_mm runs (H100/H200), with the fp8 output's relative error. A failing case is
recorded as an error and the rest goes on; cases stop being started after --max-seconds.

  python benchmarks/bench_kernels.py --out benchmarks/results/kernels-gpu.jsonl     # ~30 s on an H100
  TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --device cpu --out /tmp/k.jsonl
      # the same code end to end on the CPU (Triton interpreter, tiny shapes): a dry run, not a figure
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
SCHEMA = "pm-bench-kernels/1"
FP8_GEMMS = [(8192, 320, 1280), (8192, 320, 2560), (2048, 640, 2560), (2048, 640, 5120), (512, 1280, 5120),
             (512, 1280, 10240)]  # (M = 2 * tokens, K, N): the UNet's projections / feed-forward at 512 px


def environment(device: str) -> dict:
    """bench_train's record fields (device, driver, versions, commit; PM_COMMIT overrides the commit
    where the tree has no .git) plus Triton's version."""
    import platform

    import torch
    import triton

    try:
        from bench_train import environment as env

        return {**env(device), "triton": triton.__version__}
    except ImportError as e:  # bench_train needs diffusers/transformers: record what we can without them
        from bench_train import git_state

        cuda = device == "cuda"
        return {"commit": git_state(None)[0], "host": platform.node(),
                "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                "device_name": torch.cuda.get_device_name(0) if cuda else "cpu", "env_note": f"partial: {e}"}


def device_unready(device: str, script: str, hint: str = "") -> bool:
    """Whether `script` cannot run on `device` (said on stderr). --device cpu is a dry run under
    Triton's interpreter: it sets TRITON_INTERPRET=1 here, before pm_kernels defines its kernels."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] != "1":
            print(f"{script}: --device cpu needs TRITON_INTERPRET=1", file=sys.stderr)
            return True
        return False
    import torch

    if not torch.cuda.is_available():
        print(f"{script}: needs a CUDA GPU ({hint}--device cpu is a dry run of this script)", file=sys.stderr)
        return True
    return False


# ------------------------------------------------------------------ timing
def _quantiles(times: list[float]) -> dict:
    times = sorted(times)
    pick = lambda q: round(times[min(len(times) - 1, int(q * len(times)))], 5)  # noqa: E731
    return {"p20": pick(0.2), "p50": pick(0.5), "p80": pick(0.8)}


def timed(torch, fn, reps: int, cuda: bool, warmup: int = 5, per: int = 1) -> dict:
    """ms per call of fn (which runs `per` calls): CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup if cuda else 1):
        fn()
    if not cuda:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3 / per)
        return _quantiles(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per)
    return _quantiles(times)


def graph_timed(torch, fn, reps: int, calls: int) -> dict:
    """ms per call with `calls` calls of fn captured in one CUDA graph (launch overhead excluded)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs documents
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    try:
        return timed(torch, graph.replay, reps, True, warmup=2, per=calls)
    finally:
        del graph


# ------------------------------------------------------------------ cases
def _grouped(fn, *args, **kwargs):
    """fn with GroupNorm's "grouped" implementation (pm_kernels.group_norm; a CUDA graph captured
    around this call keeps those kernels)."""
    import pm_kernels as K

    with K.group_norm_impl_kept("grouped"):
        return fn(*args, **kwargs)


def cases(torch, K, KA, dev: str, tiny: bool):
    """Dicts: op, shape, dtype, bytes or flops, ours, refs {name: fn}, check () -> (ours, reference)."""
    F = torch.nn.functional
    h16 = torch.float16
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, dtype=h16: torch.randn(*s, device=dev, generator=g, dtype=dtype)  # noqa: E731
    heads = 2 if tiny else 8
    gn_shapes = [(64, 4), (96, 3)] if tiny else [(320, 64), (640, 32), (1280, 16), (1280, 8), (960, 64),
                                                 (1920, 32), (2560, 16)]
    for c, side in gn_shapes:
        x = rnd(2, c, side, side).contiguous(memory_format=torch.channels_last)
        w, b = rnd(2, c, dtype=torch.float32)
        t = rnd(2, c)
        xn = x.contiguous()
        nbytes = 2 * x.numel() * x.element_size()
        ref_gn = lambda x, t=None, w=w, b=b: F.silu(F.group_norm(x if t is None else x + t[:, :, None, None], 32,  # noqa: E731
                                                                 w.half(), b.half(), 1e-5))
        yield {"op": "group_norm_silu", "shape": [2, c, side, side], "bytes": nbytes,
               "ours": lambda x=x, w=w, b=b: K.group_norm_silu(x, w, b, 32, 1e-5),
               "refs": {"torch_channels_last": lambda x=x: ref_gn(x), "torch_nchw": lambda x=xn: ref_gn(x),
                        "ours_grouped": lambda x=x, w=w, b=b: _grouped(K.group_norm_silu, x, w, b, 32, 1e-5)},
               "check": lambda x=x, w=w, b=b: (K.group_norm_silu(x, w, b, 32, 1e-5),
                                               K.group_norm_silu_reference(x, w, b, 32, 1e-5))}
        yield {"op": "group_norm_temb_silu", "shape": [2, c, side, side], "bytes": nbytes,
               "ours": lambda x=x, w=w, b=b, t=t: K.group_norm_silu(x, w, b, 32, 1e-5, temb=t),
               "refs": {"torch_channels_last": lambda x=x, t=t: ref_gn(x, t),
                        "torch_nchw": lambda x=xn, t=t: ref_gn(x, t),
                        "ours_grouped": lambda x=x, w=w, b=b, t=t: _grouped(K.group_norm_silu, x, w, b, 32, 1e-5,
                                                                            temb=t)},
               "check": lambda x=x, w=w, b=b, t=t: (K.group_norm_silu(x, w, b, 32, 1e-5, temb=t),
                                                    K.group_norm_silu_reference(x, w, b, 32, 1e-5, temb=t))}
        if side in (64, 16, 4):
            yield {"op": "group_norm_silu_nchw", "shape": [2, c, side, side], "bytes": nbytes,
                   "ours": lambda x=xn, w=w, b=b: K.group_norm_silu(x, w, b, 32, 1e-5),
                   "refs": {"torch_nchw": lambda x=xn: ref_gn(x)},
                   "check": lambda x=xn, w=w, b=b: (K.group_norm_silu(x, w, b, 32, 1e-5),
                                                    K.group_norm_silu_reference(x, w, b, 32, 1e-5))}
    widths = [(16, 32), (4, 64)] if tiny else [(4096, 320), (1024, 640), (256, 1280), (64, 1280)]
    for tokens, inner in widths:
        hh = rnd(2, tokens, 8 * inner)  # the feed-forward projection's output (..., 2 * 4 * inner)
        yield {"op": "geglu", "shape": list(hh.shape), "bytes": hh.numel() * hh.element_size() * 3 // 2,
               "ours": lambda hh=hh: K.geglu(hh),
               "refs": {"torch": lambda hh=hh: (lambda a, gt: a * F.gelu(gt))(*hh.chunk(2, -1))},
               "check": lambda hh=hh: (K.geglu(hh), K.geglu_reference(hh))}
    for tokens, inner in widths:  # the feed-forward's GEGLU projection: one GEMM with the GEGLU in its epilogue
        x = rnd(2, tokens, inner)
        w = rnd(8 * inner, inner) * inner ** -0.5
        b = rnd(8 * inner)
        yield {"op": "geglu_linear", "shape": [2 * tokens, inner, 8 * inner], "flops": 2 * 2 * tokens * inner * 8 * inner,
               "ours": lambda x=x, w=w, b=b: K.geglu_linear(x, w, b),
               "refs": {"cublas_then_geglu": lambda x=x, w=w, b=b: K.geglu(F.linear(x, w, b)),  # what FastUNet runs
                        "torch": lambda x=x, w=w, b=b: (lambda a, gt: a * F.gelu(gt))(*F.linear(x, w, b).chunk(2, -1))},
               "check": lambda x=x, w=w, b=b: (K.geglu_linear(x, w, b), K.geglu_linear_reference(x, w, b))}
    for tokens, inner in widths:  # a transformer block's residual add + the LayerNorm after it
        a, r = rnd(2, tokens, inner), rnd(2, tokens, inner)
        lw, lb = rnd(2, inner)
        yield {"op": "add_layer_norm", "shape": [2, tokens, inner], "bytes": 4 * a.numel() * a.element_size(),
               "ours": lambda a=a, r=r, lw=lw, lb=lb: K.add_layer_norm(a, r, lw, lb, 1e-5),
               "refs": {"torch": lambda a=a, r=r, lw=lw, lb=lb: F.layer_norm(a + r, (a.shape[-1],), lw, lb, 1e-5)},
               "check": lambda a=a, r=r, lw=lw, lb=lb: (K.add_layer_norm(a, r, lw, lb, 1e-5)[1],
                                                        K.add_layer_norm_reference(a, r, lw, lb, 1e-5)[1])}
    for c, side in gn_shapes[:4]:  # a ResNet block's end: conv2's bias + the residual (FastUNet's fused epilogue)
        hc, xc = (rnd(2, c, side, side).contiguous(memory_format=torch.channels_last) for _ in range(2))
        bc = rnd(c)
        yield {"op": "add_bias_residual", "shape": [2, c, side, side], "bytes": 3 * hc.numel() * hc.element_size(),
               "ours": lambda hc=hc, xc=xc, bc=bc: K.add_bias_residual(hc, xc, bc),
               # PyTorch: the convolution's separate bias pass, then the residual add
               "refs": {"torch_bias_then_add": lambda hc=hc, xc=xc, bc=bc: xc + (hc + bc[None, :, None, None])},
               "check": lambda hc=hc, xc=xc, bc=bc: (K.add_bias_residual(hc, xc, bc),
                                                     K.add_bias_residual_reference(hc, xc, bc))}

    # the step graph's arithmetic around the UNet (n = 1 image, guidance batch 2): the UNet input, then
    # guidance + the scheduler update, against the same done with PyTorch ops (their references)
    lat = (4, 8, 8) if tiny else (4, 64, 64)
    x, x0p, nz = (torch.randn(1, *lat, device=dev, generator=g) for _ in range(3))
    out = rnd(2, *lat).contiguous(memory_format=torch.channels_last)
    coef = torch.tensor([[1.0, -0.1, 0.0, 1.0, 0.9, 0.0, 0.1, 0.0, 0.0, 0.0]] * 4, device=dev)  # a contraction
    step, scale, gd, clip = (torch.tensor(v, device=dev) for v in (2, [1.0, 0.9, 0.8, 0.7], 7.5, float("inf")))

    def step_ops(copies, update, x=x, x0p=x0p):
        xin = copies(x, scale, step, 2, h16, torch.channels_last)
        update(out[:1], out[1:], x, x0p, nz, coef, step, gd, clip)
        return xin

    def step_check():
        states = [(x.clone(), x0p.clone()) for _ in range(2)]
        K.guided_update(out[:1], out[1:], *states[0], nz, coef, step, gd, clip)
        K.guided_update_reference(out[:1], out[1:], *states[1], nz, coef, step, gd, clip)
        return states[0][0], states[1][0]
    # bytes: x read twice, x0_prev and noise read, x and x0_prev written (fp32); the fp16 UNet input
    # written (2 copies) and the fp16 UNet output read (2 halves)
    yield {"op": "step_update", "shape": [1, *lat], "bytes": 6 * x.numel() * 4 + 2 * out.numel() * 2,
           "ours": lambda: step_ops(K.scaled_copies, K.guided_update),
           "refs": {"torch_ops": lambda: step_ops(K.scaled_copies_reference, K.guided_update_reference)},
           "check": step_check}

    def triton_attention(q, k, v):  # the Triton kernel even where attention() would pick SDPA
        old, KA.ALWAYS_TRITON = KA.ALWAYS_TRITON, True
        try:
            return K.attention(q, k, v, heads)
        finally:
            KA.ALWAYS_TRITON = old
    for tokens, inner in widths:
        q = rnd(2, tokens, inner)
        k, v = rnd(2, 2, 77, inner)  # K from the key context, V from the value context
        yield {"op": "cross_attention_77", "shape": [2, tokens, inner, heads], "flops": 4 * 2 * tokens * 77 * inner,
               "ours": lambda q=q, k=k, v=v: triton_attention(q, k, v),
               "refs": {"torch_sdpa": lambda q=q, k=k, v=v: K.attention_sdpa(q, k, v, heads)},
               "check": lambda q=q, k=k, v=v: (triton_attention(q, k, v), K.attention_reference(q, k, v, heads))}
    for tokens, inner in ([(160, 32)] if tiny else [(4096, 320), (1024, 640)]):
        qkv = rnd(2, tokens, 3 * inner)  # a fused QKV projection's output: q, k, v are strided slices
        q, k, v = qkv[..., :inner], qkv[..., inner:2 * inner], qkv[..., 2 * inner:]
        yield {"op": "self_attention", "shape": [2, tokens, inner, heads], "flops": 4 * 2 * tokens * tokens * inner,
               "ours": lambda q=q, k=k, v=v: triton_attention(q, k, v),
               "refs": {"torch_sdpa": lambda q=q, k=k, v=v: K.attention_sdpa(q, k, v, heads)},
               "check": lambda q=q, k=k, v=v: (triton_attention(q, k, v), K.attention_reference(q, k, v, heads))}
    # int8 weight dequantize (int8_weights): the largest conv weight (channels-last), the feed-forward
    # projection, a self-attention's fused QKV; bytes = int8 read + fp16 written
    for shape in ([(6, 10, 3, 3), (40, 16)] if tiny else [(1280, 2560, 3, 3), (10240, 1280), (3840, 1280)]):
        qw, sc = K.quantize_int8(rnd(*shape))
        if len(shape) == 4:
            qw = qw.contiguous(memory_format=torch.channels_last)
        yield {"op": "dequant_int8", "shape": list(shape), "bytes": qw.numel() * 3,
               "ours": lambda qw=qw, sc=sc: K.dequant_int8(qw, sc, h16),
               "refs": {"torch": lambda qw=qw, sc=sc: K.dequant_int8_reference(qw, sc, h16)},
               "check": lambda qw=qw, sc=sc: (K.dequant_int8(qw, sc, h16), K.dequant_int8_reference(qw, sc, h16))}
    if hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn") \
            and (dev == "cpu" or torch.cuda.get_device_capability() >= (8, 9)):  # fp8 tensor cores: sm_89+
        for m, kk, n in ([(32, 64, 48)] if tiny else FP8_GEMMS):
            yield fp8_case(torch, rnd(m, kk), rnd(n, kk) * 0.05)


def fp8_case(torch, a, wt):
    """fp16 a (M, K) @ wt (N, K)^T against e4m3: weights quantised once (per tensor), the activation
    per call (absmax -> scale -> cast, all on the device: no host sync, graph-capturable)."""
    e4m3, fmax = torch.float8_e4m3fn, 448.0
    sw = (wt.abs().max().float() / fmax).clamp_min(1e-12)
    w8 = (wt / sw).to(e4m3)

    def quant(a):
        sa = (a.abs().max().float() / fmax).clamp_min(1e-12)
        return (a / sa).to(e4m3), sa

    def fp8(a=a):
        a8, sa = quant(a)
        return torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw, out_dtype=torch.float16)
    a8, sa = quant(a)  # for the GEMM-only peer: what fp8 costs without the per-call quantisation
    m, kk = a.shape
    return {"op": "gemm_fp8_e4m3", "shape": [m, kk, wt.shape[0]], "dtype": "float8_e4m3fn",
            "flops": 2 * m * kk * wt.shape[0], "ours": fp8,
            "refs": {"torch_fp16": lambda: a @ wt.t(),
                     "fp8_gemm_only": lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw,
                                                               out_dtype=torch.float16)},
            "check": lambda: (fp8(), a @ wt.t())}


# ------------------------------------------------------------------ one case -> one record
def run_case(torch, case: dict, args, graphs: bool) -> dict:
    ours_out, ref_out = case["check"]()
    ref_f = ref_out.float()
    rec = {"max_rel_err": round(float((ours_out.float() - ref_f).abs().max() / ref_f.abs().max().clamp_min(1e-12)), 6),
           "finite": bool(torch.isfinite(ours_out).all())}
    unit, amount = ("GB/s", case["bytes"] / 1e9) if "bytes" in case else ("TFLOP/s", case["flops"] / 1e12)
    rate = lambda ms: round(amount / (ms / 1e3), 2)  # noqa: E731
    rec["unit"] = unit
    cuda = args.device == "cuda"
    rec["ours_ms"] = timed(torch, case["ours"], args.reps, cuda)
    rec["ref_ms"] = {k: timed(torch, f, args.reps, cuda) for k, f in case["refs"].items()}
    rec["ours_rate"] = rate(rec["ours_ms"]["p50"])
    rec["ref_rate"] = {k: rate(v["p50"]) for k, v in rec["ref_ms"].items()}
    if graphs:
        rec["graph_calls"] = args.graph_calls
        rec["ours_graph_ms"] = graph_timed(torch, case["ours"], args.reps, args.graph_calls)
        rec["ref_graph_ms"] = {k: graph_timed(torch, f, args.reps, args.graph_calls) for k, f in case["refs"].items()}
        rec["ours_graph_rate"] = rate(rec["ours_graph_ms"]["p50"])
        rec["ref_graph_rate"] = {k: rate(v["p50"]) for k, v in rec["ref_graph_ms"].items()}
    return rec


def print_row(case: dict, rec: dict) -> None:
    first = next(iter(rec["ref_ms"]))
    key = "graph_ms" if "ours_graph_ms" in rec else "ms"
    ours, ref = rec[f"ours_{key}"]["p50"], rec[f"ref_{key}"][first]["p50"]
    ours_r = rec["ours_graph_rate" if key == "graph_ms" else "ours_rate"]
    ref_r = rec["ref_graph_rate" if key == "graph_ms" else "ref_rate"][first]
    print(f"{case['op']:22} {str(case['shape']):22} {rec['ours_ms']['p50']:9.4f} {ours:9.4f} {ref:9.4f} "
          f"{ours_r:9.1f} {ref_r:9.1f} {rec['unit']:7} {ref / ours:6.2f}x {first:20} {rec['max_rel_err']:9.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "kernels-gpu.jsonl"))
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions per op and peer (p20/p50/p80)")
    ap.add_argument("--graph-calls", type=int, default=10, help="calls captured per CUDA graph (0: no graph timing)")
    ap.add_argument("--max-seconds", type=float, default=50.0, help="start no new case after this long")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a dry run of the same code under the Triton interpreter at tiny shapes")
    ap.add_argument("--only", default="", help="comma-separated op names to run (default: all)")
    args = ap.parse_args(argv)
    if device_unready(args.device, "bench_kernels", "the kernels' CPU checks are tests/test_kernels.py; "):
        return 2
    import torch

    import importlib

    import pm_kernels as K

    KA = importlib.import_module("pm_kernels.attention")
    if args.device == "cpu" and K.kernel_path("attention", torch.zeros(1)) != "triton":
        print("bench_kernels: pm_kernels was imported before TRITON_INTERPRET=1 was set", file=sys.stderr)
        return 2
    env = environment(args.device)
    graphs = args.device == "cuda" and args.graph_calls > 0
    only = {s for s in args.only.split(",") if s}
    t_start = time.perf_counter()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit'][:12]}; "
          f"ms and rates are p50 {'in a CUDA graph' if graphs else 'eager'}; peer = the first PyTorch one")
    print(f"{'op':22} {'shape':22} {'eager ms':>9} {'ours ms':>9} {'peer ms':>9} {'ours':>9} {'peer':>9} "
          f"{'unit':7} {'speedup':>7} {'peer':20} {'rel err':>9}")
    n_ok = n_err = 0
    for case in cases(torch, K, KA, args.device, tiny=args.device == "cpu"):
        if only and case["op"] not in only:
            continue
        rec = {"schema": SCHEMA, **env, "op": case["op"], "shape": case["shape"],
               "dtype": case.get("dtype", "float16"), "reps": args.reps,
               "timing": "cuda-events" if args.device == "cuda" else "perf-counter-interpreter"}
        if time.perf_counter() - t_start > args.max_seconds:
            rec.update(status="skipped", error=f"over --max-seconds {args.max_seconds}")
            print(f"{case['op']:22} {str(case['shape']):22} skipped (time)")
        else:
            try:
                rec.update(run_case(torch, case, args, graphs), status="ok")
                print_row(case, rec)
                n_ok += 1
            except Exception as e:  # noqa: BLE001 - record and go on
                rec.update(status="error", error=f"{type(e).__name__}: {e}"[:400])
                print(f"{case['op']:22} {str(case['shape']):22} ERROR {rec['error']}")
                n_err += 1
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    print(f"{n_ok} ok, {n_err} errors in {time.perf_counter() - t_start:.1f} s -> {out}")
    return 0 if n_ok else 1


if __name__ == "__main__":
    sys.exit(main())
