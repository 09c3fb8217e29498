"""onnxruntime graph optimisation benchmark (CPU): the exported UNet, plain vs optimised.

One JSON line per variant. Every heavy step (the export, the optimiser, each timed session) runs
in a fresh interpreter, so each peak RSS is that step's own. Not a test: nothing here asserts.

Variants (all on CPUExecutionProvider, same inputs, same warm-up and iterations):
  plain                    the exported fp32 graph, session ORT_ENABLE_ALL (what pm-run does)
  plain-noopt              the same graph, session ORT_DISABLE_ALL (what session-level optimisation buys)
  optimized                export/optimize.py's CPU passes (what pm-export ships), session ORT_ENABLE_ALL
  plain-offline-all        the plain graph after ORT_ENABLE_ALL saved offline (optimized_model_filepath),
                           loaded with ORT_DISABLE_ALL (load time without re-optimising)
  optimized-offline-all    the same, from the optimised graph
Each per-variant record has: the time and peak RSS of making the variant's file ("prep"), the
session load time, p20/p50/p80 of the UNet call, the run's peak RSS (VmHWM) and the max abs
difference of its output from the `plain` variant's on the same inputs. Then one more record,
"ab:plain|optimized": both graphs in ONE process, calls alternating, so that other work on the
machine hits both alike. The per-variant runs are separate processes one after another: on a
shared machine their p50s also measure who else was running (each record carries the 1-min load
average before it); compare speed with the "ab" record.

  python benchmarks/bench_ort_opt.py --model tiny --iters 20 --ab-rounds 20
  python benchmarks/bench_ort_opt.py --model sd15 --resolution 256 --batch 2 --iters 3 \
      --model-dir /tmp/sd15-random            # minutes; exports the UNet only (~3.4 GB fp32 ONNX)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
if __package__:  # imported as pm_bench.bench_ort_opt
    from .random_models import make_sd15_shaped_model, make_tiny
    from .records import environment, versions  # commit, device, versions: one record header for all benches
else:  # run as a script (also each child): this tree's pm_runtime and the sibling modules
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from random_models import make_sd15_shaped_model, make_tiny
    from records import environment, versions
from pm_runtime.resources import peak_rss_bytes  # noqa: E402  (after the path set-up above)

VARIANTS = ("plain", "plain-noopt", "optimized", "plain-offline-all", "optimized-offline-all")


# ------------------------------------------------------------------ children (one per heavy step)
def _unet_spec(unet_config: dict):
    from pm_runtime.specs import UNET, ModelDims, network_specs

    dims = ModelDims(text_dim=int(unet_config["cross_attention_dim"]), latent_channels=int(unet_config["in_channels"]))
    return network_specs(dims)[UNET]


def child_export(model_dir: str, out: str) -> dict:
    """Only the UNet (UNetGraph with split K/V, as pm-export writes it)."""
    import torch
    from diffusers import UNet2DConditionModel

    from pm_export.onnx_export import export_network
    from pm_runtime.modeling.graphs import UNetGraph
    from pm_runtime.modeling.attention import install_split_kv

    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(pathlib.Path(model_dir) / "unet", local_files_only=True,
                                                torch_dtype=torch.float32).eval().requires_grad_(False)
    install_split_kv(unet)
    spec = _unet_spec(dict(unet.config))
    files = export_network(UNetGraph(unet).eval(), spec, pathlib.Path(out))
    return {"seconds": time.perf_counter() - t0, "files": [str(f) for f in files],
            "bytes": sum(pathlib.Path(f).stat().st_size for f in files)}


def child_optimize(src: str, dst: str) -> dict:
    from pm_export.optimize import optimize_graph
    from pm_runtime.specs import UNET

    r = optimize_graph(pathlib.Path(src), pathlib.Path(dst), UNET)
    return {"seconds": r.seconds, "graph_optimization": r.to_dict()}


def _session(path: str, level: str, save: str | None = None, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if threads:
        opts.intra_op_num_threads = threads
    if save:
        opts.optimized_model_filepath = save
        # > 2 GB: the optimised graph's weights go to one external file beside it
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      pathlib.Path(save).name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def child_offline(src: str, dst: str) -> dict:
    t0 = time.perf_counter()
    _session(src, "ORT_ENABLE_ALL", save=dst)
    return {"seconds": time.perf_counter() - t0}


def child_run(path: str, level: str, unet_config: str, batch: int, side: int, warmup: int, iters: int,
              out_npy: str, threads: int) -> dict:
    import numpy as np

    spec = _unet_spec(json.loads(unet_config))
    lat = side // 8
    feeds = spec.dummy_inputs(np.random.default_rng(0), "opt", batch=batch, latent_height=lat, latent_width=lat)
    t0 = time.perf_counter()
    sess = _session(path, level, threads=threads)
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_bytes()
    out = None
    for _ in range(warmup):
        out = sess.run(None, feeds)[0]
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        out = sess.run(None, feeds)[0]
        times.append((time.perf_counter() - t) * 1e3)
    np.save(out_npy, out)
    p20, p50, p80 = (float(np.percentile(times, q)) for q in (20, 50, 80))
    return {"load_s": round(load_s, 3), "p20_ms": round(p20, 2), "p50_ms": round(p50, 2), "p80_ms": round(p80, 2),
            "times_ms": [round(t, 2) for t in times], "peak_rss_after_load_bytes": rss_after_load}


def child_ab(paths: dict, unet_config: str, batch: int, side: int, rounds: int, threads: int) -> dict:
    """Both graphs loaded in one process, calls alternating (ABBA...): drift and other work on the
    machine hit both alike, which separate processes one after another do not guarantee."""
    import numpy as np

    spec = _unet_spec(json.loads(unet_config))
    lat = side // 8
    feeds = spec.dummy_inputs(np.random.default_rng(0), "opt", batch=batch, latent_height=lat, latent_width=lat)
    sessions = {}
    for name, path in paths.items():
        sessions[name] = _session(path, "ORT_ENABLE_ALL", threads=threads)
        sessions[name].run(None, feeds)  # warm-up
    times: dict[str, list] = {name: [] for name in paths}
    order = list(paths)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {"ab": {n: {"p20_ms": round(float(np.percentile(t, 20)), 2), "p50_ms": round(float(np.percentile(t, 50)), 2),
                       "p80_ms": round(float(np.percentile(t, 80)), 2), "times_ms": [round(x, 2) for x in t]}
                   for n, t in times.items()}}


CHILDREN = {"export": child_export, "optimize": child_optimize, "offline": child_offline, "run": child_run,
            "ab": child_ab}


def _child_main(argv: list[str]) -> int:
    task, args = argv[0], json.loads(argv[1])
    try:
        rec = {"status": "ok", **CHILDREN[task](**args)}
    except Exception as e:  # recorded, the run goes on
        rec = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}"}
    rec["peak_rss_bytes"] = peak_rss_bytes()
    print("RESULT=" + json.dumps(rec), flush=True)
    return 0


def run_child(task: str, **kw) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "_child", task, json.dumps(kw)], capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT=")]
    if not lines:
        return {"status": "error", "error": (r.stderr or r.stdout).strip().splitlines()[-3:],
                "wall_s": round(time.perf_counter() - t0, 1)}
    rec = json.loads(lines[-1][len("RESULT="):])
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    return rec


# ------------------------------------------------------------------ parent
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--model-dir", type=pathlib.Path, default=None, help="model folder to build or reuse")
    p.add_argument("--work-dir", type=pathlib.Path, default=None,
                   help="keep the exported/optimised graphs here (reused when present)")
    p.add_argument("--resolution", type=int, default=256, help="image side in px (latent = side / 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--ab-rounds", type=int, default=6,
                   help="interleaved plain-vs-optimized calls in one process after the variants (0: skip)")
    p.add_argument("--commit", default=None, help="commit to record (when the tree has no .git)")
    p.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "ort-opt-cpu.jsonl")
    args = p.parse_args()

    import numpy as np

    env = {**environment("cpu", args.commit), **versions(("onnxruntime", "onnx"))}
    tmp = tempfile.TemporaryDirectory(prefix="pm-bench-ortopt-")
    work = args.work_dir or pathlib.Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or work / "model"
    t0 = time.perf_counter()
    model_dir = (make_tiny(model_dir) if args.model == "tiny"
                 else make_sd15_shaped_model(model_dir, seed=0, image_encoder=False))
    print(f"{args.model} model ready in {time.perf_counter() - t0:.1f} s: {model_dir}", flush=True)
    unet_config = (model_dir / "unet" / "config.json").read_text()
    header = {"schema": "pm-bench-ort-opt/1", **env, "model": args.model, "device": "cpu",
              "provider": "CPUExecutionProvider", "precision": "fp32", "resolution": args.resolution,
              "batch": args.batch, "warmup": args.warmup, "iters": args.iters, "threads": args.threads,
              "command": " ".join(sys.argv)}

    plain, opt = work / "unet.onnx", work / "unet.opt.onnx"
    prep: dict[str, dict] = {}
    if not plain.is_file():
        prep["plain"] = run_child("export", model_dir=str(model_dir), out=str(plain))
        print(f"export: {_brief(prep['plain'])}", flush=True)
    needs_opt = {"optimized", "optimized-offline-all"} & set(args.variants)
    if needs_opt and not opt.is_file():
        prep["optimized"] = run_child("optimize", src=str(plain), dst=str(opt))
        print(f"optimize: {_brief(prep['optimized'])}", flush=True)
    sources = {"plain": (plain, "ORT_ENABLE_ALL"), "plain-noopt": (plain, "ORT_DISABLE_ALL"),
               "optimized": (opt, "ORT_ENABLE_ALL")}
    for name, src in (("plain-offline-all", plain), ("optimized-offline-all", opt)):
        if name in args.variants:
            dst = work / f"{src.stem}.offline-all.onnx"
            if not dst.is_file():
                prep[name] = run_child("offline", src=str(src), dst=str(dst))
                print(f"offline {name}: {_brief(prep[name])}", flush=True)
            sources[name] = (dst, "ORT_DISABLE_ALL")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    ref = None
    for name in [v for v in VARIANTS if v in args.variants]:
        path, level = sources[name]
        npy = work / f"out-{name}.npy"
        load_before = round(os.getloadavg()[0], 2)  # other work on the machine shows here
        rec = run_child("run", path=str(path), level=level, unet_config=unet_config, batch=args.batch,
                        side=args.resolution, warmup=args.warmup, iters=args.iters, out_npy=str(npy),
                        threads=args.threads)
        full = {**header, "variant": name, "session_level": level, "file": path.name,
                "loadavg_1min_before": load_before, **rec}
        made_by = {"plain": "plain", "plain-noopt": "plain"}.get(name, name)  # the step that made the file
        if made_by in prep:
            full["prep"] = {k: v for k, v in prep[made_by].items() if k != "graph_optimization"}
            if "graph_optimization" in prep[made_by]:
                full["graph_optimization"] = prep[made_by]["graph_optimization"]
        if rec["status"] == "ok":
            out = np.load(npy)
            if ref is None and name == "plain":
                ref = out
            if ref is not None:
                full["max_abs_diff_vs_plain"] = float(np.abs(out.astype(np.float64) - ref).max())
                full["ref_max_abs"] = float(np.abs(ref).max())
        with args.out.open("a") as f:
            f.write(json.dumps(full) + "\n")
        print(f"{args.model} {args.resolution}px b{args.batch} {name:22s} {_brief(full)}", flush=True)
    if args.ab_rounds and {"plain", "optimized"} <= set(sources):
        load_before = round(os.getloadavg()[0], 2)
        rec = run_child("ab", paths={"plain": str(plain), "optimized": str(opt)}, unet_config=unet_config,
                        batch=args.batch, side=args.resolution, rounds=args.ab_rounds, threads=args.threads)
        full = {**header, "variant": "ab:plain|optimized", "session_level": "ORT_ENABLE_ALL", "iters": args.ab_rounds,
                "loadavg_1min_before": load_before, **rec}
        with args.out.open("a") as f:
            f.write(json.dumps(full) + "\n")
        for name, r in rec.get("ab", {}).items():
            print(f"{args.model} {args.resolution}px b{args.batch} ab {name:19s} " + ", ".join(
                f"{k} {r[k]:.4g}" for k in ("p50_ms", "p20_ms", "p80_ms")), flush=True)
        if rec["status"] != "ok":
            print(f"ab: {_brief(rec)}", flush=True)
    tmp.cleanup()
    return 0


def _brief(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('error')}"
    bits = []
    for k in ("p50_ms", "p20_ms", "p80_ms", "load_s", "seconds", "max_abs_diff_vs_plain"):
        if k in r:
            bits.append(f"{k} {r[k]:.4g}" if isinstance(r[k], float) else f"{k} {r[k]}")
    bits.append(f"peak RSS {r.get('peak_rss_bytes', 0) / 2**30:.2f} GiB")
    return ", ".join(bits)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit(main())
