"""Training-step benchmark: pm_runtime's Trainer against a step done the published way.

One run builds one model (the tiny random model, or full-size SD-1.5-shaped random weights),
then measures each variant one after another on that same model and the same random training
images, freeing memory in between, and appends one JSON line per variant to --out:

  published-fp32   the published PersonaMagic step: every micro-step the VAE encoder encodes
                   the training image(s) and samples the posterior, the CLIP image encoder
                   embeds them, and EVERY UNet attention (self and split-K/V cross) is the
                   classic naive one: softmax(Q K^T * scale) built with baddbmm + softmax + bmm
                   (diffusers' AttnProcessor / get_attention_scores). fp32, TF32 off.
                   Text encoder, mapper, losses and optimiser: pm_runtime's Trainer code.
  ours-fp32        pm_runtime's Trainer as is (posterior mean/std and e_img cached once per
                   image; SDPA split-K/V cross-attention; diffusers' SDPA self-attention). fp32,
                   TF32 off.
  ours-bf16        the same with precision="bf16" (frozen networks in bf16, autocast).
  ours-bf16-ckpt   bf16 + UNet gradient checkpointing (the low-memory setting).
  ours-fp32-graph, ours-bf16-graph (and -cl: + channels_last UNet)
                   the same with cuda_graph=True: text encoder + UNet forward and backward
                   captured once (torch.cuda.make_graphed_callables) and replayed; the capture
                   is part of setup_s. CUDA only.

Timing unit: one optimiser step (= --grad-accum micro-steps of forward + backward, then AdamW),
timed around Trainer.optimizer_step() with torch.cuda.synchronize() on both sides (GPU) or
time.perf_counter() (CPU); the micro-step figure is that divided by --grad-accum. The speed
ratio of every variant is against published-fp32 measured in the SAME run. "projected_1000_s"
is a projection (setup time + 1000 x median optimiser step), not a measured 1000-step run.

Examples:
  python benchmarks/bench_train.py --model tiny --device cpu --out benchmarks/results/train-cpu-tiny.jsonl
  python benchmarks/bench_train.py --model sd15 --device cuda --out benchmarks/results/train.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import torch

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
if __package__:  # imported as pm_bench.bench_train (pm-bench --train, an installed wheel)
    from .random_models import make_sd15_shaped_model, make_tiny
    from .records import environment, git_state  # noqa: F401 (git_state: bench_kernels imports it from here)
else:  # run as a script: this tree's pm_runtime (also when it is not pip-installed) and the sibling modules
    for _p in (REPO, HERE):
        if str(_p) not in sys.path:
            sys.path.insert(0, str(_p))
    from random_models import make_sd15_shaped_model, make_tiny
    from records import environment, git_state  # noqa: F401
from pm_runtime.resources import peak_rss_bytes  # noqa: E402  (after the path set-up above)

VARIANTS = {
    # name: (precision, gradient_checkpointing, published, cuda_graph, channels_last)
    "published-fp32": ("fp32", False, True, False, False),
    "ours-fp32": ("fp32", False, False, False, False),
    "ours-bf16": ("bf16", False, False, False, False),
    "ours-bf16-ckpt": ("bf16", True, False, False, False),
    "ours-fp32-graph": ("fp32", False, False, True, False),
    "ours-fp32-graph-cl": ("fp32", False, False, True, True),
    "ours-bf16-graph": ("bf16", False, False, True, False),
    "ours-bf16-graph-cl": ("bf16", False, False, True, True),
}
GRAPH_VARIANTS = [k for k, v in VARIANTS.items() if v[3]]
PEER = "published-fp32"
RESULT_TAG = "@@BENCH_RESULT@@ "
SCHEMA = "pm-bench-train/1"


# ------------------------------------------------------------------ the published attention
class NaiveSplitKVAttnProcessor:
    """The published code's attention for EVERY UNet attention layer.

    Self-attention (no encoder_hidden_states): K and V from the hidden states. Cross-attention:
    encoder_hidden_states is [C_k ; C_v] on the sequence axis (pm_runtime's convention), K from
    C_k, V from C_v. Scores are materialised as diffusers' classic AttnProcessor does:
    baddbmm(empty, Q, K^T, beta=0, alpha=scale) -> softmax -> bmm with V, heads folded into the
    batch axis.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError("naive split K/V attention supports SD-style transformer blocks only")
        if attention_mask is not None:
            raise NotImplementedError("naive split K/V attention takes no attention mask")
        residual = hidden_states
        if encoder_hidden_states is None:
            c_k = c_v = hidden_states
        else:
            length = encoder_hidden_states.shape[1] // 2
            c_k, c_v = encoder_hidden_states[:, :length], encoder_hidden_states[:, length:]
            if attn.norm_cross:
                c_k, c_v = attn.norm_encoder_hidden_states(c_k), attn.norm_encoder_hidden_states(c_v)
        q, k, v = attn.to_q(hidden_states), attn.to_k(c_k), attn.to_v(c_v)
        n, _, inner = q.shape
        h = attn.heads
        d = inner // h

        def fold(x):  # (N, S, h*d) -> (N*h, S, d), as Attention.head_to_batch_dim
            return x.reshape(n, -1, h, d).permute(0, 2, 1, 3).reshape(n * h, -1, d)

        q, k, v = fold(q), fold(k), fold(v)
        dtype = q.dtype
        if attn.upcast_attention:
            q, k = q.float(), k.float()
        scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device),
                               q, k.transpose(-1, -2), beta=0, alpha=attn.scale)
        if attn.upcast_softmax:
            scores = scores.float()
        probs = scores.softmax(dim=-1).to(dtype)
        out = torch.bmm(probs, v)
        out = out.reshape(n, h, -1, d).permute(0, 2, 1, 3).reshape(n, -1, inner)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def make_published(trainer, images_dir: pathlib.Path, warn) -> None:
    """Turn a constructed Trainer into the published step (see the module docstring)."""
    import dataclasses

    import numpy as np
    from diffusers import AutoencoderKL

    from pm_runtime.modeling.image_embed import image_embeddings
    from pm_runtime.modeling.loading import find_image_encoder, load_image_encoder, quiet_hf
    from pm_runtime.train import data
    from pm_runtime.train.trainer import Trainer

    cfg, dev = trainer.cfg, trainer.device
    if cfg.precision != "fp32":
        raise ValueError("the published step is fp32 only")
    model_dir = pathlib.Path(cfg.model)
    with quiet_hf():
        vae = AutoencoderKL.from_pretrained(model_dir / "vae", local_files_only=True, torch_dtype=torch.float32)
    vae = vae.requires_grad_(False).eval().to(dev)
    encoder = load_image_encoder(find_image_encoder(model_dir, None), dev)
    images = data.load_images(images_dir, cfg.resolution, cfg.center_crop, warn)  # same read as the Trainer
    pixels = torch.from_numpy(data.to_unit_range(np.stack([im.pixels for im in images]))).to(dev)
    trainer.base.unet.set_attn_processor(NaiveSplitKVAttnProcessor())  # all 32 attention layers of SD 1.5

    def compute_loss(b):
        idx = b.image_idx.to(dev)
        px = pixels[idx]
        with torch.no_grad():
            post = vae.encode(px).latent_dist  # VAE encoder at every step
            mean, std = post.mean.float(), post.std.float()
        e_img = image_embeddings(encoder, px)  # CLIP image encoder at every step
        # Reuse the Trainer's own loss with these fresh per-step values in place of its caches;
        # latent = mean + std * eps is what latent_dist.sample() computes.
        saved = (trainer.post_mean, trainer.post_std, trainer.image_embeds, trainer.masks)
        trainer.post_mean, trainer.post_std, trainer.image_embeds = mean, std, e_img
        trainer.masks = saved[3][idx]
        try:
            return Trainer.compute_loss(trainer, dataclasses.replace(b, image_idx=torch.arange(len(idx))))
        finally:
            trainer.post_mean, trainer.post_std, trainer.image_embeds, trainer.masks = saved

    trainer.compute_loss = compute_loss  # optimizer_step() calls self.compute_loss
    trainer._published_parts = (vae, encoder, pixels)


# ------------------------------------------------------------------ one variant
def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def run_variant(name: str, args, model_dir: pathlib.Path, images_dir: pathlib.Path) -> dict:
    """Measure one variant in this process. Returns the variant's part of the record."""
    from pm_runtime.train.trainer import TrainConfig, Trainer, resolve_device

    precision, ckpt, published, graph, cl = VARIANTS[name]
    dev = resolve_device(args.device)
    rec = {"variant": name, "precision": precision, "gradient_checkpointing": ckpt, "cuda_graph": graph,
           "channels_last": cl,
           "published_step": published,
           "attention": ("naive baddbmm+softmax+bmm, all layers (split K/V in cross)" if published
                         else "SDPA: split K/V cross (pm_runtime), diffusers default self"),
           "per_step_encoders": published, "status": "ok"}
    warnings: list[str] = []
    trainer = None
    _free(dev)
    rec["loadavg_1m_start"] = round(os.getloadavg()[0], 2)
    try:
        with tempfile.TemporaryDirectory(prefix="pm-bench-out-") as out_tmp:
            cfg = TrainConfig(model=str(model_dir), images=str(images_dir), out=str(pathlib.Path(out_tmp) / "c.pt"),
                              resolution=args.resolution, batch_size=args.batch_size, grad_accum=args.grad_accum,
                              steps=args.warmup + args.steps, device=dev.type, precision=precision,
                              gradient_checkpointing=ckpt, cuda_graph=graph, channels_last=cl,
                              seed=args.seed)
            t0 = time.perf_counter()
            trainer = Trainer(cfg, warn=warnings.append)
            if published:
                make_published(trainer, images_dir, warnings.append)
            _sync(dev)
            rec["setup_s"] = round(time.perf_counter() - t0, 3)
            if dev.type == "cuda":
                rec["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
                rec["tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
                rec["peak_mem_setup_bytes"] = int(torch.cuda.max_memory_allocated(dev))
                rec["peak_reserved_setup_bytes"] = int(torch.cuda.max_memory_reserved(dev))
                torch.cuda.reset_peak_memory_stats(dev)
            else:
                rec["peak_mem_setup_bytes"] = peak_rss_bytes()
            losses, times = [], []
            for _ in range(args.warmup):
                losses.append(trainer.optimizer_step())
            _sync(dev)
            for _ in range(args.steps):
                _sync(dev)
                t = time.perf_counter()
                losses.append(trainer.optimizer_step())
                _sync(dev)
                times.append((time.perf_counter() - t) * 1e3)
            if dev.type == "cuda":
                rec["peak_mem_steps_bytes"] = int(torch.cuda.max_memory_allocated(dev))
                rec["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(dev))
                rec["peak_mem_kind"] = "torch.cuda.max_memory_allocated (setup and steps separately; excludes the CUDA context)"
            else:
                rec["peak_mem_steps_bytes"] = peak_rss_bytes()
                rec["peak_mem_kind"] = ("peak RSS (VmHWM on Linux): process-wide and monotonic (includes imports and setup)"
                                        + ("; variant ran in its own process" if args._isolated
                                           else "; NOT isolated: includes earlier variants of this process"))
            rec["peak_mem_bytes"] = max(rec["peak_mem_setup_bytes"], rec["peak_mem_steps_bytes"])
            p50 = _pct(times, 50)
            rec.update({
                "n": len(times), "n_micro": len(times) * args.grad_accum,
                "opt_step_ms_p20": round(_pct(times, 20), 3), "opt_step_ms_p50": round(p50, 3),
                "opt_step_ms_p80": round(_pct(times, 80), 3),
                "micro_step_ms_p50": round(p50 / args.grad_accum, 3),
                "projected_1000_s": round(rec["setup_s"] + 1000 * p50 / 1e3, 2),
                "losses": [round(x, 7) for x in losses],
                "warnings": sorted(set(warnings)),
                "loadavg_1m_end": round(os.getloadavg()[0], 2),
            })
    except Exception as e:  # OOM or anything else: record it and go on with the next variant
        rec.update({"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    "traceback_tail": traceback.format_exc().splitlines()[-6:]})
    finally:
        trainer = None
        _free(dev)
    return rec


def run_variant_isolated(name: str, args, model_dir, images_dir) -> dict:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--_child", name,
           "--model", args.model, "--model-dir", str(model_dir), "--_images-dir", str(images_dir),
           "--device", args.device, "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
           "--grad-accum", str(args.grad_accum), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    precision, ckpt, published, graph, cl = VARIANTS[name]
    return {"variant": name, "precision": precision, "gradient_checkpointing": ckpt, "cuda_graph": graph,
            "channels_last": cl,
            "published_step": published,
            "status": "error", "error": f"child process exited with {r.returncode}",
            "traceback_tail": (r.stderr or r.stdout).splitlines()[-8:]}


# ------------------------------------------------------------------ model and images
def prepare_model(args, root: pathlib.Path) -> tuple[pathlib.Path, float]:
    t0 = time.perf_counter()
    if args.model == "tiny":
        path = make_tiny(root, seed=args.seed)
    else:
        path = make_sd15_shaped_model(root, seed=args.seed, image_encoder=True)
    return path, time.perf_counter() - t0


def write_images(folder: pathlib.Path, count: int, resolution: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        arr = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:02d}.png")


# ------------------------------------------------------------------ report
def fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def table(records: list[dict]) -> str:
    head = ("variant", "opt step p50 ms (p20-p80)", "micro p50 ms", "x vs published", "peak mem",
            "setup s", "projected 1000 steps s")
    rows = [head]
    for r in records:
        if r["status"] != "ok":
            rows.append((r["variant"], "ERROR: " + r.get("error", "")[:60], "", "", "", "", ""))
            continue
        ratio = r.get("speedup_vs_peer")
        rows.append((r["variant"], f"{r['opt_step_ms_p50']:.1f} ({r['opt_step_ms_p20']:.1f}-{r['opt_step_ms_p80']:.1f})",
                     f"{r['micro_step_ms_p50']:.1f}", "-" if ratio is None else f"{ratio:.2f}x",
                     fmt_bytes(r["peak_mem_bytes"]), f"{r['setup_s']:.1f}", f"{r['projected_1000_s']:.1f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_comparisons(records: list[dict]) -> None:
    peer = next((r for r in records if r["variant"] == PEER and r["status"] == "ok"), None)
    for r in records:
        r["peer"] = PEER if peer is not None else None
        if r["status"] != "ok" or peer is None:
            r["speedup_vs_peer"] = None
            continue
        r["speedup_vs_peer"] = round(peer["opt_step_ms_p50"] / r["opt_step_ms_p50"], 3)
        r["peak_mem_ratio_vs_peer"] = round(r["peak_mem_bytes"] / peer["peak_mem_bytes"], 3)
        # Same seed -> same batches: the losses show what each variant changes numerically.
        pairs = list(zip(r["losses"], peer["losses"]))
        r["loss_max_rel_diff_vs_peer"] = max((abs(a - b) / max(abs(b), 1e-12) for a, b in pairs), default=None)


def target_lines(records: list[dict], args) -> list[str]:
    by = {r["variant"]: r for r in records if r["status"] == "ok"}
    out = []
    fp32 = [v for v in by if v.startswith("ours-fp32") and by[v].get("speedup_vs_peer") is not None]
    if fp32:
        best = max(fp32, key=lambda v: by[v]["speedup_vs_peer"])
        s = by[best]["speedup_vs_peer"]
        out.append(f"target >= 3x per step at equal precision ({best} vs published-fp32): {s:.2f}x "
                   f"{'MET' if s >= 3 else 'NOT MET'}")
    fast = [v for v in by if v.startswith("ours-bf16") and "ckpt" not in v]
    if fast:
        best = min(fast, key=lambda v: by[v]["projected_1000_s"])
        p = by[best]["projected_1000_s"]
        out.append(f"target 1000 optimiser steps <= 90 s ({best}, PROJECTED = setup incl. capture + 1000 x p50): "
                   f"{p:.1f} s {'MET' if p <= 90 else 'NOT MET'}")
    if "ours-bf16-ckpt" in by and args.device_type == "cuda":
        r = by["ours-bf16-ckpt"]
        reserved = max(r["peak_reserved_bytes"], r["peak_reserved_setup_bytes"])
        need = reserved + 600 * 2**20  # + ~0.6 GB CUDA context
        out.append(f"target fits a 12 GB card (ours-bf16-ckpt: peak allocated {fmt_bytes(r['peak_mem_bytes'])}, "
                   f"reserved {fmt_bytes(reserved)} + ~0.6 GiB context = {fmt_bytes(need)}, limit 12e9 bytes): "
                   f"{'MET' if need <= 12e9 else 'NOT MET'}")
    if args.model != "sd15" or args.device_type != "cuda" or args.resolution != 512:
        return ["targets (>= 3x at equal precision, 1000 steps <= 90 s, fits 12 GB) apply to sd15 at 512 px "
                "on an H100/H200 only: not evaluated for this run"]
    return out


# ------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "sd15"], default="tiny",
                   help="tiny: pm_runtime's tiny random model; sd15: full-size SD-1.5-shaped RANDOM weights "
                        "(built in ~30 s, 2.2 GB on disk)")
    p.add_argument("--model-dir", type=pathlib.Path, default=None,
                   help="build the model here and keep it (reused when already built) [default: a temp dir, removed]")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--resolution", type=int, default=None, help="training resolution [tiny: 64, sd15: 512]")
    p.add_argument("--batch-size", type=int, default=1, help="images per micro-step (published: 1)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-steps per optimiser step (published: 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="measured OPTIMISER steps per variant (each = --grad-accum micro-steps) [tiny: 30, sd15: 15]")
    p.add_argument("--warmup", type=int, default=None, help="untimed optimiser steps first [tiny: 5, sd15: 3]")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"which to run, in this order [default: all: {' '.join(VARIANTS)}]")
    p.add_argument("--num-images", type=int, default=4, help="random training images written for the run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                   help="run each variant in its own process (auto: yes on CPU, where peak memory is the "
                        "process-wide peak RSS; no on GPU, where peak memory is reset between variants)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    p.add_argument("--commit", default=None,
                   help="record this commit instead of asking git (for a copied tree without .git)")
    p.add_argument("--dirty", action="store_true",
                   help="with --commit: the tree had uncommitted changes (recorded as dirty: true)")
    p.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results" / "train.jsonl",
                   help="JSON-lines file to append to")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_images-dir", dest="_images_dir", type=pathlib.Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    sd = a.model == "sd15"
    a.resolution = a.resolution or (512 if sd else 64)
    a.steps = a.steps if a.steps is not None else (15 if sd else 30)
    a.warmup = a.warmup if a.warmup is not None else (3 if sd else 5)
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device_type = "cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) else "cpu"
    args.device = args.device_type
    if args._child:  # one variant in a fresh process
        args._isolated = True
        rec = run_variant(args._child, args, args.model_dir, args._images_dir)
        print(RESULT_TAG + json.dumps(rec), flush=True)
        return 0
    isolate = args.isolate == "yes" or (args.isolate == "auto" and args.device_type == "cpu")
    args._isolated = isolate

    env = environment(args.device_type, args.commit, args.dirty if args.commit else None)
    if args.device_type == "cuda":  # CUDA context and cuBLAS set up before the first variant's setup clock
        x = torch.randn(256, 256, device="cuda")
        float((x @ x).sum())
        del x
    work = pathlib.Path(tempfile.mkdtemp(prefix="pm-bench-train-"))
    try:
        model_root = args.model_dir or work / f"{args.model}-seed{args.seed}"
        print(f"building/reusing the {args.model} model in {model_root} ...", flush=True)
        model_dir, build_s = prepare_model(args, model_root)
        images_dir = work / "images"
        write_images(images_dir, args.num_images, args.resolution, args.seed)
        records = []
        for name in args.variants:
            if name in GRAPH_VARIANTS and args.device_type != "cuda":
                print(f"[{name}] skipped: CUDA graphs need a CUDA device", flush=True)
                continue
            print(f"[{name}] warmup {args.warmup} + {args.steps} optimiser steps at {args.resolution}px on "
                  f"{args.device_type} ...", flush=True)
            t0 = time.perf_counter()
            rec = (run_variant_isolated if isolate else run_variant)(name, args, model_dir, images_dir)
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            print(f"[{name}] {rec['status']}"
                  + (f": p50 {rec['opt_step_ms_p50']:.1f} ms/optimiser step" if rec["status"] == "ok"
                     else f": {rec.get('error')}") + f" ({rec['wall_s']} s)", flush=True)
            records.append(rec)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    add_comparisons(records)
    command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as f:
        for rec in records:
            full = {"schema": SCHEMA, **env, "model": args.model, "model_build_s": round(build_s, 1),
                    "resolution": args.resolution, "batch": args.batch_size, "grad_accum": args.grad_accum,
                    "num_images": args.num_images, "seed": args.seed, "warmup": args.warmup,
                    "isolated_process": isolate, **rec, "command": command}
            f.write(json.dumps(full, sort_keys=False) + "\n")
    print()
    print(f"{args.model} @ {args.resolution}px, batch {args.batch_size} x grad-accum {args.grad_accum}, "
          f"{env['device_name']}, torch {env['torch']}, commit {env['commit'][:12]}"
          + (" (dirty)" if env["dirty"] else ""))
    print(table(records))
    for line in target_lines(records, args):
        print(line)
    print(f"appended {len(records)} records to {args.out}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
