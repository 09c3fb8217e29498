"""GPU benchmark, one process, one GPU: the peers (diffusers eager, diffusers in a CUDA graph,
torch.compile with --compile) and our torch-cuda backend (benchmarks/gpu_ours.py) on the same
SD-1.5-shaped random model, fp16, 512x512, batch 1 with classifier-free guidance (UNet batch 2).

Records (schema pm-bench-gpu/1, one JSON line per variant, appended to --out as each finishes):
device, driver, versions, commit, p20/p50/p80 ms per UNet step and per image, peak memory,
load/compile time. A table of ratios against the peers is printed at the end. A failing variant
is recorded with status "error" and the run goes on. Not a test: nothing here asserts.

  python benchmarks/bench_gpu.py --work /tmp/pm-gpu --out benchmarks/results/gpu-h100.jsonl [--compile]

--work holds the SD-1.5-shaped model folder (benchmarks/random_models.py), an untrained concept
and the bundle with torch weights (pm-export --target torch); all reused when present.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import gpu_ours  # noqa: E402

SIZE = 512


def log(msg: str) -> None:
    print(msg, flush=True)


def prepare(work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(model folder, bundle with torch weights), built once into `work`."""
    from random_models import make_sd15_shaped_model, make_untrained_concept

    from pm_export.build import ExportConfig, export_bundle

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = make_sd15_shaped_model(work / "model-sd15", seed=0, image_encoder=False)
    concept = work / "concept-sd15.pt"
    if not concept.is_file():
        make_untrained_concept(model, concept)
    bundle = work / "bundle-sd15-torch"
    if not (bundle / "bundle.json").is_file():
        export_bundle(ExportConfig(concept=concept, model=model, out=bundle, target="torch", force=True),
                      log=lambda m: None)
    log(f"model, concept and torch bundle ready in {time.perf_counter() - t0:.1f} s")
    return model, bundle


def peers(model: pathlib.Path, *, steps: int, reps: int, images: int,
          which=("eager", "graph", "text_vae", "pipeline")) -> list[dict]:
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pm_runtime.train.templates import NEGATIVE_PROMPT

    dev, h16 = torch.device("cuda"), torch.float16
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=h16).to(dev).eval()
    vae = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=h16).to(dev).eval()
    te = CLIPTextModel.from_pretrained(model / "text_encoder", torch_dtype=h16).to(dev).eval()
    tok = CLIPTokenizer.from_pretrained(model / "tokenizer")
    load_s = time.perf_counter() - t0
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(2, 4, SIZE // 8, SIZE // 8, device=dev, dtype=h16, generator=g)
    t = torch.full((2,), 500.0, device=dev)
    ctx = torch.randn(2, 77, 768, device=dev, dtype=h16, generator=g)
    out = []

    def rec(variant, **kw):
        r = {"variant": variant, "status": "ok", "size": SIZE, "steps": steps, **kw}
        out.append(r)
        log(f"  {variant}: " + ", ".join(f"{k} {v}" for k, v in kw.items() if k.endswith(("ms", "_s", "gib"))))
        return r

    def guarded(name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            out.append({"variant": name, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]})
            log(f"  {name}: ERROR {out[-1]['error']}")
        finally:
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def timed(fn, n=reps, warmup=3):  # CUDA events, p20/p50/p80 (one timing helper for the GPU benches)
        from bench_kernels import timed as events_timed

        with torch.inference_mode():
            return events_timed(torch, fn, n, True, warmup=warmup)

    def eager():
        torch.cuda.reset_peak_memory_stats()
        r = timed(lambda: unet(x, t, ctx, return_dict=False)[0])
        rec("diffusers-eager", unet_step_ms=r, load_s=round(load_s, 3), **gpu_ours._peak(torch))

    def graph():
        torch.cuda.reset_peak_memory_stats()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):
                unet(x, t, ctx, return_dict=False)
        torch.cuda.current_stream().wait_stream(s)
        cg = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(cg):
            unet(x, t, ctx, return_dict=False)
        rec("diffusers-cuda-graph", unet_step_ms=timed(cg.replay), **gpu_ours._peak(torch))

    def compiled():
        torch.cuda.reset_peak_memory_stats()
        cu = torch.compile(unet, mode="reduce-overhead")
        t1 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(3):
                cu(x, t, ctx, return_dict=False)
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t1
        rec("torch-compile-reduce-overhead", unet_step_ms=timed(lambda: cu(x, t, ctx, return_dict=False)[0]),
            compile_s=round(compile_s, 2), **gpu_ours._peak(torch))

    def text_and_vae():
        ids = torch.randint(0, 1000, (2, 77), device=dev)
        lat = torch.randn(1, 4, SIZE // 8, SIZE // 8, device=dev, dtype=h16, generator=g)
        rec("diffusers-text-encoder-b2", call_ms=timed(lambda: te(ids)[0], n=10))
        torch.cuda.reset_peak_memory_stats()
        rec("diffusers-vae-decode", call_ms=timed(lambda: vae.decode(lat / 0.18215).sample, n=5),
            **gpu_ours._peak(torch))

    def pipeline():
        sched = DPMSolverMultistepScheduler.from_pretrained(model / "scheduler")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(prompt="a photo of a face as a knight on a horse", negative_prompt=NEGATIVE_PROMPT,
                  num_inference_steps=steps, guidance_scale=8.0, height=SIZE, width=SIZE, output_type="np")
        pipe(**kw)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        walls = []
        for _ in range(images):
            t1 = time.perf_counter()
            pipe(**kw)
            walls.append((time.perf_counter() - t1) * 1000)
        rec("diffusers-pipeline-eager", image_ms=gpu_ours.pcts(walls), **gpu_ours._peak(torch))

    for key, name, fn in (("eager", "diffusers-eager", eager), ("graph", "diffusers-cuda-graph", graph),
                          ("text_vae", "diffusers-text-encoder-vae", text_and_vae),
                          ("pipeline", "diffusers-pipeline-eager", pipeline),
                          ("compile", "torch-compile-reduce-overhead", compiled)):
        if key in which:
            guarded(name, fn)
    return out  # the models go with this frame; the caller collects


def table(records: list[dict]) -> str:
    by = {r["variant"]: r for r in records if r.get("status") == "ok"}
    base = {k: by.get(k, {}).get("unet_step_ms", {}).get("p50") for k in
            ("diffusers-eager", "diffusers-cuda-graph", "torch-compile-reduce-overhead")}
    lines = [f"{'variant':34} {'step p50 ms':>11} {'x eager':>8} {'x graph':>8} {'x compile':>9} "
             f"{'image p50 s':>11} {'peak GiB':>9}"]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"{r['variant']:34} {r.get('status')}: {r.get('error', '')[:80]}")
            continue
        step = r.get("unet_step_ms", {}).get("p50")
        ratio = lambda b: f"{b / step:8.2f}" if step and b else f"{'':8}"  # noqa: E731
        image = r.get("image_ms", {}).get("p50")
        lines.append(f"{r['variant']:34} {step if step else '':>11} {ratio(base['diffusers-eager'])} "
                     f"{ratio(base['diffusers-cuda-graph'])} {ratio(base['torch-compile-reduce-overhead']):>9} "
                     f"{image / 1000 if image else '':>11} {r.get('peak_reserved_gib', ''):>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/pm-bench-gpu"))
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "gpu.jsonl")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also torch.compile(mode='reduce-overhead') (~1 min)")
    ap.add_argument("--only", choices=["all", "peers", "ours"], default="all")
    ap.add_argument("--ours", nargs="+", choices=gpu_ours.ALL, default=list(gpu_ours.ALL),
                    help="which of our variants to run (benchmarks/gpu_ours.py)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    from bench_train import environment

    env = {"schema": "pm-bench-gpu/1", **environment("cuda", os.environ.get("PM_COMMIT"))}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    t_start = time.perf_counter()
    model, bundle = prepare(args.work)
    records = []
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(recs):
        with args.out.open("a") as f:
            for r in recs:
                f.write(json.dumps({**env, **r, "options": {"steps": args.steps, "reps": args.reps,
                                                          "images": args.images, "size": SIZE}}) + "\n")
        records.extend(recs)

    if args.only in ("all", "peers"):
        log("peers (diffusers fp16):")
        save(peers(model, steps=args.steps, reps=args.reps, images=args.images))
        gc.collect()
        torch.cuda.empty_cache()
    if args.only in ("all", "ours"):
        log("ours (torch-cuda):")
        save(gpu_ours.run_ours(bundle, model, steps=args.steps, reps=args.reps, images=args.images, size=SIZE,
                               log=log, variants=args.ours))
    if args.compile and args.only in ("all", "peers"):
        log("torch.compile (reduce-overhead):")
        save(peers(model, steps=args.steps, reps=args.reps, images=args.images, which=("compile",)))
    log(table(records))
    log(f"total {time.perf_counter() - t_start:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
