"""pm_kernels' GEMM-shaped Triton kernels: their launch configurations against PyTorch's peer op,
on a GPU.

attention() picks SDPA or the Triton kernel by head dim and key count, and the kernel's block
sizes, by fixed rules (kernels/attention.py: SDPA_MAX_HEAD_DIM, default_config, SPLIT_HEAD_DIM)
that were measured on an H200 with the head dim 40 kernel compiled to 2-byte accesses; geglu_linear
(the feed-forward's GEGLU in its projection's GEMM, kernels/geglu.py) has never run on a GPU. This
times, at SD 1.5's shapes (512 px, batch 2, fp16), a short list of candidate configurations per
case, each in a CUDA graph (p20/p50/p80 of --reps), beside the peer in the same run (attention:
SDPA; geglu_linear: cuBLAS's projection + the GEGLU kernel, what FastUNet runs now) and the
configuration the code takes now, with each output's error against the fp32 reference. Attention's
candidates are (BLOCK_M, BLOCK_N, warps) x the head dim as one tile or two; geglu_linear's
(BLOCK_M, BLOCK_N, BLOCK_K, warps). One JSON line per (case, candidate) (schema pm-sweep/1) and a
table of the best candidate per case. Cases by priority (the UNet's costliest first); no new
candidate is started after --max-seconds.

  python benchmarks/sweep_kernels.py --out /tmp/sweep.jsonl                        # GPU, ~40 s
  TRITON_INTERPRET=1 python benchmarks/sweep_kernels.py --device cpu --out /tmp/s.jsonl
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
SCHEMA = "pm-sweep/1"
HEADS = 8

# (op, query tokens, inner dim, keys: 77 for cross-attention, None for self-attention / the GEMM's
# input width, candidates). Attention candidates: (BLOCK_M, BLOCK_N, num_warps[, num_stages]), each
# with the head dim as one tile and as two; geglu_linear: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps[,
# num_stages]), weight (8 x inner, inner). Without a depth: the one the code takes (3, or less where
# it does not load)
CASES = [
    ("self_attention", 4096, 320, None, [(128, 64, 4), (128, 64, 8), (128, 128, 8), (64, 64, 4), (128, 64, 4, 2),
                                         (128, 64, 4, 4)]),
    ("geglu_linear", 4096, 320, None, [(128, 64, 64, 8), (128, 128, 64, 8), (128, 64, 32, 4), (64, 64, 64, 4),
                                       (256, 64, 64, 8), (128, 64, 64, 8, 4)]),
    ("cross_attention_77", 4096, 320, 77, [(128, 64, 4), (64, 64, 4), (128, 128, 4)]),
    ("self_attention", 1024, 640, None, [(64, 64, 4), (128, 64, 8), (64, 128, 4)]),
    ("geglu_linear", 1024, 640, None, [(128, 64, 64, 8), (64, 64, 64, 4), (64, 128, 64, 8)]),
    ("cross_attention_77", 1024, 640, 77, [(64, 64, 4), (128, 64, 8)]),
    ("cross_attention_77", 256, 1280, 77, [(32, 64, 4), (64, 64, 4)]),
]
TINY = [("self_attention", 24, 320, None, [(16, 16, 4, 2)]),  # head dim 40: one tile of 64 or 32 + 16
        ("geglu_linear", 24, 48, None, [(16, 32, 16, 4, 2)]),
        ("cross_attention_77", 16, 320, 77, [(16, 32, 4)])]


def _attention_case(torch, KA, op, tokens, inner, keys, candidates, rnd, dtype):
    """(peer name, peer fn, reference, flops, [(config dict, fn, is default)]) for one attention case."""
    if keys is None:  # a fused QKV projection's output: q, k, v strided slices, as in the UNet
        qkv = rnd(2, tokens, 3 * inner)
        q, k, v = qkv[..., :inner], qkv[..., inner:2 * inner], qkv[..., 2 * inner:]
    else:  # K from the key context, V from the value context
        q, k, v = rnd(2, tokens, inner), rnd(2, keys, inner), rnd(2, keys, inner)
    d, nk = inner // HEADS, keys or tokens
    default = KA.default_config(d, nk)
    configs = [(default["block_m"], default["block_n"], 4, None, default["split_d"])]  # Triton's default: 4 warps
    for bm, bn, w, *stages in candidates:
        st = stages[0] if stages else None
        for split in (False, True):  # (two tiles only where they differ from one: head_dim_tiles)
            if (bm, bn, w, st, split) not in configs and (not split or KA.head_dim_tiles(d, True)[1]):
                configs.append((bm, bn, w, st, split))
    runs = [({"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st, "split_d": split,
              "tiles": list(KA.head_dim_tiles(d, split))},
             lambda bm=bm, bn=bn, w=w, st=st, split=split: KA.launch(q, k, v, HEADS, block_m=bm, block_n=bn,
                                                                     split_d=split, num_warps=w, num_stages=st), i == 0)
            for i, (bm, bn, w, st, split) in enumerate(configs)]
    return ("sdpa", lambda: KA.attention_sdpa(q, k, v, HEADS), KA.attention_reference(q, k, v, HEADS).float(),
            4 * 2 * tokens * nk * inner, {"keys": nk, "head_dim": d}, runs)


def _geglu_case(torch, K, G, op, tokens, inner, keys, candidates, rnd, dtype):
    """The same for geglu_linear: x (2, tokens, inner), weight (8 inner, inner), bias."""
    F = torch.nn.functional
    x, w, b = rnd(2, tokens, inner), rnd(8 * inner, inner) * inner ** -0.5, rnd(8 * inner)
    default = G.geglu_linear_config(2 * tokens)
    configs = [(default["block_m"], default["block_n"], default["block_k"], default["num_warps"], None)]
    configs += [c for c in ((*c[:4], c[4] if len(c) > 4 else None) for c in candidates) if c != configs[0]]
    runs = [({"block_m": bm, "block_n": bn, "block_k": bk, "num_warps": nw, "num_stages": st},
             lambda bm=bm, bn=bn, bk=bk, nw=nw, st=st: K.geglu_linear(x, w, b, block_m=bm, block_n=bn, block_k=bk,
                                                                      num_warps=nw, num_stages=st), i == 0)
            for i, (bm, bn, bk, nw, st) in enumerate(configs)]
    return ("cublas_then_geglu", lambda: K.geglu(F.linear(x, w, b)), K.geglu_linear_reference(x, w, b).float(),
            2 * 2 * tokens * inner * 8 * inner, {"k": inner, "features": 4 * inner}, runs)


def sweep(torch, cases, *, reps: int, graph_calls: int, cuda: bool, max_seconds: float, env: dict):
    """Yields one record per (case, candidate), the peer's and the current configuration's included."""
    import importlib

    from bench_kernels import graph_timed, timed

    import pm_kernels as K
    from pm_kernels._dispatch import OutOfResources

    KA = importlib.import_module("pm_kernels.attention")
    G = importlib.import_module("pm_kernels.geglu")
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g).to(dtype)  # noqa: E731
    t0 = time.perf_counter()

    def ms(fn):
        return graph_timed(torch, fn, reps, graph_calls) if cuda else timed(torch, fn, reps, False)

    for op, tokens, inner, keys, candidates in cases:
        if op == "geglu_linear":
            peer, peer_fn, ref, flops, extra, runs = _geglu_case(torch, K, G, op, tokens, inner, keys, candidates,
                                                                 rnd, dtype)
            shape = [2 * tokens, inner, 8 * inner]
        else:
            peer, peer_fn, ref, flops, extra, runs = _attention_case(torch, KA, op, tokens, inner, keys, candidates,
                                                                     rnd, dtype)
            shape = [2, tokens, inner, HEADS]
        base = {"schema": SCHEMA, **env, "op": op, "shape": shape, **extra, "dtype": str(dtype).removeprefix("torch."),
                "reps": reps, "timing": f"cuda-graph x{graph_calls}" if cuda else "perf-counter-interpreter"}

        def err(out):
            return round(float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)), 6)

        t = ms(peer_fn)
        peer_ms = t["p50"]
        yield {**base, "candidate": peer, "peer": True, "status": "ok", "ms": t,
               "tflops": round(flops / t["p50"] / 1e9, 2), "rel_err": err(peer_fn())}
        for config, run, is_default in runs:
            rec = {**base, "candidate": "triton", "peer": False, **config, "default": is_default}
            if time.perf_counter() - t0 > max_seconds:
                yield {**rec, "status": "skipped", "error": f"over --max-seconds {max_seconds}"}
                continue
            try:
                e = err(run())
                t = ms(run)
            except OutOfResources as x:
                yield {**rec, "status": "out_of_resources", "error": str(x)[:200]}
                continue
            except Exception as x:  # noqa: BLE001 - record and go on
                yield {**rec, "status": "error", "error": f"{type(x).__name__}: {x}"[:400]}
                continue
            yield {**rec, "status": "ok", "ms": t, "tflops": round(flops / t["p50"] / 1e9, 2), "rel_err": e,
                   "vs_peer": round(peer_ms / t["p50"], 3)}


def describe(rec: dict) -> str:
    """A candidate's configuration in a few characters."""
    if rec.get("peer"):
        return rec["candidate"]
    stages = f", {rec['num_stages']} stages" if rec.get("num_stages") else ""
    if rec["op"] == "geglu_linear":
        return f"{rec['block_m']}x{rec['block_n']}x{rec['block_k']}, {rec['num_warps']} warps{stages}"
    return f"{rec['block_m']}x{rec['block_n']}, {rec['num_warps']} warps{stages}, tiles {rec['tiles']}"


def summary_lines(recs: list[dict]) -> list[str]:
    """Per case: the peer, the current configuration and the best candidate (p50 ms)."""
    out = ["| case | peer | peer ms | current ms | best ms | best config | best vs peer |",
           "|---|---|---|---|---|---|---|"]
    cases: dict = {}
    for r in recs:
        cases.setdefault((r["op"], tuple(r["shape"])), []).append(r)
    for (op, shape), rs in cases.items():
        peer = next((r for r in rs if r.get("peer") and r["status"] == "ok"), None)
        ok = [r for r in rs if not r.get("peer") and r["status"] == "ok" and r["rel_err"] <= 1e-2]
        if peer is None or not ok:
            continue
        best = min(ok, key=lambda r: r["ms"]["p50"])
        current = next((r["ms"]["p50"] for r in ok if r["default"]), None)
        p = peer["ms"]["p50"]
        out.append(f"| {op} {list(shape)} | {peer['candidate']} | {p:.4f} | "
                   f"{'-' if current is None else f'{current:.4f}'} | {best['ms']['p50']:.4f} | {describe(best)} | "
                   f"{p / best['ms']['p50']:.2f}x |")
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

    if device_unready(args.device, "sweep_kernels"):
        return 2
    import torch

    import pm_kernels as K

    if K.kernel_path("attention", torch.zeros(1, device=args.device)) != "triton":
        print("sweep_kernels: the Triton kernels cannot run here (pm_kernels imported before TRITON_INTERPRET=1?)",
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
        what = describe(rec) + (" (current)" if rec.get("default") else "")
        got = f"{rec['ms']['p50']:.4f} ms {rec['tflops']:7.1f} TFLOP/s err {rec['rel_err']:.1e}" \
            if rec["status"] == "ok" else f"{rec['status']}: {rec.get('error', '')[:80]}"
        print(f"{rec['op']:19} {str(rec['shape']):20} {what:40} {got}")
    print("\n".join(summary_lines(recs)))
    n_ok = sum(r["status"] == "ok" and not r["peer"] for r in recs)
    print(f"{n_ok} candidates timed in {time.perf_counter() - t0:.1f} s -> {out}")
    return 0 if n_ok else 1


if __name__ == "__main__":
    sys.exit(main())
