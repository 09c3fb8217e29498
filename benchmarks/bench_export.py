"""Export benchmark: pm-export's wall time, peak RAM and bundle size, one JSON line per export.

Each export runs in a fresh interpreter so its peak RSS is its own (the issue's budget: a full
SD1.5 export under 16 GB; the fp16 ONNX bundle <= 2.2 GB). The concept is an untrained mapper
for the model (export cost does not depend on training). Not a test: nothing here asserts.

  python benchmarks/bench_export.py --model tiny --out benchmarks/results/export-cpu.jsonl
  python benchmarks/bench_export.py --model sd15 --out benchmarks/results/export-cpu.jsonl   # minutes
  python benchmarks/bench_export.py --model sd15 --precision fp32 --int8 static-qdq   # + the int8 UNet step
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
if __package__:  # imported as pm_bench.bench_export
    from .random_models import make_sd15_shaped_model, make_tiny, make_untrained_concept
    from .records import environment  # commit, device, versions: one record header for all benches
else:  # run as a script: this tree's pm_runtime and the sibling modules
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from random_models import make_sd15_shaped_model, make_tiny, make_untrained_concept
    from records import environment

# The child's own high-water mark (pm_runtime.resources: VmHWM on Linux; ru_maxrss of a forked child
# also counts the parent's peak there, which would inflate the figure by the model the parent built).
CHILD = ("from pm_export.cli import main\nfrom pm_runtime.resources import peak_rss_bytes\ntry:\n    main()\n"
         "finally:\n    print(f'PEAK_RSS_KIB={(peak_rss_bytes() or 0) // 1024}', flush=True)\n")


def _sizes(bundle: pathlib.Path) -> dict:
    from pm_runtime.bundle import open_bundle

    b = open_bundle(bundle)
    nets = sum((bundle / f).stat().st_size for c in b.components
               for f in [c["file"], *(d["file"] for d in c.get("data_files", []))])
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    checks = {c["network"] if "network" in c else c["file"]: c.get("validation") for c in b.components}
    return {"network_files_bytes": nets, "bundle_bytes": total, "validation": checks}


def run_export(model: pathlib.Path, concept: pathlib.Path, out: pathlib.Path, precision: str,
               int8: str | None = None) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, str(concept), "--model", str(model), "--out", str(out),
                        "--precision", precision, *(["--int8", int8] if int8 else [])], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rec = {"precision": precision, "int8": int8, "wall_s": round(wall, 1),
           "status": "ok" if r.returncode == 0 else "error"}
    if "PEAK_RSS_KIB=" in r.stdout:
        rec["peak_rss_bytes"] = int(r.stdout.rsplit("PEAK_RSS_KIB=", 1)[1].split()[0]) * 1024
    if r.returncode != 0:
        rec["error"] = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return rec
    rec.update(_sizes(out))
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--precision", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    p.add_argument("--int8", default=None, help="pm-export --int8 MODE for the fp32 exports (e.g. static-qdq)")
    p.add_argument("--commit", default=None, help="commit to record (when the tree has no .git)")
    p.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "export-cpu.jsonl")
    args = p.parse_args()
    env = environment("cpu", args.commit)
    with tempfile.TemporaryDirectory(prefix="pm-bench-export-") as tmp:
        root = pathlib.Path(tmp)
        t0 = time.perf_counter()
        model = (make_tiny(root / "model") if args.model == "tiny"
                 else make_sd15_shaped_model(root / "model", seed=0, image_encoder=False))
        concept = make_untrained_concept(model, root / "concept.pt")
        print(f"{args.model} model + concept ready in {time.perf_counter() - t0:.1f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for precision in args.precision:
            rec = {"schema": "pm-bench-export/1", **env, "model": args.model, "device": "cpu",
                   "command": " ".join(sys.argv),
                   **run_export(model, concept, root / f"b-{precision}", precision,
                                args.int8 if precision == "fp32" else None)}
            with args.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            gib = rec.get("peak_rss_bytes", 0) / 2**30
            size = rec.get("network_files_bytes", 0) / 1e9
            print(f"{args.model} {precision}: {rec['status']}, {rec['wall_s']} s, peak RSS {gib:.2f} GiB, "
                  f"network files {size:.3f} GB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
