"""int8 UNet variants (export/quantize.py) against the fp32 UNet on onnxruntime's CPU provider:
per-step time, peak memory, file size and numeric drift, one JSON line per variant (schema
pm-bench-int8/1) appended to --out. Not a test: nothing here asserts.

For each variant the UNet is quantized once into --work/<variant>/unet.onnx (in a child process:
its time and peak RSS are recorded), then measured in a fresh child process:
  1. the UNet session, created with the onnxruntime backend's own session options
     (OnnxRuntimeBackend.session_options: ORT_ENABLE_ALL, sequential, denormals as zero,
     --threads or onnxruntime's default);
  2. per-UNet-step time: --warmup untimed then --runs timed calls on one fixed batch-2 input
     (guidance batch, latent side = resolution / 8): ms p20/p50/p80;
     peak_rss_gib = the child's VmHWM after these calls (Python, onnxruntime, the UNet session
     and its runs; no other network loaded yet);
  3. a whole image with pm_runtime.Pipeline on the bundle (fp32 text encoder and VAE decoder,
     this variant's UNet; --steps DPM-Solver++ steps, guidance 8, the same initial latents for
     every variant): the final latents and the uint8 image are saved;
     pipeline_peak_rss_gib = VmHWM at the end.
Drift (int8 vs the fp32 variant, computed by the parent from the saved arrays):
  step_*: one UNet call on the same input: max abs, mean abs, relative L2 (|a-b| / |b|)
  latents_psnr_db: final latents after the whole trajectory, peak = fp32 latents' max - min
  image_psnr_db / image_max_abs: the decoded uint8 images (peak 255)
static-qdq*: calibrated on the UNet feeds of one fp32 image with another prompt and seed
(--work/calibration.npz, --steps feeds).
Speed under load: the machine is shared, so each int8 variant is ALSO timed in an A/B child
that holds the fp32 and the int8 session and alternates calls (ab_fp32_ms_p50, ab_int8_ms_p50,
ab_speedup_p50): both see the same background load. `other_cpu_frac` is the share of all CPUs
other processes used while the variant's child ran; loadavg is /proc/loadavg before and after;
--wait-quiet waits for other processes to go idle before each timed child. Measured here: with
another process busy on one of the 2 cores, the fp32 step went from ~0.97 s to ~2.5 s (the two
intra-op threads wait on the starved one), so only records with other_cpu_frac near 0 compare.

  python benchmarks/bench_int8.py --bundle /tmp/pm-bench-run/bundle-tiny-fp32 --work /tmp/int8-tiny \\
      --out /tmp/int8-tiny.jsonl                                                   # seconds
  nice -n 5 python benchmarks/bench_int8.py --bundle /tmp/pm-bench-run/bundle-sd15-fp32 \\
      --work /tmp/int8-work/sd15 --out benchmarks/results/int8-cpu.jsonl         # ~15 min
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from records import cpu_seconds, proc_status_kib, psnr_db, wait_quiet  # noqa: E402  (shared with the other benches)

SCHEMA = "pm-bench-int8/1"
RESULT_TAG = "@@BENCH_INT8@@ "
PROMPT = "a photo of a face on a beach"
# variant -> (quantize mode, options); "fp32" is the bundle's own UNet (the reference)
VARIANTS = {
    "fp32": (None, {}),
    "dynamic-matmul": ("dynamic-matmul", {}),
    "dynamic-matmul-pc": ("dynamic-matmul", {"per_channel": True}),
    "dynamic-matmul-rr": ("dynamic-matmul", {"reduce_range": True}),
    "dynamic-matmul-conv": ("dynamic-matmul-conv", {}),
    "nbits8": ("nbits8", {}),
    "nbits8-fp32": ("nbits8-fp32", {}),
    "weight-only-qdq": ("weight-only-qdq", {}),
    "static-qdq": ("static-qdq", {"per_channel": True}),
    "static-qdq-conv": ("static-qdq-conv", {"per_channel": True}),
    "static-qdq-pct": ("static-qdq", {"per_channel": True, "calibrate": "percentile"}),
}
CALIBRATION_PROMPT = "a portrait photo of a person in a park"  # not the measured prompt / latents
REFERENCE = "fp32"


def _gib(kib: int) -> float:
    return round(kib / 2**20, 3)


def _pcts(xs) -> dict:
    import numpy as np

    a = np.asarray(xs, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(a, q)), 1) for q in (20, 50, 80)}


def _loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def _unet_feed(bundle_dir: str, side: int, seed: int):
    import numpy as np

    from pm_runtime.bundle import open_bundle

    dims = open_bundle(pathlib.Path(bundle_dir), verify=False).dims
    rng = np.random.default_rng(seed)
    h = side // dims.vae_scale_factor
    return {"sample": rng.standard_normal((2, dims.latent_channels, h, h), dtype=np.float32),
            "timestep": np.full(2, 500.0, np.float32),
            "c_k": rng.standard_normal((2, dims.max_length, dims.text_dim), dtype=np.float32),
            "c_v": rng.standard_normal((2, dims.max_length, dims.text_dim), dtype=np.float32)}


# ------------------------------------------------------------------ children
def child_quantize(args: dict) -> dict:
    from pm_export.quantize import quantize_unet_int8
    from pm_runtime.resources import peak_rss_bytes

    calibration = None
    if args.get("calibration"):
        import numpy as np

        with np.load(args["calibration"]) as z:
            n = len(z.files) // 4
            calibration = [{k: z[f"{i}_{k}"] for k in ("sample", "timestep", "c_k", "c_v")} for i in range(n)]
    facts = quantize_unet_int8(pathlib.Path(args["src"]), pathlib.Path(args["dst"]), mode=args["mode"],
                               calibration=calibration, **args["options"])
    if calibration:
        facts["calibration_feeds"] = len(calibration)
    facts["quantize_peak_rss_gib"] = _gib((peak_rss_bytes() or 0) // 1024)
    return facts


def _backend(bundle, unet_path: str, threads):
    from pm_runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtNetwork
    from pm_runtime.specs import UNET

    class Backend(OnnxRuntimeBackend):
        """The bundle's text encoder and VAE decoder, the UNet from `unet_path`."""
        last_latents = None

        def _load(self, network):
            if network != UNET:
                return super()._load(network)
            sess = self._session(pathlib.Path(unet_path), self.session_options())
            return OrtNetwork(sess, [o.name for o in sess.get_outputs()])

        def denoise(self, unet, job):
            x = super().denoise(unet, job)
            self.last_latents = x
            return x

    return Backend(bundle, threads=threads)


def child_calibrate(args: dict) -> dict:
    """UNet feeds of one fp32 image (another prompt and seed than the measured one) -> npz,
    recorded by pm_export.quantize.record_calibration."""
    import numpy as np

    from pm_export.quantize import record_calibration

    feeds = record_calibration(pathlib.Path(args["bundle"]), prompts=(CALIBRATION_PROMPT,), steps=args["steps"],
                               resolution=args["resolution"], seed=args["seed"] + 1, unet=pathlib.Path(args["unet"]))
    out = pathlib.Path(args["save"])
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **{f"{i}_{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()})
    os.replace(tmp, out)
    return {"calibration_feeds": len(feeds), "calibration_prompt": CALIBRATION_PROMPT,
            "calibration_seed": args["seed"] + 1}


def child_measure(args: dict) -> dict:
    import numpy as np
    import onnxruntime

    from pm_runtime import noise
    from pm_runtime.bundle import open_bundle
    from pm_runtime.pipeline import Pipeline
    from pm_runtime.specs import UNET

    rec = {"rss_after_imports_gib": _gib(proc_status_kib("VmRSS"))}
    bundle = open_bundle(pathlib.Path(args["bundle"]), verify=False)
    backend = _backend(bundle, args["unet"], args["threads"])
    pipe = Pipeline(bundle, backend, safety_checker=False)
    t0 = time.perf_counter()
    with backend.network(UNET) as unet:  # kept (not low-memory): the pipeline below reuses it
        sess = unet.engine.session
    rec["session_load_s"] = round(time.perf_counter() - t0, 2)
    rec["rss_after_load_gib"] = _gib(proc_status_kib("VmRSS"))
    feed = _unet_feed(args["bundle"], args["resolution"], args["seed"])
    out = None
    for _ in range(args["warmup"]):
        out = sess.run(None, feed)[0]
    times = []
    for _ in range(args["runs"]):
        t = time.perf_counter()
        out = sess.run(None, feed)[0]
        times.append(1000 * (time.perf_counter() - t))
    work = pathlib.Path(args["save"])
    np.save(work / "step_out.npy", out)
    rec.update({f"ms_{k}": v for k, v in _pcts(times).items()}, ms=[round(t, 1) for t in times],
               peak_rss_gib=_gib(proc_status_kib("VmHWM")),
               peak_rss_kind="VmHWM of the child after creating the UNet session and its timed calls")
    side = args["resolution"]
    dims = bundle.dims
    lat = noise.initial_latents(args["seed"], (1, dims.latent_channels, side // dims.vae_scale_factor,
                                               side // dims.vae_scale_factor))
    t = time.perf_counter()
    r = pipe.generate(PROMPT, latents=lat, steps=args["steps"], guidance=8.0, allow_no_concept=True)
    rec["image_s"] = round(time.perf_counter() - t, 2)
    rec["pipeline_unet_step_ms"] = round(r.timings["unet_step_ms"], 1)
    np.save(work / "latents.npy", backend.last_latents)
    np.save(work / "image.npy", r.images)
    rec["pipeline_peak_rss_gib"] = _gib(proc_status_kib("VmHWM"))
    rec["onnxruntime"] = onnxruntime.__version__
    rec["session_options"] = {"graph_optimization": backend.graph_optimization,
                              "intra_op_threads": args["threads"] or "onnxruntime default",
                              "execution_mode": "sequential", "denormal_as_zero": True}
    return rec


def child_ab(args: dict) -> dict:
    """fp32 and int8 sessions in one process, calls alternating: same background load for both."""
    from pm_runtime.bundle import open_bundle
    from pm_runtime.specs import UNET

    bundle = open_bundle(pathlib.Path(args["bundle"]), verify=False)
    sessions = {k: _backend(bundle, args[k], args["threads"]) for k in ("fp32", "int8")}
    runs = {}
    for k, be in sessions.items():
        with be.network(UNET) as net:
            runs[k] = net.engine.session
    feed = _unet_feed(args["bundle"], args["resolution"], args["seed"])
    times = {"fp32": [], "int8": []}
    for i in range(args["warmup"] + args["runs"]):
        for k in (("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")):
            t = time.perf_counter()
            runs[k].run(None, feed)
            if i >= args["warmup"]:
                times[k].append(1000 * (time.perf_counter() - t))
    p = {k: _pcts(v) for k, v in times.items()}
    return {"ab_fp32_ms_p50": p["fp32"]["p50"], "ab_int8_ms_p50": p["int8"]["p50"],
            "ab_fp32_ms": [round(x, 1) for x in times["fp32"]], "ab_int8_ms": [round(x, 1) for x in times["int8"]],
            "ab_speedup_p50": round(p["fp32"]["p50"] / p["int8"]["p50"], 3)}


CHILDREN = {"quantize": child_quantize, "measure": child_measure, "ab": child_ab, "calibrate": child_calibrate}


def run_child(kind: str, args: dict, quiet_s: float = 0.0) -> dict:
    waited = wait_quiet(quiet_s) if quiet_s else 0.0
    b0, m0 = cpu_seconds()
    load0, t0 = _loadavg(), time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "_child", kind, json.dumps(args)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    b1, m1 = cpu_seconds()
    others = max(0.0, (b1 - b0) - (m1 - m0))
    for line in r.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return {"status": "ok", **json.loads(line[len(RESULT_TAG):]), "wall_s": round(wall, 1),
                    "quiet_wait_s": waited,
                    "loadavg": [load0, _loadavg()], "other_cpu_frac": round(others / (wall * os.cpu_count()), 3)}
    return {"status": "error", "wall_s": round(wall, 1), "error": (r.stderr or r.stdout).strip().splitlines()[-5:]}


# ------------------------------------------------------------------ parent
def environment(commit: str | None) -> dict:
    import onnx
    import onnxruntime

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"commit": commit or git("rev-parse", "--short", "HEAD"),
            "dirty": None if commit else bool(git("status", "--porcelain", "--", "export/quantize.py",
                                                      "benchmarks/bench_int8.py")),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


def drift(work: pathlib.Path, variant: str) -> dict:
    import numpy as np

    def load(v, name):
        return np.load(work / v / name).astype(np.float64)

    out = {}
    a, b = load(variant, "step_out.npy"), load(REFERENCE, "step_out.npy")
    out["step_max_abs"] = float(np.abs(a - b).max())
    out["step_mean_abs"] = float(np.abs(a - b).mean())
    out["step_rel_l2"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    a, b = load(variant, "latents.npy"), load(REFERENCE, "latents.npy")
    out["latents_psnr_db"] = psnr_db(a, b, peak=float(b.max() - b.min()))
    out["latents_rel_l2"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    a, b = load(variant, "image.npy"), load(REFERENCE, "image.npy")
    out["image_psnr_db"] = psnr_db(a, b)
    out["image_max_abs"] = int(np.abs(a - b).max())
    out["image_mean_abs"] = round(float(np.abs(a - b).mean()), 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=pathlib.Path, required=True, help="an fp32 bundle (its unet.onnx is the source)")
    p.add_argument("--work", type=pathlib.Path, required=True,
                   help="folder for the quantized graphs (reused when present) and the saved outputs")
    p.add_argument("--out", type=pathlib.Path, required=True, help="JSON lines file to append to")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="fp32 (the reference) is always measured first")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="DPM-Solver++ steps of the drift trajectory")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=233)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads [default: its own]")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each timed child wait up to this many seconds for other processes to go idle")
    p.add_argument("--no-ab", action="store_true", help="skip the alternating fp32/int8 timing child")
    p.add_argument("--requantize", action="store_true", help="quantize again even when --work has the graph")
    p.add_argument("--commit", default=None, help="record this commit instead of git's HEAD")
    a = p.parse_args(argv)
    bundle = a.bundle.absolute()
    manifest = json.loads((bundle / "bundle.json").read_text())
    unet = next(c for c in manifest["components"] if c["network"] == "unet" and c["format"] == "onnx")
    src = bundle / unet["file"]
    a.work.mkdir(parents=True, exist_ok=True)
    variants = [REFERENCE] + [v for v in a.variants if v != REFERENCE]
    base = {"schema": SCHEMA, **environment(a.commit), "command": "python " + " ".join(map(shlex.quote, sys.argv)),
            "bundle": str(bundle), "unet_precision": unet["precision"],
            "unet_graph_passes": unet.get("details", {}).get("graph_optimization", {}).get("passes"),
            "resolution": a.resolution, "latent": a.resolution // 8, "batch": 2, "steps": a.steps,
            "scheduler": "dpmpp-2m", "guidance": 8.0, "runs": a.runs, "warmup": a.warmup, "reference": REFERENCE}
    common = {"bundle": str(bundle), "resolution": a.resolution, "steps": a.steps, "runs": a.runs,
              "warmup": a.warmup, "seed": a.seed, "threads": a.threads}
    status = 0
    ref_ms = None
    for v in variants:
        mode, options = VARIANTS[v]
        vdir = a.work / v
        vdir.mkdir(exist_ok=True)
        rec = {**base, "variant": v, "mode": mode or "fp32", "options": options}
        path = src if mode is None else vdir / "unet.onnx"
        if mode is not None:
            facts_file = vdir / "quantize.json"
            if a.requantize or not path.is_file() or not facts_file.is_file():
                calib = None
                if mode.startswith("static"):
                    calib = a.work / "calibration.npz"
                    if not calib.is_file():
                        print("recording calibration feeds (fp32 UNet, another prompt and seed) ...", flush=True)
                        c = run_child("calibrate", {**common, "unet": str(src), "save": str(calib)})
                        if c["status"] != "ok":
                            print(json.dumps({**rec, **c}), flush=True)
                            status = 1
                            continue
                print(f"quantizing {v} ...", flush=True)
                q = run_child("quantize", {"src": str(src), "dst": str(path), "mode": mode, "options": options,
                                           "calibration": str(calib) if calib else None})
                if q["status"] != "ok":
                    print(json.dumps({**rec, **q}), flush=True)
                    status = 1
                    continue
                q.pop("status")
                facts_file.write_text(json.dumps(q))
            rec["quantize"] = json.loads(facts_file.read_text())
            size = rec["quantize"]["bytes_after"]
        else:
            size = sum((bundle / f).stat().st_size for f in [unet["file"], *[d["file"] for d in unet["data_files"]]])
        rec["size_gb"] = round(size / 1e9, 3)
        print(f"measuring {v} ...", flush=True)
        m = run_child("measure", {**common, "unet": str(path), "save": str(vdir)}, a.wait_quiet)
        rec.update(m)
        if m["status"] != "ok":
            status = 1
        elif v == REFERENCE:
            ref_ms = m["ms_p50"]
        else:
            rec["drift"] = drift(a.work, v)
            if ref_ms:
                rec["speedup_vs_fp32_p50"] = round(ref_ms / m["ms_p50"], 3)
            if not a.no_ab:
                print(f"A/B timing {v} against fp32 ...", flush=True)
                ab = run_child("ab", {**common, "fp32": str(src), "int8": str(path)}, a.wait_quiet)
                rec["ab"] = ab
        line = json.dumps(rec)
        print(line, flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            f.write(line + "\n")
    return status


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        print(RESULT_TAG + json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))), flush=True)
    else:
        sys.exit(main())
