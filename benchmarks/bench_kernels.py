"""pm_kernels against PyTorch at SD 1.5's shapes (512 px, batch 2 for guidance, fp16), on a GPU.

Prints achieved GB/s (memory-bound ops: bytes read + written / time) or TFLOP/s (attention, GEMMs)
beside PyTorch's, and appends one JSON line per case (schema pm-bench-kernels/1) to --out.
Cases: GroupNorm+SiLU (channels-last; PyTorch on the same channels-last tensor and on NCHW),
GroupNorm with the time-embedding add, GEGLU, cross-attention with 77 keys (split K/V), self-
attention (Triton vs PyTorch's SDPA), and fp8 e4m3 GEMMs vs fp16 where torch._scaled_mm runs
(H100/H200), with the fp8 output's relative error. A failing case is recorded and skipped.

  python benchmarks/bench_kernels.py --out benchmarks/results/kernels-gpu.jsonl     # ~30 s on an H100
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def environment() -> dict:
    """bench_train's record fields (device, driver, versions, commit; PM_COMMIT overrides the commit
    where the tree has no .git) plus Triton's version."""
    import os

    import triton

    from bench_train import environment as env

    return {**env("cuda", os.environ.get("PM_COMMIT")), "triton": triton.__version__}


def timed(torch, fn, reps: int, warmup: int = 5) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    pick = lambda q: round(times[min(len(times) - 1, int(q * len(times)))], 5)  # noqa: E731
    return {"p20": pick(0.2), "p50": pick(0.5), "p80": pick(0.8)}


def cases(torch, K, KA):
    F = torch.nn.functional
    dev, h16 = "cuda", torch.float16
    g = torch.Generator(device=dev).manual_seed(0)
    for c, side in [(320, 64), (640, 32), (1280, 16), (1280, 8), (960, 64)]:
        x = torch.randn(2, c, side, side, device=dev, generator=g, dtype=h16).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(2, c, device=dev, generator=g)
        t = torch.randn(2, c, device=dev, generator=g, dtype=h16)
        nbytes = 2 * x.numel() * 2
        xn = x.contiguous()
        yield {"op": "group_norm_silu", "shape": [2, c, side, side], "bytes": nbytes,
               "ours": lambda x=x, w=w, b=b: K.group_norm_silu(x, w, b, 32, 1e-5),
               "torch_channels_last": lambda x=x, w=w, b=b: F.silu(F.group_norm(x, 32, w.half(), b.half(), 1e-5)),
               "torch_nchw": lambda x=xn, w=w, b=b: F.silu(F.group_norm(x, 32, w.half(), b.half(), 1e-5)),
               "check": lambda x=x, w=w, b=b: (K.group_norm_silu(x, w, b, 32, 1e-5),
                                               K.group_norm_silu_reference(x, w, b, 32, 1e-5))}
        yield {"op": "group_norm_temb_silu", "shape": [2, c, side, side], "bytes": nbytes,
               "ours": lambda x=x, w=w, b=b, t=t: K.group_norm_silu(x, w, b, 32, 1e-5, temb=t),
               "torch_channels_last": lambda x=x, w=w, b=b, t=t: F.silu(F.group_norm(
                   x + t[:, :, None, None], 32, w.half(), b.half(), 1e-5)),
               "check": lambda x=x, w=w, b=b, t=t: (K.group_norm_silu(x, w, b, 32, 1e-5, temb=t),
                                                    K.group_norm_silu_reference(x, w, b, 32, 1e-5, temb=t))}
    for tokens, inner in [(4096, 320), (1024, 640), (256, 1280), (64, 1280)]:
        hh = torch.randn(2, tokens, 8 * inner, device=dev, generator=g, dtype=h16)
        yield {"op": "geglu", "shape": list(hh.shape), "bytes": hh.numel() * 2 * 3 // 2,
               "ours": lambda hh=hh: K.geglu(hh),
               "torch": lambda hh=hh: (lambda a, gt: a * F.gelu(gt))(*hh.chunk(2, -1)),
               "check": lambda hh=hh: (K.geglu(hh), K.geglu_reference(hh))}
    for tokens, inner in [(4096, 320), (1024, 640), (256, 1280), (64, 1280)]:
        q = torch.randn(2, tokens, inner, device=dev, generator=g, dtype=h16)
        k, v = torch.randn(2, 2, 77, inner, device=dev, generator=g, dtype=h16)
        flops = 4 * 2 * tokens * 77 * inner
        yield {"op": "cross_attention_77", "shape": [2, tokens, inner, 8], "flops": flops,
               "ours": lambda q=q, k=k, v=v: K.attention(q, k, v, 8),
               "torch": lambda q=q, k=k, v=v: K.attention_sdpa(q, k, v, 8),
               "check": lambda q=q, k=k, v=v: (K.attention(q, k, v, 8), K.attention_reference(q, k, v, 8))}
    for tokens, inner in [(4096, 320), (1024, 640)]:
        qkv = torch.randn(2, tokens, 3 * inner, device=dev, generator=g, dtype=h16)
        q, k, v = qkv[..., :inner], qkv[..., inner:2 * inner], qkv[..., 2 * inner:]

        def triton_self(q=q, k=k, v=v):
            KA.LONG_KEYS_TO_TRITON = True
            try:
                return K.attention(q, k, v, 8)
            finally:
                KA.LONG_KEYS_TO_TRITON = False
        yield {"op": "self_attention", "shape": [2, tokens, inner, 8], "flops": 4 * 2 * tokens * tokens * inner,
               "ours": triton_self, "torch": lambda q=q, k=k, v=v: K.attention_sdpa(q, k, v, 8),
               "check": lambda q=q, k=k, v=v, f=triton_self: (f(), K.attention_sdpa(q, k, v, 8))}
    if hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn") and torch.cuda.get_device_capability() >= (8, 9):
        for m, kk, n in [(8192, 320, 1280), (8192, 320, 2560), (2048, 640, 5120), (512, 1280, 10240)]:
            a = torch.randn(m, kk, device=dev, generator=g, dtype=h16)
            wt = torch.randn(n, kk, device=dev, generator=g, dtype=h16) * 0.05
            w8 = (wt / (wt.abs().max() / 448)).to(torch.float8_e4m3fn)  # weights quantised once (per tensor)
            sw = (wt.abs().max() / 448).float().reshape(())

            def fp8(a=a, w8=w8, sw=sw):
                sa = (a.abs().max().float() / 448).clamp_min(1e-12)  # the activation per call
                return torch._scaled_mm((a / sa).to(torch.float8_e4m3fn), w8.t(), scale_a=sa, scale_b=sw,
                                        out_dtype=torch.float16)
            yield {"op": "gemm_fp8_e4m3", "shape": [m, kk, n], "flops": 2 * m * kk * n,
                   "ours": fp8, "torch": lambda a=a, wt=wt: a @ wt.t(),
                   "check": lambda a=a, wt=wt, f=fp8: (f(), a @ wt.t())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "kernels-gpu.jsonl"))
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (the kernels' CPU checks are tests/test_kernels.py)", file=sys.stderr)
        return 2
    import importlib

    import pm_kernels as K

    KA = importlib.import_module("pm_kernels.attention")
    env = environment()
    t_start = time.perf_counter()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'op':22} {'shape':26} {'ours ms':>9} {'ref ms':>9} {'ours':>12} {'ref':>12} {'rel err':>9}")
    for case in cases(torch, K, KA):
        rec = {"schema": "pm-bench-kernels/1", **env, "op": case["op"], "shape": case["shape"], "dtype": "float16"}
        try:
            ours_out, ref_out = case["check"]()
            err = float((ours_out.float() - ref_out.float()).abs().max() / ref_out.float().abs().max())
            rec["max_rel_err"] = round(err, 6)
            rec["finite"] = bool(torch.isfinite(ours_out).all())
            rec["ours_ms"] = timed(torch, case["ours"], args.reps)
            refs = {k: v for k, v in case.items() if k.startswith("torch")}
            rec["ref_ms"] = {k: timed(torch, v, args.reps) for k, v in refs.items()}
            unit, amount = ("GB/s", case["bytes"] / 1e9) if "bytes" in case else ("TFLOP/s", case["flops"] / 1e12)
            rate = lambda ms: round(amount / (ms / 1e3), 2)  # noqa: E731
            rec["unit"] = unit
            rec["ours_rate"] = rate(rec["ours_ms"]["p50"])
            rec["ref_rate"] = {k: rate(v["p50"]) for k, v in rec["ref_ms"].items()}
            first = next(iter(rec["ref_ms"]))
            print(f"{case['op']:22} {str(case['shape']):26} {rec['ours_ms']['p50']:9.4f} "
                  f"{rec['ref_ms'][first]['p50']:9.4f} {rec['ours_rate']:8.1f} {unit:>3} "
                  f"{rec['ref_rate'][first]:8.1f} {unit:>3} {err:9.2e}")
            rec["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - record and go on
            rec.update(status="error", error=f"{type(e).__name__}: {e}"[:400])
            print(f"{case['op']:22} {str(case['shape']):26} ERROR {rec['error']}")
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    print(f"done in {time.perf_counter() - t_start:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
