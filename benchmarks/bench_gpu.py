"""`pm-bench --gpu`: one process, one GPU, the peers and our backends on the same SD-1.5-shaped
random model, fp16, 512x512, batch 1 with classifier-free guidance (UNet batch 2).

Peers (PEERS, in this order): diffusers-eager (the stock UNet2DConditionModel forward, SDPA),
diffusers-cuda-graph (the same forward captured once with torch.cuda.CUDAGraph, replayed),
diffusers-text-encoder-b2, diffusers-vae-decode (one 64x64 latent), diffusers-pipeline-eager
(StableDiffusionPipeline, DPM-Solver++, guidance 8, a whole --steps image), and after them (before
our variants, so that a time limit cuts ours' tail, not the step goal's peer), with --compile,
torch-compile-reduce-overhead (torch.compile(unet, mode="reduce-overhead")).
Ours (OURS): name -> callable(Context) -> records; a backend adds an entry, not an `if` here.

Records (schema pm-bench-gpu/1, one JSON line per variant, appended to --out as each variant
finishes): the environment (device, driver, versions, commit), the run's options, and per
variant status, p20/p50/p80 ms per UNet step (unet_step_ms) or per call (call_ms) or per image
(image_ms), peak memory, load/compile time. A variant that raises is recorded with status
"error" and the run goes on; "skipped" (cannot run on this device) and "not available" (the
backend does not import) say why. A table of ratios against the peers is printed at the end.

`--device cpu --model tiny` runs the same code on the CPU with the tiny model (perf_counter for
CUDA events; CUDA graph and torch.compile skipped): a check of the plumbing, not a figure.
"""

from __future__ import annotations

import gc
import pathlib
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

HERE = pathlib.Path(__file__).resolve().parent
if __package__:  # imported as pm_bench.bench_gpu (pm-bench --gpu, an installed wheel)
    from . import gpu_ours
    from .bench_kernels import timed as _timed
    from .random_models import make_sd15_shaped_model, make_tiny, make_untrained_concept
    from .records import append_jsonl, cuda_peak, cuda_reset, environment, failure, pcts, results_dir, slug
else:  # run as a script: this tree's pm_runtime and the sibling modules
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import gpu_ours
    from bench_kernels import timed as _timed
    from random_models import make_sd15_shaped_model, make_tiny, make_untrained_concept
    from records import append_jsonl, cuda_peak, cuda_reset, environment, failure, pcts, results_dir, slug

SCHEMA = "pm-bench-gpu/1"
EAGER, GRAPH, COMPILE = "diffusers-eager", "diffusers-cuda-graph", "torch-compile-reduce-overhead"
PROMPT = "a photo of a face as a knight on a horse"
GUIDANCE = 8.0


class Skip(Exception):
    """The variant cannot run on this device (recorded as status "skipped" with the reason)."""


class NotAvailable(Exception):
    """The backend is not installed or does not import (status "not available")."""


@dataclass(frozen=True)
class GpuOptions:
    """pm-bench --gpu, as the command line gave it (benchmarks/cli.py)."""

    device: str = "cuda"  # cpu: the plumbing on the CPU (with model="tiny"); figures mean nothing
    model: str = "sd15"  # sd15 | tiny
    resolution: int | None = None  # None: 512 (sd15) / 64 (tiny)
    steps: int = 50  # denoising steps of a whole image
    reps: int = 30  # timed calls per UNet / text encoder / VAE variant
    warmup: int = 3  # untimed calls before them
    runs: int = 3  # timed whole images per pipeline variant (after one untimed)
    compile: bool = False
    only: str = "all"  # all | peers | ours
    ours: tuple[str, ...] = ()  # OURS entries (or their variants, e.g. gpu_ours.ALL) to run; (): all
    work: pathlib.Path = pathlib.Path("/tmp/pm-bench-gpu")  # model folder and bundles, reused
    out: pathlib.Path | None = None  # None: results_dir() / gpu-<device name>.jsonl
    commit: str | None = None

    @property
    def size(self) -> int:
        return self.resolution or (512 if self.model == "sd15" else 64)


@dataclass
class Context:
    """What every variant gets. components: unet, vae, text_encoder, tokenizer, scheduler, loaded
    from model_dir on first use (dtype, on the device, eval); release() drops them."""

    opts: GpuOptions
    device: object  # torch.device
    dtype: object  # torch.float16 on CUDA, torch.float32 on the CPU
    model_dir: pathlib.Path  # the random model folder (diffusers layout)
    log: Callable[[str], None] = print
    save: Callable[[list[dict]], None] | None = None  # writes records now (run() sets it)
    load_s: float | None = None  # seconds to load the components (the last time they were loaded)
    _components: dict | None = None
    _bundles: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def size(self) -> int:
        return self.opts.size

    @property
    def components(self) -> dict:
        if self._components is None:
            t0 = time.perf_counter()
            self._components = load_components(self.model_dir, self.device, self.dtype)
            self.load_s = round(time.perf_counter() - t0, 3)
        return self._components

    def release(self) -> None:
        self._components = None
        try:
            self.reset()
        except Exception:  # noqa: BLE001 - a broken CUDA context: the next variants record their errors
            pass

    def timed(self, fn, reps: int | None = None, warmup: int | None = None) -> dict:
        """{p20, p50, p80} ms per call of fn under inference_mode: CUDA events on a GPU (one pair
        per call), perf_counter on the CPU; `warmup` untimed calls first."""
        import torch

        reps = self.opts.reps if reps is None else reps
        with torch.inference_mode():
            return _timed(torch, fn, reps, self.cuda, warmup=self.opts.warmup if warmup is None else warmup)

    def reset(self) -> None:
        """Free what the last variant left and restart the peak-memory counters."""
        import torch

        gc.collect()
        if self.cuda:
            cuda_reset(torch)

    def peak(self) -> dict:
        """Peak allocated / reserved GiB since the last reset (CUDA; empty on the CPU)."""
        import torch

        return cuda_peak(torch) if self.cuda else {}

    def bundle(self, target: str = "torch") -> pathlib.Path:
        """A bundle of model_dir with an untrained concept (pm-export --target TARGET), made once in
        --work and reused."""
        if target not in self._bundles:
            from pm_export.build import ExportConfig, export_bundle

            work, name = self.opts.work, self.opts.model
            concept = work / f"concept-{name}.pt"
            if not concept.is_file():
                make_untrained_concept(self.model_dir, concept)
            out = work / f"bundle-{name}-{target.replace(',', '-')}"
            if not (out / "bundle.json").is_file():
                t0 = time.perf_counter()
                export_bundle(ExportConfig(concept=concept, model=self.model_dir, out=out, target=target, force=True),
                              log=lambda m: None)
                self.log(f"  exported {out} in {time.perf_counter() - t0:.1f} s")
            self._bundles[target] = out
        return self._bundles[target]


def load_components(model_dir: pathlib.Path, device, dtype) -> dict:
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def net(cls, sub):
        return cls.from_pretrained(model_dir / sub, torch_dtype=dtype).to(device).eval()

    return {"unet": net(UNet2DConditionModel, "unet"), "vae": net(AutoencoderKL, "vae"),
            "text_encoder": net(CLIPTextModel, "text_encoder"),
            "tokenizer": CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
            "scheduler": DPMSolverMultistepScheduler.from_pretrained(model_dir / "scheduler")}


# ------------------------------------------------------------------ peers
def _unet_inputs(ctx: Context):
    """(x, t, cond): UNet batch 2 ([uncond; cond]), (2, 4, H/8, W/8), (2,), (2, 77, 768)."""
    import torch

    unet = ctx.components["unet"]
    g = torch.Generator(device=ctx.device).manual_seed(0)
    h = ctx.size // 8
    x = torch.randn(2, unet.config.in_channels, h, h, generator=g, device=ctx.device, dtype=ctx.dtype)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g, device=ctx.device, dtype=ctx.dtype)
    return x, torch.full((2,), 500.0, device=ctx.device), cond


def diffusers_eager(ctx: Context) -> dict:
    unet = ctx.components["unet"]
    x, t, cond = _unet_inputs(ctx)
    return {"unet_step_ms": ctx.timed(lambda: unet(x, t, cond, return_dict=False)[0]), "load_s": ctx.load_s,
            **ctx.peak()}


def diffusers_cuda_graph(ctx: Context) -> dict:
    """The same forward captured once; replays read the static x, t, cond (PyTorch's recipe:
    warm up on a side stream, then capture)."""
    import torch

    if not ctx.cuda:
        raise Skip("needs CUDA")
    unet = ctx.components["unet"]
    x, t, cond = _unet_inputs(ctx)
    t0 = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):
            unet(x, t, cond, return_dict=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        unet(x, t, cond, return_dict=False)
    capture_s = round(time.perf_counter() - t0, 3)
    return {"unet_step_ms": ctx.timed(graph.replay), "capture_s": capture_s, **ctx.peak()}


def torch_compile(ctx: Context) -> dict:
    import torch
    import torch._dynamo

    if not ctx.cuda:
        raise Skip("needs CUDA (mode='reduce-overhead' captures CUDA graphs)")
    unet = ctx.components["unet"]
    x, t, cond = _unet_inputs(ctx)
    compiled = torch.compile(unet, mode="reduce-overhead")
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(3):  # compile, then record the CUDA graph trees
                compiled(x, t, cond, return_dict=False)
        torch.cuda.synchronize()
        compile_s = round(time.perf_counter() - t0, 2)
        return {"unet_step_ms": ctx.timed(lambda: compiled(x, t, cond, return_dict=False)[0]),
                "compile_s": compile_s, **ctx.peak()}
    finally:
        torch._dynamo.reset()


def diffusers_text_encoder(ctx: Context) -> dict:
    import torch

    te = ctx.components["text_encoder"]
    n = te.config.max_position_embeddings  # 77: every prompt is padded to it
    ids = torch.randint(0, min(1000, te.config.vocab_size), (2, n), device=ctx.device)
    return {"call_ms": ctx.timed(lambda: te(ids)[0]), "batch": 2, **ctx.peak()}


def diffusers_vae_decode(ctx: Context) -> dict:
    import torch

    vae = ctx.components["vae"]
    h = ctx.size // 8
    lat = torch.randn(1, vae.config.latent_channels, h, h, device=ctx.device, dtype=ctx.dtype)
    return {"call_ms": ctx.timed(lambda: vae.decode(lat / vae.config.scaling_factor).sample), "batch": 1,
            **ctx.peak()}


def diffusers_pipeline(ctx: Context) -> dict:
    """A whole image: text encoder, --steps UNet calls (batch 2), guidance, VAE decode, to numpy.
    One untimed image, then --runs timed ones (wall clock; output_type="np" waits for the GPU);
    peak memory over the timed images."""
    import torch
    from diffusers import StableDiffusionPipeline

    from pm_runtime.train.templates import NEGATIVE_PROMPT

    c = ctx.components
    pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
                                   unet=c["unet"], scheduler=c["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def image():
        pipe(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=ctx.opts.steps,
             guidance_scale=GUIDANCE, height=ctx.size, width=ctx.size, output_type="np",
             generator=torch.Generator(device=ctx.device).manual_seed(0))

    image()
    ctx.reset()
    walls = []
    for _ in range(ctx.opts.runs):
        t0 = time.perf_counter()
        image()
        walls.append((time.perf_counter() - t0) * 1000)
    return {"image_ms": pcts(walls), "n_images": len(walls), "scheduler": "dpmpp-2m", "guidance": GUIDANCE,
            **ctx.peak()}


PEERS: dict[str, Callable[[Context], dict]] = {
    EAGER: diffusers_eager,
    GRAPH: diffusers_cuda_graph,
    "diffusers-text-encoder-b2": diffusers_text_encoder,
    "diffusers-vae-decode": diffusers_vae_decode,
    "diffusers-pipeline-eager": diffusers_pipeline,
}  # COMPILE runs after these, with --compile


# ------------------------------------------------------------------ ours
def torch_cuda(ctx: Context) -> list[dict]:
    """pm_runtime's torch-cuda backend and its ablations (gpu_ours.py), on a bundle with torch weights.
    With ctx.save, each variant's record is written as it finishes and the list returned is empty."""
    try:
        import pm_runtime.backends.torch_cuda  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: not available here
        raise NotAvailable(f"pm_runtime.backends.torch_cuda: {type(e).__name__}: {e}") from None
    if not ctx.cuda:
        raise Skip("needs CUDA")
    o = ctx.opts
    wanted = [v for v in o.ours if v in gpu_ours.ALL] or list(gpu_ours.ALL)
    recs = gpu_ours.run_ours(ctx.bundle("torch"), ctx.model_dir, steps=o.steps, reps=o.reps, images=o.runs,
                             size=ctx.size, log=ctx.log, variants=wanted,
                             on_record=(lambda r: ctx.save([{"status": "ok", **r}])) if ctx.save else None)
    return [] if ctx.save else recs


torch_cuda.variants = gpu_ours.ALL  # names --ours accepts for this entry

# name -> callable(Context) -> a dict (the fields of one record named `name`) or a list of
# records (each with its own "variant"; status "ok" unless it says otherwise). Raise Skip or
# NotAvailable to say why it did not run; any other exception is recorded as an error.
OURS: dict[str, Callable[[Context], dict | list[dict]]] = {"torch-cuda": torch_cuda}


# ------------------------------------------------------------------ the run
def run_variant(name: str, fn: Callable, ctx: Context) -> list[dict]:
    """fn's records; a raising fn gives one record with status error / skipped / not available."""
    ctx.reset()
    t0 = time.perf_counter()
    echo = True  # an entry that returns a list logs its own progress (ctx.log)
    try:
        out = fn(ctx)
        echo = not isinstance(out, list)
        recs = [{"variant": name, "status": "ok", **out}] if echo else [{"status": "ok", **r} for r in out]
    except Skip as e:
        recs = [{"variant": name, "status": "skipped", "reason": str(e)}]
    except NotAvailable as e:
        recs = [{"variant": name, "status": "not available", "reason": str(e)}]
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        first = (str(e).strip().splitlines() or [""])[0]
        recs = [{"variant": name, "status": "error", "error": f"{type(e).__name__}: {first}"[:500],
                 "traceback_tail": traceback.format_exc().strip().splitlines()[-4:]}]
    finally:
        try:
            ctx.reset()
        except Exception:  # noqa: BLE001 - a broken CUDA context: the next variants record their errors
            pass
    wall = round(time.perf_counter() - t0, 2)
    recs = [{**r, "wall_s": r.get("wall_s", wall)} for r in recs]
    for r in recs if echo else ():
        ctx.log(f"  {summary(r)}")
    return recs


def _selected(o: GpuOptions) -> dict:
    """The OURS entries to run: all, or those --ours names (by entry or by one of its variants)."""
    if not o.ours:
        return dict(OURS)
    known = {n for name, fn in OURS.items() for n in (name, *getattr(fn, "variants", ()))}
    unknown = sorted(set(o.ours) - known)
    if unknown:
        from pm_runtime.errors import UserError

        raise UserError(f"--ours {' '.join(unknown)}: unknown; choose from {', '.join(sorted(known))}")
    return {name: fn for name, fn in OURS.items() if set(o.ours) & {name, *getattr(fn, "variants", ())}}


def run(o: GpuOptions, command: str, log: Callable[[str], None] = print) -> list[dict]:
    """Build (or reuse) the model, run the peers, torch.compile, then ours; append each variant's
    record to the --out file as it finishes; print the table. The records."""
    import torch

    from pm_runtime.errors import UserError

    if o.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"pm-bench --gpu needs a CUDA GPU and torch {torch.__version__} sees none "
                        "(--device cpu --model tiny runs the plumbing on the CPU)")
    ours = _selected(o)
    t_start = time.perf_counter()
    env = environment(o.device, o.commit)  # (records.git_state falls back to PM_COMMIT)
    out = o.out or results_dir() / f"gpu-{slug(env['device_name'])}.jsonl"
    o.work.mkdir(parents=True, exist_ok=True)
    log(f"{env['device_name']}, driver {env['driver']}, torch {env['torch']}, commit {env['commit'][:12]}")
    t0 = time.perf_counter()
    model_dir = (make_sd15_shaped_model(o.work / "model-sd15", seed=0, image_encoder=False) if o.model == "sd15"
                 else make_tiny(o.work / "model-tiny"))
    build_s = round(time.perf_counter() - t0, 1)
    log(f"{o.model} model ready in {build_s} s: {model_dir}")
    dev = torch.device(o.device)
    ctx = Context(o, dev, torch.float16 if dev.type == "cuda" else torch.float32, model_dir, log)
    options = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in asdict(o).items()}
    base = {"schema": SCHEMA, "run_id": uuid.uuid4().hex[:12], **env, "model": o.model, "model_build_s": build_s,
            "precision": "fp16" if dev.type == "cuda" else "fp32", "resolution": o.size, "unet_batch": 2,
            "steps": o.steps, "warmup": o.warmup, "reps": o.reps, "options": options, "command": command}
    records: list[dict] = []

    def save(recs: list[dict]) -> None:
        full = [{**base, **r} for r in recs]
        append_jsonl(out, full)
        records.extend(full)

    ctx.save = save

    if o.only in ("all", "peers"):
        log("peers (diffusers):")
        for name, fn in PEERS.items():
            save(run_variant(name, fn, ctx))
        # torch.compile right after the other peers (their UNet still loaded), before our variants: the
        # step goal's ratio needs it, and where a time limit cuts the run short it cuts ours' A/B tail
        if o.compile:
            log("torch.compile (reduce-overhead):")
            save(run_variant(COMPILE, torch_compile, ctx))
    ctx.release()  # ours load their own weights: the peers' copy would count in their peak memory
    if o.only in ("all", "ours"):
        for name, fn in ours.items():
            log(f"ours: {name}")
            save(run_variant(name, fn, ctx))
            ctx.release()
    log(table(records))
    log(f"total {time.perf_counter() - t_start:.1f} s; {len(records)} records appended to {out}")
    return records


# ------------------------------------------------------------------ reporting
def _p50(r: dict | None, key: str) -> float | None:
    return ((r or {}).get(key) or {}).get("p50")


def summary(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r['variant']}: {failure(r)}"
    parts = [f"{k} p50 {_p50(r, k):.2f}" for k in ("unet_step_ms", "call_ms", "image_ms") if _p50(r, k) is not None]
    parts += [f"{k} {r[k]}" for k in ("load_s", "capture_s", "compile_s", "peak_alloc_gib", "peak_reserved_gib",
                                      "steady_peak_alloc_gib", "steady_peak_reserved_gib") if r.get(k) is not None]
    return f"{r['variant']}: " + ", ".join(parts)


def table(records: list[dict]) -> str:
    """variant, UNet step p50, speed-up against each peer (peer p50 / this p50: > 1 is faster),
    image p50, peak allocated/reserved GiB; a variant that did not run shows why."""
    ok = {r["variant"]: r for r in records if r.get("status") == "ok"}
    peers = [_p50(ok.get(k), "unet_step_ms") for k in (EAGER, GRAPH, COMPILE)]
    lines = [f"{'variant':34} {'step p50 ms':>11} {'x eager':>8} {'x graph':>8} {'x compile':>9} "
             f"{'image p50 s':>11} {'peak GiB':>11}  note"]
    for r in records:
        name = r.get("variant", "?")
        if r.get("status") != "ok":
            lines.append(f"{name:34} {failure(r)}"[:160])
            continue
        step, image = _p50(r, "unet_step_ms"), _p50(r, "image_ms")
        ratios = [f"{b / step:.2f}" if step and b else "" for b in peers]
        peak = (f"{r['peak_alloc_gib']:.2f}/{r['peak_reserved_gib']:.2f}" if r.get("peak_alloc_gib") is not None
                else "")
        note = [f"call p50 {_p50(r, 'call_ms'):.2f} ms"] if _p50(r, "call_ms") is not None else []
        note += [f"{k} {r[k]} s" for k in ("load_s", "compile_s") if r.get(k) is not None]
        if r.get("steady_peak_reserved_gib") is not None:
            note.append(f"steady peak {r['steady_peak_alloc_gib']:.2f}/{r['steady_peak_reserved_gib']:.2f} GiB")
        lines.append(f"{name:34} {f'{step:.2f}' if step else '':>11} {ratios[0]:>8} {ratios[1]:>8} {ratios[2]:>9} "
                     f"{f'{image / 1000:.3f}' if image else '':>11} {peak:>11}  {', '.join(note)}".rstrip())
    lines.append("x PEER = PEER's step p50 / this step p50 (> 1: faster); peak GiB = allocated/reserved "
                 "(CUDA caching allocator, no CUDA context)")
    return "\n".join(lines)


if __name__ == "__main__":  # python benchmarks/bench_gpu.py [OPTIONS] = pm-bench --gpu [OPTIONS]
    from cli import main

    sys.exit(main(["--gpu", *sys.argv[1:]], prog="python benchmarks/bench_gpu.py"))
