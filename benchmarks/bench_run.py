"""pm-run's generation benchmark (CPU): the onnxruntime backend against diffusers' PyTorch pipeline
on the same SD-1.5-shaped random model, same resolution, steps, scheduler and latents, same run.

One JSON line per variant (schema pm-bench-run/1), appended to --out. Each variant runs in a
fresh interpreter, so its peak RSS (VmHWM: imports, loading and generation) is its own.
Not a test: nothing here asserts.

Variants:
  diffusers-fp32   StableDiffusionPipeline (torch CPU, fp32, diffusers' default SDPA attention),
                   DPMSolverMultistepScheduler from the model's config, safety checker off.
                   The peer: every speed and memory ratio is against it.
  ort-fp32         pm_runtime.Pipeline, backend onnxruntime, the fp32 bundle, sessions kept
                   loaded (load time reported apart, not in the per-image time).
  ort-fp32-lowmem  the same with low_memory=True: each network is loaded when its stage starts
                   and freed when it ends (one network in memory at a time); the session
                   creation is INSIDE every image's time.
  ort-fp32-lowmem-cached
                   low_memory=True with the onnxruntime optimised-graph cache (cache_dir): the
                   sessions load pre-optimised graphs (made once, in the warm-up image).
  ort-int8, ort-int8-lowmem-cached
                   the same two settings on a second bundle exported with `pm-export --int8
                   static-qdq` (int8 UNet, calibrated during the export).
  ort-int8-vae     ort-fp32's setting on a fourth bundle exported with `pm-export --int8 static-qdq
                   --int8-vae` (int8 UNet and int8 VAE decoder, both calibrated during the export).
  torch-fp32, torch-bf16
                   pm_runtime.Pipeline, backend torch-cuda on the CPU (device cpu: eager, FastUNet
                   with the kernels' PyTorch paths) in float32 / bfloat16, from a third bundle
                   holding the fp16 torch weights (`pm-export --target torch`). bfloat16 is fast
                   only where the CPU has bfloat16 matrix units (the record's `cpu_bf16_units`:
                   amx_bf16, avx512_bf16; None: flags unknown; `cpu_dtype_note`: the backend's warning where
                   the CPU has no units for the variant's dtype). Their convolutions run with oneDNN-packed weights
                   (the record's `packed_convs`).
  torch-bf16-unpacked
                   torch-bf16 with plain convolutions (cpu_packed_convs=False): the A/B.
  torch-fp16       the torch variant in float16 (plain convolutions: packing is float32/bfloat16
                   only). Not in the default set: 9x slower than float32 on a Xeon without float16 units.
The drift of every variant of ours but ort-fp32 against fp32 is in its record:
`psnr_vs_ort_fp32_db` / `max_abs_diff_vs_ort_fp32` (uint8 image against ort-fp32's, same
latents) when ort-fp32 ran in the same run.
Other processes on the machine skew CPU timings: each record carries `other_cpu_frac`, the share
of all CPUs that other processes used while the variant ran (from /proc/stat); --wait-quiet
waits for them to go idle before each variant, and --retries re-measures a variant whose
other_cpu_frac exceeds --max-other-frac (the discarded fractions are recorded).

Timing unit: one image end to end (text encoder, `--steps` UNet calls with batch 2 for guidance,
VAE decode, to uint8), `--warmup` untimed images then `--runs` timed ones; p20/p50/p80.
Both sides use the same plain prompt (no concept word: diffusers has no PersonaMagic) and the
project's initial latents, so their images can be compared: `max_abs_diff_vs_peer` (uint8).

The model (random weights, SD 1.5's shapes), an untrained concept and the fp32 bundle are built
once into --cache and reused (the SD-1.5-shaped export takes minutes and ~9 GB here).

  pm-bench --model tiny --steps 10 --runs 3                # seconds (= python benchmarks/bench_run.py ...)
  pm-bench --model sd15 --resolution 256 --steps 10 --runs 3 \\
      --cache /tmp/pm-bench-run --out benchmarks/results/run-cpu.jsonl          # many minutes

The options are pm-bench's (benchmarks/cli.py parses them into RunOptions; run() does the work).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = pathlib.Path(__file__).resolve().parent
if __package__:  # imported as pm_bench.bench_run (pm-bench, an installed wheel)
    from .random_models import make_sd15_shaped_model, make_tiny, make_untrained_concept
    from .records import append_jsonl, cpu_seconds, environment, failure, pcts, psnr_db, results_dir, wait_quiet
else:  # run as a script (also each variant's child process): this tree's pm_runtime, the sibling modules
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from random_models import make_sd15_shaped_model, make_tiny, make_untrained_concept
    from records import append_jsonl, cpu_seconds, environment, failure, pcts, psnr_db, results_dir, wait_quiet
from pm_runtime.resources import peak_rss_bytes  # noqa: E402  (after the path set-up above)

SCHEMA = "pm-bench-run/1"
VARIANTS = ("diffusers-fp32", "ort-fp32", "ort-fp32-lowmem", "ort-fp32-lowmem-cached", "ort-int8",
            "ort-int8-lowmem-cached", "ort-int8-vae", "torch-fp32", "torch-bf16", "torch-bf16-unpacked", "torch-fp16")
# run by default: all but torch-fp16 (float16 on a CPU without float16 units is emulated: minutes per image)
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "torch-fp16")
TORCH_DTYPES = {"torch-fp32": "float32", "torch-bf16": "bfloat16", "torch-bf16-unpacked": "bfloat16",
                "torch-fp16": "float16"}
# the torch-cuda backend's options per variant: -unpacked is the A/B of its packed CPU convolutions
TORCH_OPTIONS = {"torch-bf16-unpacked": {"cpu_packed_convs": False}}
PEER = "diffusers-fp32"
FP32 = "ort-fp32"  # the int8 variants' drift is measured against this one's image
INT8_MODE = "static-qdq"
RESULT_TAG = "@@BENCH_RUN@@ "
PROMPT = "a photo of a face on a beach"
# the bundles prepare() exports into --cache, by the key the children's args name them with:
# (folder name suffix, pm-export options)
BUNDLES = {"bundle": ("fp32", []), "bundle_int8": (f"int8-{INT8_MODE}", ["--int8", INT8_MODE]),
           "bundle_int8_vae": (f"int8-{INT8_MODE}-vae", ["--int8", INT8_MODE, "--int8-vae"]),
           "bundle_torch": ("torch", ["--target", "torch"])}


def bundle_dir(cache: pathlib.Path, model: str, kind: str) -> pathlib.Path:
    return cache / f"bundle-{model}-{BUNDLES[kind][0]}"


def _component(bundle: pathlib.Path, network: str) -> dict:
    """A network's component in an exported bundle's manifest."""
    return next(c for c in json.loads((bundle / "bundle.json").read_text())["components"] if c["network"] == network)


# ------------------------------------------------------------------ children
def child(variant: str, args: dict) -> dict:
    import numpy as np

    from pm_runtime import noise

    side, steps = args["resolution"], args["steps"]
    lat = noise.initial_latents(args["seed"], (1, 4, side // 8, side // 8))
    t0 = time.perf_counter()
    rec: dict = {}
    if variant == "diffusers-fp32":
        import torch
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        from pm_runtime.train.templates import NEGATIVE_PROMPT

        torch.set_grad_enabled(False)
        pipe = StableDiffusionPipeline.from_pretrained(args["model"], safety_checker=None, torch_dtype=torch.float32,
                                                       local_files_only=True)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0

        def one():
            out = pipe(PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=steps, guidance_scale=8.0,
                       latents=torch.from_numpy(lat), height=side, width=side, output_type="np").images
            return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8), {}

        rec.update(backend=f"diffusers {__import__('diffusers').__version__} torch {torch.__version__} cpu",
                   precision="fp32", torch_threads=torch.get_num_threads())
    elif variant in TORCH_DTYPES:
        import torch

        from pm_runtime.pipeline import Pipeline
        from pm_runtime.resources import cpu_16bit_units

        pipe = Pipeline.load(args["bundle_torch"], backend="torch-cuda", device="cpu", dtype=TORCH_DTYPES[variant],
                             safety_checker=False, **TORCH_OPTIONS.get(variant, {}))
        load_s = time.perf_counter() - t0

        def one():
            r = pipe.generate(PROMPT, latents=lat, steps=steps, guidance=8.0, allow_no_concept=True)
            return r.images, r.timings

        rec.update(precision=TORCH_DTYPES[variant], torch_threads=torch.get_num_threads(),
                   cpu_bf16_units=cpu_16bit_units("bfloat16"), cpu_fp16_units=cpu_16bit_units("float16"),
                   cpu_dtype_note=pipe.backend.cpu_dtype_note)
    else:
        import onnxruntime

        from pm_runtime.pipeline import Pipeline

        cache = pathlib.Path(args["cache"]) / "ort-cache" if variant.endswith("-cached") else None
        if cache is not None:
            import shutil

            shutil.rmtree(cache, ignore_errors=True)  # made in the warm-up image, as a first run would
        kind = _ort_bundle(variant)
        pipe = Pipeline.load(args[kind], backend="onnxruntime",
                             low_memory="lowmem" in variant, threads=args.get("threads"), cache_dir=cache)
        load_s = time.perf_counter() - t0  # sessions are created on first use (inside warm-up / each lowmem image)

        def one():
            r = pipe.generate(PROMPT, latents=lat, steps=steps, guidance=8.0, allow_no_concept=True)
            return r.images, r.timings

        rec.update(backend=pipe.backend.describe(), onnxruntime=onnxruntime.__version__,
                   precision={"bundle": "fp32", "bundle_int8": f"int8 ({INT8_MODE} UNet)",
                              "bundle_int8_vae": f"int8 ({INT8_MODE} UNet, int8 VAE decoder)"}[kind],
                   ort_threads=args.get("threads") or "default", low_memory=pipe.backend.low_memory,
                   ort_cache=cache is not None)
    rec["setup_s"] = round(load_s, 3)
    for w in range(args["warmup"]):
        t = time.perf_counter()
        image, stages = one()
        if w == 0:  # what a one-shot command adds to setup_s: session creation, first-call costs
            rec["first_image_s"] = round(time.perf_counter() - t, 3)
    times, per_stage = [], []
    for _ in range(args["runs"]):
        t = time.perf_counter()
        image, stages = one()
        times.append(time.perf_counter() - t)
        per_stage.append(stages)
    np.save(pathlib.Path(args["cache"]) / f"image-{variant}.npy", image)
    rec.update({f"image_s_{k}": v for k, v in pcts(times).items()})
    if per_stage and per_stage[0]:
        for key in ("load_s", "text_encoder_s", "unet_step_ms", "vae_s"):
            rec[f"{key}_p50"] = pcts([s[key] for s in per_stage])["p50"]
    if variant in TORCH_DTYPES:  # after the runs: what the UNet's first load decided (packed convolutions)
        rec.update(backend=pipe.backend.describe(), packed_convs=pipe.backend.packed_convs,
                   packed_convs_note=pipe.backend.packed_convs_note)
    rec.update(n=len(times), times_s=[round(t, 3) for t in times], peak_rss_bytes=peak_rss_bytes(),
               peak_mem_kind="peak RSS of the variant's own process (VmHWM on Linux; imports, load, warm-up, runs)")
    return rec


def _ort_bundle(variant: str) -> str:
    """Which bundle an onnxruntime variant runs (its key in the children's args)."""
    return ("bundle_int8_vae" if variant.startswith("ort-int8-vae") else
            "bundle_int8" if variant.startswith("ort-int8") else "bundle")


def run_child(variant: str, args: dict) -> dict:
    waited = wait_quiet(args.get("wait_quiet", 0)) if args.get("wait_quiet") else 0.0
    b0, m0 = cpu_seconds()
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # never wait on a hub that cannot be reached
    r = subprocess.run([sys.executable, __file__, "_child", variant, json.dumps(args)], capture_output=True, text=True,
                       env=env)
    wall = time.perf_counter() - t0
    b1, m1 = cpu_seconds()
    others = max(0.0, (b1 - b0) - (m1 - m0))  # CPU time other processes on this machine took meanwhile
    load = {"quiet_wait_s": waited, "other_cpu_s": round(others, 1),
            "other_cpu_frac": round(others / (wall * os.cpu_count()), 3)}
    for line in r.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return {"status": "ok", **json.loads(line[len(RESULT_TAG):]), **load}
    return {"status": "error", "wall_s": round(time.perf_counter() - t0, 1),
            "error": (r.stderr or r.stdout).strip().splitlines()[-5:]}


# ------------------------------------------------------------------ preparation (cached)
def _export(concept: pathlib.Path, model_dir: pathlib.Path, bundle: pathlib.Path, extra: list[str], log) -> str | float:
    """pm-export into `bundle` unless it is already there; seconds taken or "cached"."""
    if (bundle / "bundle.json").is_file():
        return "cached"
    log(f"exporting {bundle} (SD-1.5-shaped: minutes)")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "from pm_export.cli import main; main()", str(concept), "--model",
                        str(model_dir), "--out", str(bundle), "--force", *extra], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit("export failed: " + (r.stderr or r.stdout).strip().splitlines()[-1])
    return round(time.perf_counter() - t0, 1)


def prepare(model: str, cache: pathlib.Path, log, int8: bool = False, int8_vae: bool = False,
            torch_weights: bool = False) -> tuple[pathlib.Path, pathlib.Path, dict]:
    facts: dict = {}
    t0 = time.perf_counter()
    model_dir = (make_sd15_shaped_model(cache / "model-sd15", seed=0, image_encoder=False) if model == "sd15"
                 else make_tiny(cache / "model-tiny"))
    concept = cache / f"concept-{model}.pt"
    if not concept.is_file():
        make_untrained_concept(model_dir, concept)
    facts["model_ready_s"] = round(time.perf_counter() - t0, 1)

    def export(kind: str) -> pathlib.Path:
        out = bundle_dir(cache, model, kind)
        facts[f"{kind}_export_s"] = _export(concept, model_dir, out, BUNDLES[kind][1], log)
        return out

    bundle = export("bundle")
    if int8:
        unet = _component(export("bundle_int8"), "unet")
        facts["bundle_int8"] = {k: unet["details"]["int8"].get(k) for k in (
            "mode", "per_channel", "calibrate", "calibration_feeds", "calibration_steps", "calibration_size",
            "bytes_before", "bytes_after", "seconds", "record_s")}
    if int8_vae:
        vae = _component(export("bundle_int8_vae"), "vae_decoder")
        facts["bundle_int8_vae"] = {**{k: vae["details"]["int8"].get(k) for k in (
            "mode", "per_channel", "calibrate", "calibration_feeds", "kept_fp32", "quantized_nodes", "bytes_before",
            "bytes_after", "seconds")}, "validation_psnr_db": [v.get("psnr_db") for v in vae["validation"]
                                                               if v["precision"] == "int8-vae"]}
    if torch_weights:  # the torch variants' bundle: the networks' fp16 PyTorch weights only
        export("bundle_torch")
    manifest = json.loads((bundle / "bundle.json").read_text())
    facts["bundle_created"] = manifest.get("created")
    facts["bundle_graph_passes"] = {c["network"]: c.get("details", {}).get("graph_optimization", {}).get("passes")
                                    for c in manifest["components"] if c["format"] == "onnx"}
    return model_dir, bundle, facts


@dataclass(frozen=True)
class RunOptions:
    """pm-bench's CPU run benchmark, as the command line gave it (benchmarks/cli.py)."""

    model: str = "tiny"  # tiny | sd15
    resolution: int = 256
    steps: int = 10
    runs: int = 3
    warmup: int = 1
    seed: int = 233
    threads: int | None = None  # onnxruntime intra-op threads; None: its own default
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    cache: pathlib.Path = pathlib.Path("/tmp/pm-bench-run")
    out: pathlib.Path | None = None  # None: results_dir() / "run-cpu.jsonl"
    commit: str | None = None  # record this commit instead of git's HEAD
    prepare_only: bool = False
    wait_quiet: float = 0.0  # before each variant wait up to this many seconds for other processes to idle
    max_other_frac: float = 0.05  # re-measure a variant when other processes took more of the CPUs
    retries: int = 0  # how many times to re-measure a busy variant


def run(o: RunOptions, command: str, log=lambda m: print(m, flush=True)) -> list[dict]:
    """Prepare (cached), run each variant in its own process, append the records to o.out; the records."""
    out = o.out or results_dir() / "run-cpu.jsonl"
    o.cache.mkdir(parents=True, exist_ok=True)
    kinds = {_ort_bundle(v) for v in o.variants if v.startswith("ort-")}
    model_dir, bundle, facts = prepare(o.model, o.cache, log, int8="bundle_int8" in kinds,
                                       int8_vae="bundle_int8_vae" in kinds,
                                       torch_weights=any(v in TORCH_DTYPES for v in o.variants))
    if o.prepare_only:
        log(f"ready: {model_dir} {bundle} {facts}")
        return []
    env = environment("cpu", o.commit)
    base = {"schema": SCHEMA, **env, "command": command, "model": o.model,
            "device": "cpu", "resolution": o.resolution, "steps": o.steps, "scheduler": "dpmpp-2m", "guidance": 8.0,
            "batch": 1, "warmup": o.warmup, "prompt": PROMPT, "peer": PEER, **facts}
    args = {"model": str(model_dir), **{kind: str(bundle_dir(o.cache, o.model, kind)) for kind in BUNDLES},
            "resolution": o.resolution, "steps": o.steps,
            "runs": o.runs, "warmup": o.warmup, "seed": o.seed, "threads": o.threads, "cache": str(o.cache),
            "wait_quiet": o.wait_quiet}
    records = {}
    for v in o.variants:
        busy = []  # other_cpu_frac of attempts discarded because other processes took the CPUs
        while True:
            log(f"running {v} ...")
            rec = run_child(v, args)
            frac = rec.get("other_cpu_frac", 0.0)
            if rec["status"] != "ok" or frac <= o.max_other_frac or len(busy) >= o.retries:
                break
            busy.append(frac)
            log(f"  other processes used {frac:.0%} of the CPUs: measuring {v} again")
        records[v] = {**base, "variant": v, **rec, "discarded_busy_attempts": busy}
    peer = records.get(PEER)
    import numpy as np

    for v, rec in records.items():
        if peer and peer["status"] == "ok" and rec["status"] == "ok":
            rec["speedup_vs_peer_p50"] = round(peer["image_s_p50"] / rec["image_s_p50"], 3)
            rec["peak_mem_vs_peer"] = round(rec["peak_rss_bytes"] / peer["peak_rss_bytes"], 3)
            mine, theirs = (np.load(o.cache / f"image-{x}.npy").astype(np.int16) for x in (v, PEER))
            rec["max_abs_diff_vs_peer"] = int(np.abs(mine - theirs).max())
        fp32 = records.get(FP32)
        if v not in (PEER, FP32) and fp32 and fp32["status"] == "ok" and rec["status"] == "ok":
            mine, ref = (np.load(o.cache / f"image-{x}.npy").astype(np.float64) for x in (v, FP32))
            rec["psnr_vs_ort_fp32_db"] = psnr_db(mine, ref)  # None: identical
            rec["max_abs_diff_vs_ort_fp32"] = int(np.abs(mine - ref).max())
        append_jsonl(out, [rec])
    log(table(list(records.values())))
    log(f"appended {len(records)} records to {out}")
    return list(records.values())


def table(records: list[dict]) -> str:
    """One line per variant: image p50, speed-up and memory against diffusers (PEER) in the same run,
    drift against ort-fp32's image; a variant that failed shows why. The records hold the rest."""
    lines = [f"{'variant':24} {'image p50 s':>11} {'x ' + PEER:>17} {'peak RSS GiB':>12} {'x memory':>8}  "
             f"vs {FP32} image"]
    for r in records:
        name = r.get("variant", "?")
        if r.get("status") != "ok":
            lines.append(f"{name:24} {failure(r)}"[:160])
            continue
        speed, mem = r.get("speedup_vs_peer_p50"), r.get("peak_mem_vs_peer")
        drift = ""
        if "psnr_vs_ort_fp32_db" in r:
            db = r["psnr_vs_ort_fp32_db"]
            drift = ("identical" if db is None else f"{db:.1f} dB") + f" (max {r['max_abs_diff_vs_ort_fp32']} of 255)"
        lines.append(f"{name:24} {r['image_s_p50']:>11.3f} {f'{speed:.2f}' if speed else '':>17} "
                     f"{r['peak_rss_bytes'] / 2**30:>12.2f} {f'{mem:.2f}' if mem else '':>8}  {drift}".rstrip())
    lines.append(f"x {PEER} = its image p50 / this one's (> 1: faster); x memory = this peak RSS / its peak RSS "
                 "(each variant in its own process)")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        print(RESULT_TAG + json.dumps(child(sys.argv[2], json.loads(sys.argv[3]))), flush=True)
    else:  # python benchmarks/bench_run.py [OPTIONS] = pm-bench [OPTIONS]
        from cli import main

        sys.exit(main(sys.argv[1:], prog="python benchmarks/bench_run.py"))
