"""`pm-run`: images from a bundle on onnxruntime, TensorRT or PyTorch. No torch unless a torch backend runs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from . import formats as F
from .errors import UserError
from .latent_upscale import HIRES_UPSCALERS
from .png import IMAGE_FORMATS, SUFFIXES
from .prompt_encoding import EMPHASIS_MODES
from .resources import peak_rss_bytes
from .schedulers import SCHEDULERS
from .stages import LATE_POLICIES, LATE_REUSE

HELP = """Generate images of a concept from a bundle written by pm-export.

\b
  pm-run --engine BUNDLE --prompt "a photo of <persona> as a knight" --seed 233 --out knight.png

Write the concept word (default <persona>) where the person should appear. --engine may name the
bundle folder or a .onnx / .plan file inside it (then that format is preferred by --backend auto).

\b
--backend auto tries, in this order: tensorrt (the bundle has plans, TensorRT + cuda-python are
installed, a GPU is visible), torch-cuda (a CUDA GPU, PyTorch, and torch weights in the bundle:
pm-export --target onnx,torch; the fused-kernel UNet, one CUDA graph per step; on a CPU, with
--device cpu, only when --dtype is given or nothing else can run), onnxruntime (the bundle has
ONNX graphs and onnxruntime is installed), torch (--model given and PyTorch installed); it says
what it picked and why. torch-cuda times its kernels' alternatives on the GPU
the first time it runs an image size there (seconds to a minute, once: the choices are kept in
~/.cache/pm_kernels/tuning, or PM_KERNELS_TUNE_DIR; at most PM_KERNELS_TUNE_BUDGET_S seconds, default
120, per run: what is left is measured by the next run); PM_KERNELS_TUNE=0 skips that.

Initial latents come from the project's own noise generator: the same seed gives the same image
on every backend (and, on one machine and backend, the same file bytes). Images carry their
settings as AUTOMATIC1111 writes them: PNG in a `parameters` text chunk, JPEG and WebP in EXIF
UserComment. Errors are one line; nothing is written unless the whole run succeeded (each image
is written to a temporary file and renamed), except that the images of each prompt of a
--prompts-file and of each batch of a --batch-count are written as soon as they are made, and an
error or Ctrl-C later names the files already written.

\b
  pm-run --engine BUNDLE --prompts-file scenes.txt --seed 233 --out shots/   # engines loaded once
  pm-run --engine BUNDLE --prompt "..." --seed 233 --batch-count 8 --out shots/  # seeds 233 to 240
  pm-run --engine BUNDLE --settings-from shots/00003-233.png --seed 234     # same settings, new seed
  pm-run --engine BUNDLE --prompt "..." --init-image photo.jpg --denoising-strength 0.6  # img2img
"""


MAX_SEED = 2**63 - 1
STDOUT = "-"  # --out -: the one image's file bytes on standard output
EXIT_FLAGGED = 3  # some image was flagged by the safety checker (and not written); the others were


@dataclass(frozen=True)
class RunConfig:
    engine: Path
    prompt: str
    concept: str | None
    negative_prompt: str | None
    steps: int
    guidance: float
    scheduler: str
    seed: int | None
    num_images: int
    height: int | None  # None: 512, or the init image's
    width: int | None
    backend: str
    device: str | None
    model: Path | None
    out: Path
    late_stage: str
    concept_stage: tuple[int, int] | None
    allow_no_concept: bool
    safety_checker: bool
    json: bool
    threads: int | None
    low_memory: bool
    ort_cache: Path | None = None
    int8_weights: bool = False
    dtype: str | None = None
    format: str | None = None  # png / jpeg / webp; None: from --out's suffix, else png
    batch_pos: int | None = None  # --settings-from an image of a batch: the batch is made, this image kept
    settings_from: dict | None = None  # --settings-from: the image, and its records compared after the run
    prompts_file: Path | None = None  # one prompt per line, each generated with the same settings and seed
    batch_count: int = 1  # batches one after another, the k-th (from 0) with seed + k
    emphasis: str = "original"  # AUTOMATIC1111's prompt weighting: original, no-norm, ignore, none
    hires_scale: float | None = None  # AUTOMATIC1111's hires fix (latent): None off
    hires_steps: int = 0  # 0: --steps
    denoising_strength: float | None = None  # None: 0.7 for the hires fix, 0.75 for img2img
    hires_upscaler: str = "latent"
    hires_scheduler: str | None = None  # None: --scheduler
    hires_guidance: float | None = None  # None: --guidance
    init_image: Path | None = None  # img2img: start from this image
    img2img: bool = False  # --settings-from an img2img image: --init-image is needed


def find_bundle(engine: Path) -> tuple[Path, str | None]:
    """(bundle folder, preferred backend): a file inside a bundle names its folder and its format."""
    engine = Path(engine)
    if engine.is_dir() or not engine.exists():
        return engine, None  # open_bundle says what is wrong with a folder that is not a bundle
    prefer = {".plan": "tensorrt", ".onnx": "onnxruntime"}.get(engine.suffix)
    for folder in engine.resolve().parents:
        if (folder / F.BUNDLE_MANIFEST).is_file():
            return folder, prefer
    raise UserError(f"{engine} is not inside a bundle (no {F.BUNDLE_MANIFEST} in its folders)")


# --out names with these suffixes are meant as image files pm-run does not write, not as folders
OTHER_IMAGE_SUFFIXES = {".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic"}


def output_format(out: Path, fmt: str | None) -> str:
    """The format written: --out's suffix when it names a .png / .jpg / .jpeg / .webp file (a
    different --format is an error), else --format (default png)."""
    out = Path(out)
    suffix = out.suffix.lower()
    if out.is_dir():
        return fmt or "png"
    if suffix in IMAGE_FORMATS:
        if fmt is not None and fmt != IMAGE_FORMATS[suffix]:
            raise UserError(f"--format {fmt} does not match --out {out} (a {IMAGE_FORMATS[suffix]} name)")
        return IMAGE_FORMATS[suffix]
    if suffix in OTHER_IMAGE_SUFFIXES:  # not a folder called knight.bmp
        raise UserError(f"--out {out}: pm-run writes PNG, JPEG or WebP files (their settings inside); "
                        "name a .png, .jpg or .webp file or a folder")
    return fmt or "png"


def names_a_file(out: Path) -> bool:
    """Whether --out names an image file (else a folder of numbered images)."""
    return Path(out).suffix.lower() in IMAGE_FORMATS and not Path(out).is_dir()


def output_paths(out: Path, seeds: list[int], fmt: str = "png") -> list[Path]:
    """One path per image, `seeds` holding each image's seed: `out` naming an image file, that file
    (NAME-1.EXT, NAME-2.EXT, ... for several images); else a folder, where files NNNNN-SEED.EXT are
    numbered after the highest number already there (never overwritten)."""
    out, n = Path(out), len(seeds)
    if names_a_file(out):
        return [out] if n == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(n)]
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder (name a .png, .jpg or .webp file or a folder)")
    start = _next_number(out) if out.is_dir() else 0
    return [out / f"{start + i:05d}-{seed}{SUFFIXES[fmt]}" for i, seed in enumerate(seeds)]


_NUMBERED = re.compile(r"(\d{5,})-")


def _next_number(folder: Path) -> int:
    nums = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(nums, default=-1) + 1


def write_image(data: bytes, path: Path, numbered: bool) -> Path:
    """Write one image atomically; returns the path written. A file the user named is replaced; a
    numbered one (folder --out) never is: its name is claimed when written, and where another pm-run
    took it meanwhile (two runs into one folder) the image takes the next free number instead."""
    from .concept_table import atomic_write_bytes

    if not numbered:
        atomic_write_bytes(data, path)
        return path
    m = _NUMBERED.match(path.name)
    num, rest = int(m.group(1)), path.name[m.end(1):]
    for _ in range(1000):
        try:
            atomic_write_bytes(data, path, exclusive=True)
            return path
        except FileExistsError:
            num = max(num + 1, _next_number(path.parent))
            path = path.with_name(f"{num:05d}{rest}")
    raise UserError(f"cannot find a free file name in {path.parent} (other runs keep taking them)")


def check_writable(paths: list[Path]) -> None:
    """Fail before generating if the output folder cannot be made or written (root ignores modes:
    probe with a real temporary file)."""
    import tempfile

    for folder in {p.parent for p in paths}:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".pm-run-probe-"):
                pass
        except OSError as e:
            raise UserError(f"cannot write to {folder}: {e.strerror or e}") from None


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for pm-run: "warning: <message>" on stderr (the category where it is not a
    plain UserWarning) instead of Python's file:line header and source line."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    click.echo(f"warning{kind}: {message}", err=True)


def _bf16_hint(cfg: RunConfig, pipe) -> str | None:
    """A note where auto ran onnxruntime on a CPU with bfloat16 units and the bundle has torch weights:
    there PyTorch in bfloat16 was the faster way where measured (README: CPUs with bfloat16 units).
    With AMX against any bundle; with AVX512-BF16 alone only against an fp32 UNet (the int8 bundle was
    as fast as bfloat16, or faster, on the EPYC measured)."""
    from . import resources
    from .backends.torch_cuda import _has_torch_weights

    if (cfg.backend != "auto" or cfg.dtype or pipe.backend.name != "onnxruntime"
            or (cfg.device or "cpu").split(":")[0] != "cpu" or not _has_torch_weights(pipe.bundle)):
        return None
    units = resources.cpu_bf16_units()
    if "amx_bf16" in units:
        what, figure = "AMX (bfloat16 matrix units)", "2.4-3.1x faster than onnxruntime's fp32 on the Xeon measured"
    elif "avx512_bf16" in units and pipe.backend.precision.get("unet") != "int8":
        what = "AVX512-BF16"
        figure = "1.6x / 1.1x faster than onnxruntime's fp32 at 256 / 512 px, in less memory, on the AMD EPYC measured"
    else:
        return None
    return (f"note: this CPU has {what} and the bundle has torch weights: --device cpu --dtype bfloat16 runs "
            f"them with PyTorch, {figure} (needs torch; bfloat16 drifts slightly from fp32)")


def _differences(record: dict, pipe, result) -> list[str]:
    """What keeps a --settings-from run from remaking the image's pixels: another concept table, model or
    backend than the image records, what a pm-run before 0.3 read otherwise (a long prompt, prompt editing in
    the negative prompt)."""
    from .reproduce import BEFORE_0_3

    image, out = record["image"], []
    active = pipe.concept if result.uses_concept else None
    if record["concept_hash"] and active is not None and active.sha256[:12] != record["concept_hash"]:
        out.append(f"concept {active.name} here is not the table {image} was made with (hash {active.sha256[:12]}, "
                   f"the image's {record['concept_hash']}): the face will differ")
    if record["model"] and record["model"] != result.model:
        out.append(f"{image} was made with model {record['model']}, this bundle's is {result.model}")
    if record["backend"] and record["backend"] != result.backend:
        out.append(f"{image} was made with {record['backend']}, this run used {result.backend}: expect small "
                   "differences in the pixels")
    if record.get("version") in BEFORE_0_3 and result.chunks > 1:
        out.append(f"{image} was made by {record['version']}, which cut prompts at 75 tokens (BREAK ignored); "
                   f"this run read {result.chunks} chunks of 75 tokens: the image will differ")
    if record.get("version") in BEFORE_0_3 and result.negative_step_texts:
        out.append(f"{image} was made by {record['version']}, which read the negative prompt's editing syntax as "
                   "words; this run switched its text between steps: the image will differ")
    return out


def run(cfg: RunConfig, log=lambda m: click.echo(m, err=True), written: list | None = None) -> dict:
    from .pipeline import HIRES_STRENGTH, NEGATIVE_PROMPT, Pipeline

    if cfg.steps < 1:
        raise UserError(f"--steps must be >= 1, got {cfg.steps}")
    if not math.isfinite(cfg.guidance):
        raise UserError(f"--guidance must be a finite number, got {cfg.guidance}")
    if cfg.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {cfg.num_images}")
    if cfg.batch_count < 1:
        raise UserError(f"--batch-count must be >= 1, got {cfg.batch_count}")
    if cfg.seed is not None and cfg.seed + cfg.batch_count - 1 > MAX_SEED:
        raise UserError(f"--seed {cfg.seed} with --batch-count {cfg.batch_count} goes past the largest seed, "
                        f"{MAX_SEED}")
    to_stdout = str(cfg.out) == STDOUT
    if to_stdout:
        _check_stdout(cfg)
    chosen = list(range(cfg.num_images))  # the images written (of the batch generated)
    if cfg.batch_pos is not None:
        if not 0 <= cfg.batch_pos < cfg.num_images:
            raise UserError(f"batch position {cfg.batch_pos} is outside a batch of {cfg.num_images}")
        chosen = [cfg.batch_pos]
    fmt = output_format(cfg.out, cfg.format)
    root, prefer = find_bundle(cfg.engine)
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file is not None else [(None, cfg.prompt)]
    if cfg.settings_from:
        log(cfg.settings_from["describe"])
    options = {k: v for k, v in (("model", cfg.model), ("threads", cfg.threads), ("cache_dir", cfg.ort_cache),
                                 ("dtype", cfg.dtype)) if v is not None}
    backend = cfg.backend
    if cfg.int8_weights:
        if backend not in ("auto", "torch-cuda"):
            raise UserError(f"--int8-weights is a torch-cuda option; --backend {backend} does not take it")
        backend, options["int8_weights"] = "torch-cuda", True
    try:
        pipe = Pipeline.load(root, backend, cfg.device, cfg.concept, low_memory=cfg.low_memory,
                             safety_checker=cfg.safety_checker, prefer=prefer, log=log, **options)
    except UserError as e:
        if cfg.settings_from and cfg.settings_from["concept"] and "has no concept" in str(e):
            raise UserError(f"{e} ({cfg.settings_from['image']} was made with concept {cfg.concept!r}: give "
                            "--concept)") from None
        raise
    if pipe.safety_checker_note and not cfg.safety_checker:
        log("note: --no-safety-checker: " + pipe.safety_checker_note)
    note = _bf16_hint(cfg, pipe)
    if note:
        log(note)
    init = None
    if cfg.init_image is not None:  # read and sized once, before anything is written or computed
        init, cfg = _init_image(cfg, pipe, log)
    elif cfg.img2img:
        raise UserError(f"{cfg.settings_from['image']} was made by img2img (a Denoising strength without a hires fix): "
                        "give its init image with --init-image")
    else:
        cfg = dataclasses.replace(cfg, height=512 if cfg.height is None else cfg.height,
                                  width=512 if cfg.width is None else cfg.width)
        pipe.check_size(cfg.height, cfg.width)  # before anything is written or computed
    if cfg.hires_scale is not None:
        d = HIRES_STRENGTH if cfg.denoising_strength is None else cfg.denoising_strength
        h = pipe.hires_fix(cfg.height, cfg.width, cfg.steps, cfg.hires_scale, cfg.hires_steps, d, cfg.hires_upscaler,
                           cfg.hires_scheduler, cfg.hires_guidance)
        log(f"hires fix: {cfg.width}x{cfg.height} -> {h.width}x{h.height} ({h.upscaler}), then {h.pass_steps} steps "
            f"from step {h.start + 1} of a {h.schedule_steps}-step schedule (denoising strength {h.denoising_strength}"
            + (f", {h.scheduler}" if h.scheduler else "") + (f", guidance {h.guidance}" if h.guidance is not None else "")
            + ")")
    elif (cfg.hires_steps or cfg.hires_upscaler != "latent" or cfg.hires_scheduler or cfg.hires_guidance is not None
          or (cfg.denoising_strength is not None and init is None)):
        log("note: the --hires-* options apply with --hires-scale, --denoising-strength with --hires-scale or "
            "--init-image (the hires fix is off without it)")
    negative = NEGATIVE_PROMPT if cfg.negative_prompt is None else cfg.negative_prompt
    for line, text in prompts:  # every prompt is checked before the first image is made
        try:
            pipe.check_prompt(text, negative, cfg.allow_no_concept, cfg.emphasis, cfg.steps)
        except UserError as e:
            raise UserError(f"{cfg.prompts_file} line {line}: {e}" if line is not None else str(e)) from None
    seed = cfg.seed if cfg.seed is not None else secrets.randbits(32)
    if cfg.seed is None:
        log(f"seed: {seed}" + (f" (to {seed + cfg.batch_count - 1} over the batches)" if cfg.batch_count > 1 else ""))
    # every prompt, each in --batch-count batches: (prompt number, line, prompt, batch number, seed)
    jobs = [(p, line, text, b, seed + b) for p, (line, text) in enumerate(prompts) for b in range(cfg.batch_count)]
    several = len(jobs) > 1
    if to_stdout:
        names, numbered = [Path("<standard output>")], False
    else:
        names = output_paths(cfg.out, [s for *_, s in jobs for _ in chosen], fmt)
        numbered = not names_a_file(cfg.out)
        check_writable(names)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps * len(jobs), desc="denoising", unit="step", file=sys.stderr, disable=None,
               leave=False)
    files = [] if written is None else written  # the caller's list: it names them after an error
    flagged_files, parameters, runs = [], [], []
    try:
        for k, (p, line, text, b, job_seed) in enumerate(jobs):
            def progress(step, total, k=k):
                bar.total = total * len(jobs)
                bar.update(k * total + step - bar.n)

            where = ", ".join(([f"prompt {p + 1} of {len(prompts)} (line {line})"] if len(prompts) > 1 else [])
                              + ([f"batch {b + 1} of {cfg.batch_count} (seed {job_seed})"] if cfg.batch_count > 1
                                 else []))
            where += ": " if where else ""
            paths = dict(zip(chosen, names[k * len(chosen):(k + 1) * len(chosen)]))
            try:
                result = pipe.generate(
                    text, seed=job_seed, steps=cfg.steps, guidance=cfg.guidance, scheduler=cfg.scheduler,
                    negative_prompt=negative, height=cfg.height, width=cfg.width, num_images=cfg.num_images,
                    late_stage=cfg.late_stage, concept_stage=cfg.concept_stage,
                    allow_no_concept=cfg.allow_no_concept, callback=progress, emphasis=cfg.emphasis,
                    hires_scale=cfg.hires_scale, hires_steps=cfg.hires_steps,
                    denoising_strength=cfg.denoising_strength, hires_upscaler=cfg.hires_upscaler,
                    hires_scheduler=cfg.hires_scheduler, hires_guidance=cfg.hires_guidance, init_image=init)
            except UserError as e:
                raise UserError(where + str(e)) from None
            for w in result.warnings:
                log(f"warning: {where}{w}")
            for of_negative in (False, True):  # what the prompt editing made of the prompts (the same every job)
                stretches = result.prompt_schedule(of_negative) if k == 0 else None
                if stretches:
                    log(f"{where}{'negative prompt' if of_negative else 'prompt'} by step: " + "; ".join(
                        f"{a}-{b}: {t!r}" if a != b else f"{a}: {t!r}" for (a, b), t in
                        ((x["steps"], x["text"]) for x in stretches[:8])) + (" ..." if len(stretches) > 8 else ""))
            if result.chunks > 1 and k == 0:
                log(f"{where}long prompt: the prompt and negative prompt read in up to {result.chunks} chunks of "
                    "75 tokens each, as AUTOMATIC1111 reads them")
            if cfg.settings_from:
                for w in _differences(cfg.settings_from, pipe, result):
                    log(f"warning: {w}")
            flagged = [i for i in chosen if result.nsfw and result.nsfw[i]]
            for i in flagged:
                log(f"{where}image {i + 1} of {cfg.num_images} was flagged by the safety checker (an NSFW concept "
                    f"scored above its threshold): {paths[i]} is not written")
            keep = [i for i in chosen if i not in flagged]
            try:
                blobs = {i: result.encode(i, fmt) for i in keep}  # this prompt's images, before writing any
            except ValueError as e:
                raise UserError(where + str(e)) from None
            for i in keep:
                try:
                    if to_stdout:
                        stream = click.get_binary_stream("stdout")
                        stream.write(blobs[i])
                        stream.flush()
                    else:
                        paths[i] = write_image(blobs[i], paths[i], numbered)
                except OSError as e:
                    raise UserError(f"cannot write {paths[i]}: {e.strerror or e}") from None
                files.append(str(paths[i]))
                if not cfg.json:
                    bar.clear()
                    click.echo(f"wrote {paths[i]}", err=to_stdout)
            flagged_files += [str(paths[i]) for i in flagged]
            parameters += [result.parameters(i) for i in chosen]
            runs.append({**result.summary(), "prompt_line": line, "batch": b})
            t = result.timings
            log(f"{where}time: " + (f"VAE encoder {t['vae_encoder_s']:.2f} s, " if "vae_encoder_s" in t else "")
                + f"text encoder {t['text_encoder_s']:.2f} s, UNet {t['unet_steps']} x "
                f"{t['unet_step_ms']:.1f} ms = {t['unet_s']:.2f} s, VAE {t['vae_s']:.2f} s, engine loading "
                f"{t['load_s']:.2f} s, total {t['total_s']:.2f} s")
    finally:
        bar.close()
    memory = pipe.backend.device_memory()  # pm-run is its own process: its peak is this run's
    if memory:
        log(f"GPU memory (PyTorch's allocator, this process): peak {memory['peak_allocated_gib']:.2f} GiB allocated, "
            f"{memory['peak_reserved_gib']:.2f} GiB reserved")
    rss = peak_rss_bytes()  # host memory: all of it on CPUs (onnxruntime), the weights' host side on GPUs
    host = {"peak_rss_gib": round(rss / 2**30, 3)} if rss is not None else None
    if host:
        log(f"host memory: peak resident {host['peak_rss_gib']:.2f} GiB (this process: imports, loading, generation)")
    one = {} if several else {k: v for k, v in runs[0].items() if k not in ("prompt_line", "batch")}
    return {"files": list(files), "flagged": flagged_files, **one, **({"runs": runs} if several else {}),
            "parameters": parameters, "device_memory": memory, "host_memory": host}


def _init_image(cfg: RunConfig, pipe, log):
    """(the init image, read and sized once; cfg with its size) for img2img; UserError where it cannot run."""
    from .init_image import load_init_image
    from .pipeline import IMG2IMG_STRENGTH
    from .schedulers import get_scheduler, img2img_start

    if cfg.hires_scale is not None:
        raise UserError("--init-image (img2img) and --hires-scale do not go together (AUTOMATIC1111's img2img has no "
                        "hires fix)")
    d = IMG2IMG_STRENGTH if cfg.denoising_strength is None else cfg.denoising_strength
    pipe.check_img2img(d)
    init = load_init_image(cfg.init_image, cfg.width, cfg.height, pipe.check_size)
    height, width = init.pixels.shape[:2]
    w0, h0 = init.source_size
    first, _ = img2img_start(cfg.steps, d, get_scheduler(cfg.scheduler).name)
    log(f"img2img: {cfg.init_image} ({w0}x{h0}" + (f", resized to {width}x{height}" if init.resized else "")
        + f"), denoising strength {d}: {cfg.steps - first} steps from step {first + 1} of {cfg.steps}")
    return init, dataclasses.replace(cfg, height=height, width=width, denoising_strength=d)


def _check_stdout(cfg: RunConfig) -> None:
    """--out - takes standard output for one image's bytes: nothing else may be printed there."""
    if cfg.json:
        raise UserError("--out - writes the image to standard output: --json cannot print there too")
    count = cfg.batch_count * (1 if cfg.batch_pos is not None else cfg.num_images)
    if cfg.prompts_file is not None or count != 1:
        raise UserError("--out - writes one image to standard output; this run makes several (--num-images, "
                        "--batch-count, --prompts-file): name a folder")
    if sys.stdout.isatty():
        raise UserError("--out - would write image bytes to the terminal: pipe or redirect standard output")


def _written_before(written: list[str]) -> str:
    if not written:
        return ""
    return f" ({len(written)} image{'s' if len(written) != 1 else ''} written before that: {', '.join(written)})"


def read_prompts(path: Path) -> list[tuple[int, str]]:
    """(line number, prompt) for each prompt line of a --prompts-file."""
    try:
        if str(path) == "-":  # standard input: `generate-scenes | pm-run --prompts-file - ...`
            stream = click.get_binary_stream("stdin")
            text = stream.read().decode("utf-8-sig")
        else:
            text = Path(path).read_text(encoding="utf-8-sig")  # a BOM from Windows editors is not part of line 1
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"--prompts-file {path}: {e.strerror or e}") from None
    prompts = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompts-file {path} holds no prompt (blank lines and # comments are skipped)")
    return prompts


def _given(ctx: click.Context) -> set[str]:
    """The RunConfig fields the user set (command line or environment), not left at their defaults."""
    from click.core import ParameterSource

    return {name for name in ctx.params
            if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)}


def apply_settings(cfg: RunConfig, image: Path, given: set[str]) -> RunConfig:
    """cfg with the settings read from `image` wherever the user did not give the option."""
    from . import reproduce

    settings = reproduce.load(image, given)
    record = {"image": str(image), "concept_hash": settings.concept_hash, "model": settings.model,
              "backend": settings.backend, "describe": settings.describe(), "version": settings.version,
              "concept": settings.values.get("concept")}  # the concept taken from the image, if any
    return dataclasses.replace(cfg, **settings.values, batch_pos=settings.batch_pos, settings_from=record)


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--engine", required=True, type=click.Path(path_type=Path),
              help="Bundle folder (or a .onnx / .plan file inside it).")
@click.option("--prompt", default=None,
              help="The prompt, with the concept word where the person goes (required unless --settings-from "
                   "or --prompts-file). AUTOMATIC1111's emphasis, '(word:1.2)', and prompt editing, "
                   "'[cat:dog:0.5]', apply (--emphasis). Longer than CLIP's 75 tokens: read in chunks of 75 as "
                   "A1111 reads it (BREAK starts a chunk), up to 4 (bundles from pm-export 0.3 on; older: 1).")
@click.option("--prompts-file", default=None, type=click.Path(path_type=Path, dir_okay=False, allow_dash=True),
              metavar="FILE",
              help="Generate every prompt of FILE (- for standard input; UTF-8, one per line; blank lines and lines "
                   "starting with # are skipped) with the engines loaded once, the same settings and the same seed (seeds, with --batch-count). All prompts are "
                   "checked before the first image; each prompt's images are written as soon as they are made.")
@click.option("--concept", default=None,
              help="Concept name in the bundle, or a concept table file [default: the bundle's only concept].")
@click.option("--negative-prompt", default=None,
              help="What the image should not look like; emphasis, prompt editing and long prompts apply as in "
                   "--prompt. [default: the published 'monochrome, lowres, bad anatomy, worst quality, low quality']")
@click.option("--steps", default=50, show_default=True, type=int)
@click.option("--guidance", default=8.0, show_default=True, type=float,
              help="Classifier-free guidance scale G: each step uses uncond + G x (cond - uncond) for any G (1: the prompt alone, 0: the negative prompt alone; diffusers instead skips guidance "
                   "at G <= 1).")
@click.option("--scheduler", default="dpmpp-2m", show_default=True, metavar="NAME",
              type=click.Choice(list(SCHEDULERS)),
              help="The sampler: ddim, euler, euler-a (Euler ancestral), dpmpp-2m (DPM-Solver++ 2M) and "
                   "dpmpp-2m-sde (its stochastic form: fresh noise every step, drawn from the seed), each "
                   "stepping as diffusers' scheduler of that kind does from the model's scheduler config. "
                   "euler, dpmpp-2m and dpmpp-2m-sde also take AUTOMATIC1111's schedule types as a suffix: "
                   "-karras (Karras et al.'s noise levels: 'DPM++ 2M Karras'), -exponential (evenly spaced in "
                   "log sigma), -beta (the Beta(0.6, 0.6) quantiles), as diffusers computes them; and "
                   "-sgm-uniform, -normal, -simple, -kl-optimal, -align-your-steps (SD 1.5's list), as A1111 "
                   "computes them (over the model's whole noise range, fractional timesteps), e.g. "
                   "dpmpp-2m-sgm-uniform for 'DPM++ 2M' with 'Schedule type: SGM Uniform'. euler-a takes all "
                   "eight, as A1111 computes them (euler-a-karras).")
@click.option("--seed", default=None, type=click.IntRange(0, MAX_SEED), help="[default: random, printed]")
@click.option("--num-images", default=1, show_default=True, type=int,
              help="Images generated together from one seed (a batch: one noise draw, the UNet runs several "
                   "images per call). A file --out NAME.png becomes NAME-1.png, NAME-2.png, ...; a folder --out "
                   "numbers them. Each image records its batch size and position, so --settings-from remakes it by "
                   "generating its batch again.")
@click.option("--batch-count", default=1, show_default=True, type=int,
              help="Run this many batches one after another (AUTOMATIC1111's batch count), the k-th (from 0) "
                   "with --seed + k; each batch's images are written as soon as they are made. Each image can be "
                   "remade alone with --settings-from where --num-images is 1.")
@click.option("--height", default=None, type=int, help="[default: 512, or --init-image's height]")
@click.option("--width", default=None, type=int, help="[default: 512, or --init-image's width]")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "onnxruntime", "tensorrt", "torch-cuda", "torch"]))
@click.option("--device", default=None,
              help="onnxruntime: cpu, cuda[:N], dml[:N], coreml; tensorrt: cuda[:N]; torch: cpu, cuda[:N]; "
                   "torch-cuda: cuda[:N], or cpu (eagerly, no CUDA graph; with --dtype bfloat16 faster than "
                   "onnxruntime's fp32 on CPUs with bfloat16 units: AMX, AVX512-BF16) [default: cpu; tensorrt and "
                   "torch-cuda: cuda].")
@click.option("--model", default=None, type=click.Path(path_type=Path),
              help="The base model folder (diffusers layout): needed by --backend torch (and by torch-cuda "
                   "when the bundle has no torch weights).")
@click.option("--out", default=Path("."), show_default=True, type=click.Path(path_type=Path),
              help="An image file (.png, .jpg / .jpeg or .webp: the format follows the name), or a folder "
                   "(files numbered NNNNN-SEED.png, or the --format's suffix, after the highest number there; never "
                   "overwritten, even by runs writing into the same folder at once), or - for standard output (one "
                   "image, in --format, settings inside; messages stay on standard error).")
@click.option("--format", "fmt", default=None, type=click.Choice(["png", "jpeg", "webp"]),
              help="Image format for a folder --out [default: png]: jpeg (quality 95, no chroma subsampling) and webp (lossless) carry "
                   "the settings in EXIF UserComment, as AUTOMATIC1111 writes those formats.")
@click.option("--late-stage", default=LATE_REUSE, show_default=True, type=click.Choice(list(LATE_POLICIES)),
              help="Steps below the concept stage: reuse the last concept context (published) or the super-class.")
@click.option("--concept-stage", nargs=2, type=int, default=None, metavar="LO HI",
              help="Timesteps that use the concept (inside the baked range, e.g. 400 800): identity strength.")
@click.option("--allow-no-concept", is_flag=True, help="Allow a prompt without the concept word.")
@click.option("--emphasis", default="original", show_default=True, type=click.Choice(list(EMPHASIS_MODES)),
              help="AUTOMATIC1111's prompt weighting: '(words)' weighs words 1.1, '[words]' 1/1.1, '(words:1.3)' "
                   "1.3, brackets nest, '\\(' is a literal bracket. original: A1111's default (the text encoder's outputs "
                   "weighted, then scaled back to their mean); no-norm: without that rescaling; ignore: the syntax "
                   "removed, nothing weighted; none: the prompt read as plain text, brackets and numbers as words, "
                   "no prompt editing either (pm-run before 0.2). A1111's prompt editing, '[cat:dog:0.5]' (cat for "
                   "the first half of the steps, then dog), and alternation, '[cat|dog]', apply in the other modes. "
                   "Images record a mode other than original, as A1111 does.")
@click.option("--hires-scale", default=None, type=click.FloatRange(1.0, 8.0), metavar="FACTOR",
              help="AUTOMATIC1111's hires fix, latent form: generate at --width x --height, upscale the latents by "
                   "FACTOR (the image's size: both sides x FACTOR, multiples of 64 within the bundle's range), "
                   "noise them by --denoising-strength and denoise them again at that size, then decode. Same "
                   "prompt, scheduler, guidance and seed; the second pass's noise comes from the seed too. "
                   "[default: off]")
@click.option("--hires-steps", default=0, show_default=True, type=click.IntRange(min=0),
              help="The hires pass's steps (0: --steps). As A1111: the last N steps of a schedule of "
                   "N / denoising strength steps.")
@click.option("--denoising-strength", default=None, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="How much of the image the hires pass (--hires-scale) or img2img (--init-image) re-noises (1: all "
                   "of it) [default: 0.7 for the hires fix, 0.75 for img2img, as A1111's].")
@click.option("--hires-upscaler", default="latent", show_default=True, type=click.Choice(list(HIRES_UPSCALERS)),
              help="How the first pass is upscaled, as A1111's 'Latent' (bilinear), 'Latent (nearest)' and "
                   "'Latent (nearest-exact)' upscale the latents, or as its 'Lanczos' and 'Nearest' upscale the "
                   "decoded image, which the bundle's VAE encoder then encodes again (bundles from pm-export 0.5 "
                   "on). No model-based upscaler (ESRGAN, ...).")
@click.option("--init-image", default=None, type=click.Path(path_type=Path, dir_okay=False), metavar="IMAGE",
              help="img2img, as AUTOMATIC1111's img2img tab: start from IMAGE (PNG, JPEG, WebP, ...) instead of "
                   "noise. It is resized to --width x --height (stretched, A1111's 'Just resize'; default: its own "
                   "size, which must then be one the bundle takes), encoded by the bundle's VAE encoder (bundles "
                   "from pm-export 0.5 on), noised by --denoising-strength and denoised over the last steps of the "
                   "--steps-step schedule (strength 0.75 of 20 steps: 16). The seed's noise is the one text-to-image "
                   "starts from. Images record the Denoising strength, not the init image.")
@click.option("--hires-scheduler", default=None, metavar="NAME", type=click.Choice(list(SCHEDULERS)),
              help="The hires pass's scheduler (A1111's 'Hires sampling method' and 'Hires schedule type') "
                   "[default: --scheduler].")
@click.option("--hires-guidance", default=None, type=float,
              help="The hires pass's guidance scale (A1111's 'Hires CFG Scale') [default: --guidance].")
@click.option("--no-safety-checker", "no_safety_checker", is_flag=True,
              help="Do not run the bundle's safety checker (it runs by default when the bundle has one; a flagged "
                   "image is not written and pm-run exits with status 3).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result on stdout.")
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads [default: its own].")
@click.option("--low-memory", is_flag=True,
              help="Load each network only while it runs, then free it, and decode images above 512 px in "
                   "overlapping 512 px tiles (the VAE's memory then stops growing with the size; tile seams are "
                   "blended, so the image differs slightly from a one-piece decode). With PyTorch on a GPU it "
                   "also sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless that variable is set "
                   "(lower peaks, measured on an H200). On an integrated GPU (Jetson: GPU memory is host memory) "
                   "the weights stay in place rather than being parked in host memory, which would free nothing.")
@click.option("--ort-cache", default=None, type=click.Path(path_type=Path),
              help="onnxruntime (CPU): keep optimised graphs in this folder; later runs load them in about a "
                   "fifth of the time (SD 1.5 UNet: ~1 s instead of ~5 s on 2 cores). Uses disk: one graph copy "
                   "per network.")
@click.option("--dtype", default=None, type=click.Choice(["float16", "bfloat16", "float32"]),
              help="PyTorch backends (torch-cuda, torch) only: the precision the networks run in [default: "
                   "torch-cuda float16 on a GPU, otherwise float32]. bfloat16 on a CPU with bfloat16 units runs the "
                   "bundle's torch weights faster than onnxruntime's fp32 where measured: 2.4-3.1x on a 2-core "
                   "Xeon with AMX (Intel Xeon 4th gen and later), 1.1-1.6x on a 2-core AMD EPYC with AVX512-BF16 "
                   "(README: 'CPUs with bfloat16 units'). On CPUs without them it runs emulated and pm-run warns: "
                   "3.6x slower than float32 on a 2-core Xeon showing AVX-512 only (float16 there: 9x). With "
                   "--backend auto it picks a PyTorch backend.")
@click.option("--settings-from", default=None, type=click.Path(path_type=Path, dir_okay=False), metavar="IMAGE",
              help="Make an image again: take the prompt, negative prompt, steps, scheduler, guidance, seed, size, "
                   "concept and concept stage from the settings inside IMAGE (a PNG, JPEG or WebP written by pm-run, "
                   "or by AUTOMATIC1111 where its sampler is one of pm-run's; or a text file holding such settings). Options given here win (e.g. --seed for a variation). "
                   "An image of a batch is made by generating the batch and keeping it. The same bundle, concept "
                   "and backend give the same pixels; pm-run warns where the concept, model or backend differ.")
@click.option("--int8-weights", is_flag=True,
              help="torch-cuda (GPU fast path) only: keep the UNet's linear and convolution weights as "
                   "per-channel int8, dequantized layer by layer as it runs: about half the UNet's memory "
                   "(SD 1.5: ~0.86 instead of 1.72 GB), at a small drift from the fp16 image and some speed. "
                   "Implies --backend torch-cuda.")
def main(engine, prompt, concept, negative_prompt, steps, guidance, scheduler, seed, num_images, batch_count, height,
         width, backend, device, model, out, late_stage, concept_stage, allow_no_concept, emphasis, hires_scale,
         hires_steps, denoising_strength, hires_upscaler, init_image, hires_scheduler, hires_guidance, no_safety_checker,
         as_json, threads, low_memory, ort_cache, int8_weights, dtype, fmt, settings_from, prompts_file) -> None:
    if low_memory and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        # PyTorch's allocator reads it at its first CUDA allocation (after this); torch-cuda's low-memory
        # peaks in new processes on an H200 were 0.04-0.07 GB lower with it (gpu-fresh-expandable-h200.jsonl)
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    cfg = RunConfig(engine, prompt, concept, negative_prompt, steps, guidance, scheduler, seed, num_images, height,
                    width, backend, device, model, out, late_stage, tuple(concept_stage) if concept_stage else None,
                    allow_no_concept, not no_safety_checker, as_json, threads, low_memory, ort_cache, int8_weights,
                    dtype, fmt, prompts_file=prompts_file, batch_count=batch_count, emphasis=emphasis,
                    hires_scale=hires_scale, hires_steps=hires_steps, denoising_strength=denoising_strength,
                    hires_upscaler=hires_upscaler, hires_scheduler=hires_scheduler, hires_guidance=hires_guidance,
                    init_image=init_image)
    written: list[str] = []
    try:
        if settings_from is not None:
            cfg = apply_settings(cfg, settings_from, _given(click.get_current_context()))
        if prompts_file is not None and (prompt is not None or settings_from is not None):
            raise UserError("--prompts-file takes the prompts from the file: give neither --prompt nor --settings-from")
        if cfg.prompt is None and prompts_file is None:
            raise UserError("give --prompt (or --prompts-file, or --settings-from an image pm-run made)")
        with warnings.catch_warnings():  # Python warnings as one line each, like pm-run's other notes
            warnings.showwarning = _warning_line
            summary = run(cfg, written=written)
    except UserError as e:
        raise click.ClickException(str(e) + _written_before(written)) from None
    except KeyboardInterrupt:
        click.echo("interrupted; " + (_written_before(written).strip(" ()") or "nothing was written"), err=True)
        sys.exit(130)
    if as_json:
        summary["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        click.echo(json.dumps(summary, ensure_ascii=False))
    if summary["flagged"]:
        sys.exit(EXIT_FLAGGED)
