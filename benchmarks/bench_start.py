"""Start-up of the torch-cuda backend: a NEW process, from the interpreter's start to its first
image, split into phases, for the current way and the way before it, in the same run. Not a test:
nothing here asserts.

Variants (each run in a fresh interpreter, interleaved run by run):
  standalone       the default on a warm machine: the networks built with torch alone
                   (pm_runtime/modeling/standalone.py, no diffusers/transformers import), the weight
                   files already recorded as hashed and unchanged (pm_runtime/bundle.py: the parent
                   hashes the bundle once before the runs, into a record file of its own)
  standalone-rehash  the same with no such record (PM_VERIFIED_CACHE=0): every weight file hashed,
                   in background threads while it loads (Bundle.verifying)
  hf-verify-first  how it started before: diffusers/transformers classes (hf_modules=True) and every
                   network file of the bundle hashed before loading, every time (verify_all, no record)
  standalone-no-verify  the default without any hashing (verify=False): what the checksums cost
  standalone-cudnn-heuristics  the default with cudnn_benchmark=False (cuDNN's heuristics instead of
                   timing every convolution algorithm in the new process's first image)
  cold             the default's first start on a new machine: an EMPTY Triton kernel cache (a new
                   TRITON_CACHE_DIR per run: every pm_kernels kernel compiled in the process), no
                   kernel tuning choices (a new PM_KERNELS_TUNE_DIR: the tuning session's step runs,
                   every candidate compiled and timed, for at most --cold-tune-budget seconds: the
                   tuning budget, PM_KERNELS_TUNE_BUDGET_S) and no hash record (every weight file hashed
                   while it loads). The OS's file cache is
                   not emptied (that would need root and touches the whole machine): the weight
                   files' reads may still come from memory.
Phases (child's perf_counter, from its first line): import_s (pm_runtime.pipeline + torch +
the backend module), load_s (Pipeline.load, hashing included), first_image_s (one generate);
process_wall_s is the parent's wall time around the whole child (interpreter start included);
tuning_s / tuned_calls / tuning_cut: what the child spent measuring kernel candidates (part of its
first image), for how many calls, and how many it left to the next run (its budget spent);
tune_budget_s: that budget as the child read it.
`imported` lists which of diffusers / transformers / torch._dynamo the child ended up importing.

  python benchmarks/bench_start.py --bundle /tmp/pm-bench-run/bundle-sd15-torch --device cpu \\
      --size 256 --steps 1 --runs 3 --out benchmarks/results/start-cpu.jsonl
  (on a GPU: --device cuda --size 512 --steps 50; benchmarks/gpu_check.sh runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
if __package__:
    from .records import environment, save_records
else:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from records import environment, save_records

SCHEMA = "pm-bench-start/1"
TAG = "@@START@@ "
VARIANTS = ("standalone", "standalone-rehash", "hf-verify-first", "standalone-no-verify", "standalone-cudnn-heuristics",
            "cold")
PROMPT = "a photo of <persona> as a knight"

CHILD = """
import time
t0 = time.perf_counter()
import json, sys
from pm_runtime.pipeline import Pipeline
from pm_runtime.bundle import open_bundle
import torch
import pm_runtime.backends.torch_cuda
t1 = time.perf_counter()
variant, bundle, device, steps, size = json.loads(sys.argv[1])
if variant == "hf-verify-first":
    b = open_bundle(bundle)
    b.verify_all()
    pipe = Pipeline.load(b, backend="torch-cuda", device=device, hf_modules=True)
else:
    pipe = Pipeline.load(bundle, backend="torch-cuda", device=device, verify=variant != "standalone-no-verify",
                         cudnn_benchmark=variant != "standalone-cudnn-heuristics")
if device.startswith("cuda"):
    torch.cuda.synchronize()
t2 = time.perf_counter()
g = pipe.generate(%r, seed=233, steps=steps, height=size, width=size)
t3 = time.perf_counter()
imported = sorted(m for m in ("diffusers", "transformers", "torch._dynamo") if m in sys.modules)
import pm_kernels
tuning_s, tuned_calls = pm_kernels.tuning.spent()
print(%r + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t2, "imported": imported,
                       "tuning_s": tuning_s, "tuned_calls": tuned_calls, "tuning_cut": pm_kernels.tuning.cut_short(),
                       "tune_budget_s": pm_kernels.tuning.BUDGET_S,
                       "timings": {k: v for k, v in g.timings.items() if isinstance(v, (int, float))}}))
""" % (PROMPT, TAG)


def run_child(variant: str, bundle: str, device: str, steps: int, size: int, record: str,
              timeout: float = 600, tune_budget: float | None = None) -> dict:
    env = dict(os.environ, PM_VERIFIED_CACHE=record if variant in ("standalone", "standalone-cudnn-heuristics")
               else "0")
    with tempfile.TemporaryDirectory(prefix="pm-cold-triton-") as cache:
        if variant == "cold":
            env["TRITON_CACHE_DIR"] = cache  # empty: every Triton kernel compiles in this process
            env["PM_KERNELS_TUNE_DIR"] = os.path.join(cache, "tuning")  # and every tunable call is timed
            if tune_budget is not None:  # for at most this long (the rest: the next run's)
                env["PM_KERNELS_TUNE_BUDGET_S"] = str(tune_budget)
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, "-c", CHILD, json.dumps([variant, bundle, device, steps, size])],
                               capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:  # what it says is a figure too: the start takes longer than this
            return {"status": "error", "error": f"timed out: no first image within {timeout:.0f} s",
                    "timed_out_s": round(timeout, 1)}
        wall = time.perf_counter() - t0
    lines = [ln[len(TAG):] for ln in r.stdout.splitlines() if ln.startswith(TAG)]
    if r.returncode or not lines:
        return {"status": "error", "error": (r.stderr or r.stdout)[-800:]}
    return {"status": "ok", "process_wall_s": wall, **json.loads(lines[-1])}


def p50(values):
    return round(statistics.median(values), 3) if values else None


def _record(v: str, rs: list[dict], a, env: dict, command: str) -> dict:
    ok = [r for r in rs if r["status"] == "ok"]
    return {"schema": SCHEMA, **env, "variant": v, "bundle": pathlib.Path(a.bundle).name, "size": a.size,
            "steps": a.steps, "runs": len(rs), "ok_runs": len(ok), "command": command,
            **{f"{k}_p50": p50([r[k] for r in ok]) for k in ("process_wall_s", "import_s", "load_s",
                                                              "first_image_s", "tuning_s")},
            "tune_budget_s": ok[0].get("tune_budget_s") if ok else None,  # as the child's pm_kernels read it
            "imported": ok[0]["imported"] if ok else None,
            "per_run": [{k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items() if k != "timings"}
                        for r in rs]}


def main(argv=None) -> int:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, help="a bundle with torch weights (pm-export --target torch)")
    ap.add_argument("--device", default="cpu", help="cpu (eager, the kernels' references) or cuda")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child-timeout", type=float, default=600.0,
                    help="seconds a child process may take to its first image; a slower one is recorded as timed "
                         "out (the other variants' records are kept)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds this whole command may take (e.g. the time limit it runs under): each child's "
                         "timeout is cut to what is left less a margin, so a child that runs out of time is still "
                         "recorded as timed out; each variant's record is written as its last run ends")
    ap.add_argument("--cold-tune-budget", type=float, default=None,
                    help="seconds the cold variant may spend tuning kernels (PM_KERNELS_TUNE_BUDGET_S in its "
                         "process; default: that variable here, else pm_kernels' default); what is left is the "
                         "next run's, and the record says how many calls that was")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", type=pathlib.Path, default=None, help="append the records to this JSON-lines file")
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    # the baseline first in each run: its record exists when the others' are written (their speed-up)
    variants.sort(key=lambda v: v != "hf-verify-first")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    record = str(pathlib.Path(tempfile.mkdtemp(prefix="pm-bench-start-")) / "verified.json")
    os.environ["PM_VERIFIED_CACHE"] = record
    from pm_runtime.bundle import open_bundle

    open_bundle(pathlib.Path(a.bundle)).verify_all()  # the warm machine's record for "standalone"
    command = "python benchmarks/bench_start.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env, records = None, []
    margin = 5.0  # what the parent needs after a child to write its record line
    header = 8.0  # and, before the first record, to make the records' header (environment(): torch, the GPU)
    for i in range(a.runs):
        for v in variants:  # interleaved: drift in the machine's state hits every variant alike
            timeout = a.child_timeout
            if a.deadline is not None:
                left = a.deadline - (time.perf_counter() - t_start) - margin - (header if env is None else 0.0)
                timeout = min(timeout, max(1.0, left))
            r = run_child(v, str(a.bundle), a.device, a.steps, a.size, record, timeout=timeout,
                          tune_budget=a.cold_tune_budget)
            runs[v].append(r)
            print(f"run {i + 1} {v}: " + (f"process {r['process_wall_s']:.2f} s = import {r['import_s']:.2f} + load "
                                          f"{r['load_s']:.2f} + first image {r['first_image_s']:.2f} (+ interpreter); "
                                          f"imported {r['imported']}" if r["status"] == "ok" else r["error"]),
                  flush=True)
            if i == a.runs - 1:  # the variant's last run: its record now (a run cut short keeps it)
                if env is None:
                    env = environment(a.device, a.commit)
                rec = _record(v, runs[v], a, env, command)
                base = rec if v == "hf-verify-first" else next((b for b in records
                                                                 if b["variant"] == "hf-verify-first"), None)
                if base and base["process_wall_s_p50"] and rec["process_wall_s_p50"]:
                    rec["process_speedup_vs_hf_verify_first"] = round(
                        base["process_wall_s_p50"] / rec["process_wall_s_p50"], 2)
                records.append(rec)
                save_records(a.out, [rec])
    for r in records:
        print(f"{r['variant']:22s} process {r['process_wall_s_p50']} s  import {r['import_s_p50']}  load "
              f"{r['load_s_p50']}  first image {r['first_image_s_p50']}  "
              f"x{r.get('process_speedup_vs_hf_verify_first', '-')}")
    return 0 if all(r["ok_runs"] == r["runs"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
