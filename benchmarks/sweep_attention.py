"""The Triton attention kernel's launch configurations against PyTorch's SDPA, on a GPU.

attention() picks SDPA or the Triton kernel by head dim and key count, and the kernel's block sizes,
by fixed rules (kernels/attention.py: SDPA_MAX_HEAD_DIM, default_config, SPLIT_HEAD_DIM) that were
measured on an H200 with the head dim 40 kernel compiled to 2-byte accesses. This times, at SD 1.5's
attention shapes (512 px, batch 2, 8 heads, fp16), a short list of candidate configurations per case
(BLOCK_M, BLOCK_N, warps; the head dim as one tile or two), each in a CUDA graph (p20/p50/p80 of
--reps), beside SDPA in the same run and the configuration attention() takes now, with each output's
error against the fp32 reference. One JSON line per (case, candidate) (schema pm-sweep-attention/1)
and a table of the best candidate per case. Cases by priority (the UNet's costliest first); no new
candidate is started after --max-seconds.

  python benchmarks/sweep_attention.py --out /tmp/sweep.jsonl                        # GPU, ~40 s
  TRITON_INTERPRET=1 python benchmarks/sweep_attention.py --device cpu --out /tmp/s.jsonl
      # the same code end to end on the CPU (interpreter, tiny shapes): a dry run, not a figure
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
SCHEMA = "pm-sweep-attention/1"

# (name, query tokens, inner dim, keys: 77 for cross-attention, None for self-attention, candidates
# as (BLOCK_M, BLOCK_N, num_warps)); each candidate runs with the head dim as one tile and as two
CASES = [
    ("self_attention", 4096, 320, None, [(128, 64, 4), (128, 64, 8), (128, 128, 8), (64, 64, 4)]),
    ("cross_attention_77", 4096, 320, 77, [(128, 64, 4), (64, 64, 4), (128, 128, 4)]),
    ("self_attention", 1024, 640, None, [(64, 64, 4), (128, 64, 8), (64, 128, 4)]),
    ("cross_attention_77", 1024, 640, 77, [(64, 64, 4), (128, 64, 8)]),
    ("cross_attention_77", 256, 1280, 77, [(32, 64, 4), (64, 64, 4)]),
]
TINY = [("self_attention", 24, 320, None, [(16, 16, 4)]),  # head dim 40: one tile of 64 or 32 + 16
        ("cross_attention_77", 16, 320, 77, [(16, 32, 4)])]
HEADS = 8


def sweep(torch, cases, *, reps: int, graph_calls: int, cuda: bool, max_seconds: float, env: dict, log=print):
    """Yields one record per (case, candidate), SDPA's and the default configuration's included."""
    import importlib

    from bench_kernels import graph_timed, timed

    KA = importlib.import_module("pm_kernels.attention")
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    t0 = time.perf_counter()

    def ms(fn):
        return graph_timed(torch, fn, reps, graph_calls) if cuda else timed(torch, fn, reps, False)

    for op, tokens, inner, keys, candidates in cases:
        d = inner // HEADS
        nk = keys or tokens
        if keys is None:  # a fused QKV projection's output: q, k, v strided slices, as in the UNet
            qkv = torch.randn(2, tokens, 3 * inner, device=dev, generator=g).to(dtype)
            q, k, v = qkv[..., :inner], qkv[..., inner:2 * inner], qkv[..., 2 * inner:]
        else:  # K from the key context, V from the value context
            q = torch.randn(2, tokens, inner, device=dev, generator=g).to(dtype)
            k, v = torch.randn(2, 2, keys, inner, device=dev, generator=g).to(dtype)
        ref = KA.attention_reference(q, k, v, HEADS).float()
        flops = 4 * 2 * tokens * nk * inner
        base = {"schema": SCHEMA, **env, "op": op, "shape": [2, tokens, inner, HEADS], "keys": nk, "head_dim": d,
                "dtype": str(dtype).removeprefix("torch."), "reps": reps,
                "timing": f"cuda-graph x{graph_calls}" if cuda else "perf-counter-interpreter"}

        def err(out):
            return round(float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)), 6)

        sdpa = ms(lambda: KA.attention_sdpa(q, k, v, HEADS))
        yield {**base, "candidate": "sdpa", "status": "ok", "ms": sdpa,
               "tflops": round(flops / sdpa["p50"] / 1e9, 2), "rel_err": err(KA.attention_sdpa(q, k, v, HEADS))}
        default = KA.default_config(d, nk)
        configs = [(default["block_m"], default["block_n"], 4, default["split_d"])]  # Triton's default: 4 warps
        for bm, bn, w in candidates:
            for split in (False, True):  # (two tiles only where they differ from one: head_dim_tiles)
                if (bm, bn, w, split) not in configs and (not split or KA.head_dim_tiles(d, True)[1]):
                    configs.append((bm, bn, w, split))
        for bm, bn, warps, split in configs:
            rec = {**base, "candidate": "triton", "block_m": bm, "block_n": bn, "num_warps": warps,
                   "split_d": split, "tiles": list(KA.head_dim_tiles(d, split)),
                   "default": (bm, bn, warps, split) == (default["block_m"], default["block_n"], 4, default["split_d"])}
            if time.perf_counter() - t0 > max_seconds:
                yield {**rec, "status": "skipped", "error": f"over --max-seconds {max_seconds}"}
                continue
            run = lambda: KA.launch(q, k, v, HEADS, block_m=bm, block_n=bn, split_d=split,  # noqa: E731
                                    num_warps=warps)
            try:
                e = err(run())
                t = ms(run)
            except KA.OutOfResources as x:
                yield {**rec, "status": "out_of_resources", "error": str(x)[:200]}
                continue
            except Exception as x:  # noqa: BLE001 - record and go on
                yield {**rec, "status": "error", "error": f"{type(x).__name__}: {x}"[:400]}
                continue
            yield {**rec, "status": "ok", "ms": t, "tflops": round(flops / t["p50"] / 1e9, 2), "rel_err": e,
                   "vs_sdpa": round(sdpa["p50"] / t["p50"], 3)}


def summary_lines(recs: list[dict]) -> list[str]:
    """Per case: SDPA, attention()'s current configuration and the best candidate (p50 ms)."""
    out = ["| case | head dim | SDPA ms | default ms | best ms | best config | best vs SDPA |", "|---|---|---|---|---|---|---|"]
    cases: dict = {}
    for r in recs:
        cases.setdefault((r["op"], tuple(r["shape"])), []).append(r)
    for (op, shape), rs in cases.items():
        sdpa = next((r["ms"]["p50"] for r in rs if r["candidate"] == "sdpa" and r["status"] == "ok"), None)
        ok = [r for r in rs if r["candidate"] == "triton" and r["status"] == "ok" and r["rel_err"] <= 1e-2]
        if sdpa is None or not ok:
            continue
        best = min(ok, key=lambda r: r["ms"]["p50"])
        default = next((r["ms"]["p50"] for r in ok if r["default"]), None)
        cfg = f"{best['block_m']}x{best['block_n']}, {best['num_warps']} warps, tiles {best['tiles']}"
        out.append(f"| {op} {list(shape)} | {rs[0]['head_dim']} | {sdpa:.4f} | "
                   f"{'-' if default is None else f'{default:.4f}'} | {best['ms']['p50']:.4f} | {cfg} | "
                   f"{sdpa / best['ms']['p50']:.2f}x |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="append the JSON-lines records here")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per candidate (p20/p50/p80)")
    ap.add_argument("--graph-calls", type=int, default=10, help="calls captured per CUDA graph")
    ap.add_argument("--max-seconds", type=float, default=40.0, help="start no new candidate after this long")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a dry run of the same code under the Triton interpreter at tiny shapes")
    args = ap.parse_args(argv)
    from bench_kernels import device_unready, environment

    if device_unready(args.device, "sweep_attention"):
        return 2
    import torch

    import pm_kernels as K

    if K.kernel_path("attention", torch.zeros(1, device=args.device)) != "triton":
        print("sweep_attention: the Triton kernel cannot run here (pm_kernels imported before TRITON_INTERPRET=1?)",
              file=sys.stderr)
        return 2
    env = environment(args.device)
    cuda = args.device == "cuda"
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit'][:12]}; "
          f"p50 ms {'in a CUDA graph' if cuda else 'eager, interpreter (not a figure)'}")
    recs, t0 = [], time.perf_counter()
    for rec in sweep(torch, CASES if cuda else TINY, reps=args.reps, graph_calls=args.graph_calls, cuda=cuda,
                     max_seconds=args.max_seconds, env=env):
        recs.append(rec)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        what = "sdpa" if rec["candidate"] == "sdpa" else \
            f"{rec['block_m']}x{rec['block_n']} w{rec['num_warps']} tiles {rec['tiles']}{' (default)' if rec['default'] else ''}"
        got = f"{rec['ms']['p50']:.4f} ms {rec['tflops']:7.1f} TFLOP/s err {rec['rel_err']:.1e}" \
            if rec["status"] == "ok" else f"{rec['status']}: {rec.get('error', '')[:80]}"
        print(f"{rec['op']:19} {str(rec['shape']):20} {what:38} {got}")
    print("\n".join(summary_lines(recs)))
    n_ok = sum(r["status"] == "ok" and r["candidate"] == "triton" for r in recs)
    print(f"{n_ok} candidates timed in {time.perf_counter() - t0:.1f} s -> {out}")
    return 0 if n_ok else 1


if __name__ == "__main__":
    sys.exit(main())
