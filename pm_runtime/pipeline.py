"""The generation loop and the Python API (DESIGN §1-3). No torch.

    pipe = Pipeline.load("bundle/", backend="auto")            # or "onnxruntime", "tensorrt", "torch"
    result = pipe.generate("a photo of <persona> as a knight", seed=233)
    result.images                                              # (N, H, W, 3) uint8
    pipe.use_concept("bob")                                    # another face; no engine reloads

One image (or a group of images sharing the batch) is:
  tokens   the prompt in its super-class and concept versions (pm_runtime.prompt_encoding)
  contexts every distinct context of the stage plan (super-class, concept at table row
           round(t)) plus the negative prompt, from ONE batched text-encoder call
  steps    per step ONE UNet call on [uncond; cond] (classifier-free guidance), the guidance
           combine, and the pure scheduler step (explicit state; project noise for euler-a and the -sde schedulers)
  image    the VAE decoder, then [-1, 1] -> uint8
img2img (an init image): the VAE encoder's latents of the image, noised to a later step of the
schedule by the denoising strength, start the loop there (AUTOMATIC1111's img2img).
A NaN/inf check runs once per stage (text encoder, denoising loop, VAE) and names the stage.
The loop calls `network.run(named arrays)` and never asks which backend it is.

Thread safety: a Pipeline runs one generate() at a time. Calls from several threads are
serialised by a lock (each waits for the one before; the results are those of sequential
calls); use_concept() takes the same lock, so it never changes the face of an image being
made. Sharing one Pipeline across threads is safe, not parallel: for parallel generation
load one Pipeline per thread.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from . import formats as F
from . import noise as pm_noise
from . import schedulers, vae_tiles
from .backends.base import Backend, DenoiseJob, select_backend
from .bundle import Bundle, open_bundle, sha256_file
from .concept_table import ConceptTable, load_table
from .errors import UserError
from .init_image import encoder_input, load_init_image
from .latent_upscale import A1111_NAMES as UPSCALER_NAMES
from .latent_upscale import HIRES_UPSCALERS, IMAGE_UPSCALERS, a1111_pixels, upscale, upscale_image
from .png import image_bytes, parameters_text, png_bytes, sampler_fields, split_sampler
from .prompt_encoding import (EMPHASIS_MODES, ConceptWords, EncodedPrompt, a1111_syntax,
                              apply_emphasis, check_emphasis_mode, concept_words_in, encode_plain, encode_prompt,
                              pad_chunks)
from .prompt_schedule import texts_per_step
from .specs import SAFETY_CHECKER, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, prompt_chunks
from .stages import LATE_POLICIES, LATE_REUSE, SUPER_CLASS, Context, stage_plan
from .train.templates import NEGATIVE_PROMPT  # a plain string module (no torch)

GENERATOR = "personamagic-runtime"
# A1111's default denoising strengths: its hires fix's and its img2img tab's
HIRES_STRENGTH, IMG2IMG_STRENGTH = 0.7, 0.75


class Cancelled(Exception):
    """generate() stopped because its cancel flag was set; nothing was produced."""


class NonFiniteError(UserError):
    """NaN or inf appeared; the message names the stage. No image is returned."""


@dataclass(frozen=True)
class ActiveConcept:
    name: str
    table: ConceptTable
    sha256: str  # of the table file: the PNG's "Concept hash"

    @property
    def words(self) -> ConceptWords:
        return ConceptWords(self.table.concept_word, self.table.super_class, self.table.num_tokens)


@dataclass(frozen=True)
class Settings:
    """Everything one generate() call used, resolved (what the PNG and --json record)."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    scheduler: str
    seed: int | None  # None: latents were given
    height: int
    width: int
    num_images: int
    late_stage: str
    concept_stage: tuple[int, int] | None
    allow_no_concept: bool
    emphasis: str = "original"
    hires: "HiresFix | None" = None  # the second pass, where the hires fix ran
    img2img: "Img2Img | None" = None  # where the loop started from an init image


@dataclass(frozen=True)
class Img2Img:
    """AUTOMATIC1111's img2img: the init image's latents (the VAE encoder's) noised to the level of step
    `start` of the `steps`-step schedule and denoised from there, steps - start steps
    (schedulers.img2img_start)."""

    denoising_strength: float
    start: int
    source: str  # the image's file name ("<array>", "<PIL image>" from the Python API)
    source_size: tuple[int, int]  # (width, height) before it was resized to the size generated


@dataclass(frozen=True)
class HiresFix:
    """AUTOMATIC1111's hires fix, latent form: the first pass's latents upscaled (pm_runtime.latent_upscale)
    to scale x the size, noised to the level of step `start` of a `schedule_steps`-step schedule and denoised
    from there for `steps` steps (schedulers.img2img_steps from the pass's steps and the denoising strength),
    then decoded at that size."""

    scale: float
    steps: int  # as asked: 0 = the first pass's number
    denoising_strength: float
    upscaler: str
    height: int
    width: int
    schedule_steps: int
    start: int
    scheduler: str | None = None  # the pass's own (A1111's "Hires sampler" / "Hires schedule type"); None: the first's
    guidance: float | None = None  # the pass's own (A1111's "Hires CFG Scale"); None: the first pass's

    @property
    def pass_steps(self) -> int:
        return self.schedule_steps - self.start


@dataclass
class Generation:
    images: np.ndarray  # (N, H, W, 3) uint8
    settings: Settings
    concept: ActiveConcept | None
    uses_concept: bool
    plan: list[Context]
    timesteps: np.ndarray
    timings: dict[str, float]
    backend: str
    model: str
    warnings: list[str] = field(default_factory=list)
    nsfw: list[bool] | None = None  # per image: flagged by the safety checker (its image is black); None: not checked
    step_texts: list[str] | None = None  # the prompt's text at each step, where prompt editing changes it
    chunks: int = 1  # the most 75-token chunks a text of this image took (the prompt's, the negative prompt's)
    negative_step_texts: list[str] | None = None  # the negative prompt's, where prompt editing changes it
    hires_plan: list[Context] | None = None  # the hires pass's context per step (settings.hires); None: no pass
    hires_timesteps: np.ndarray | None = None

    def prompt_schedule(self, negative: bool = False) -> list[dict] | None:
        """The stretches of steps with one text each ({"steps": [first, last] from 1, "text": ...}), where
        prompt editing / alternation changes the prompt (or the `negative` prompt) between steps; None where
        it does not."""
        texts = self.negative_step_texts if negative else self.step_texts
        if not texts:
            return None
        out = []
        for i, text in enumerate(texts, start=1):
            if out and out[-1]["text"] == text:
                out[-1]["steps"][1] = i
            else:
                out.append({"steps": [i, i], "text": text})
        return out

    def parameters(self, i: int = 0) -> str:
        s = self.settings
        p = {"Steps": s.steps, **sampler_fields(s.scheduler), "CFG scale": s.guidance,
             "Seed": s.seed if s.seed is not None else "latents given", "Size": f"{s.width}x{s.height}",
             "Model": self.model}
        if s.hires is not None:  # as AUTOMATIC1111 records it (Size: the first pass's; Hires steps where given)
            h = s.hires
            p.update({"Denoising strength": h.denoising_strength, "Hires upscale": h.scale,
                      **({"Hires steps": h.steps} if h.steps else {}), "Hires upscaler": UPSCALER_NAMES[h.upscaler]})
            if h.scheduler is not None and h.scheduler != s.scheduler:
                # both, always: A1111 writes what differs and reads a missing one as the first pass's, whose
                # schedule type may sit in its sampler's name ("DPM++ 2M Karras"): both say it unambiguously
                sampler, schedule = split_sampler(h.scheduler)
                p.update({"Hires sampler": sampler, "Hires schedule type": schedule or "Uniform"})
            if h.guidance is not None and h.guidance != s.guidance:
                p["Hires CFG Scale"] = h.guidance
        if s.img2img is not None:  # as AUTOMATIC1111's img2img records it (Steps: the whole schedule's)
            p["Denoising strength"] = s.img2img.denoising_strength
        if self.concept is not None and self.uses_concept:
            lo, hi = s.concept_stage
            p.update({"Concept": self.concept.name, "Concept hash": self.concept.sha256[:12],
                      "Concept stage": f"{lo}-{hi}", "Late stage": s.late_stage})
        if s.emphasis != "original" and any(c in s.prompt + s.negative_prompt for c in "(["):
            p["Emphasis"] = EMPHASIS_MODES[s.emphasis]  # as AUTOMATIC1111 records a mode other than its default
        if s.num_images > 1:
            p.update({"Batch size": s.num_images, "Batch pos": i})
        p.update({"Backend": self.backend, "Version": f"{GENERATOR} {__version__}"})
        return parameters_text(s.prompt, s.negative_prompt, p)

    def png(self, i: int = 0) -> bytes:
        return png_bytes(self.images[i], self.parameters(i))

    def encode(self, i: int = 0, fmt: str = "png") -> bytes:
        """Image i as the bytes of a PNG, JPEG or WebP file, its settings inside (pm_runtime.png)."""
        return image_bytes(self.images[i], self.parameters(i), fmt)

    def save(self, path: str | Path, i: int = 0, fmt: str | None = None) -> Path:
        """Write image i to `path`, its settings inside, atomically (a temporary file renamed: never a
        half-written file); the format follows the suffix (.png, .jpg / .jpeg, .webp) unless `fmt` names
        one. An image the safety checker flagged (it is black) is refused, as pm-run does."""
        from .concept_table import atomic_write_bytes
        from .png import IMAGE_FORMATS, SUFFIXES

        path = Path(path)
        i = _whole("image index", i)
        if not 0 <= i < len(self.images):
            raise UserError(f"image index {i} is outside the {len(self.images)} image(s) generated")
        if fmt is not None and fmt not in SUFFIXES:
            raise UserError(f"unknown image format {fmt!r}; choose one of {', '.join(SUFFIXES)}")
        by_name = IMAGE_FORMATS.get(path.suffix.lower())
        if fmt is None and by_name is None:
            raise UserError(f"cannot tell the format of {path}: name a .png, .jpg / .jpeg or .webp file, or give fmt")
        if fmt is not None and by_name is not None and fmt != by_name:
            raise UserError(f"fmt {fmt!r} does not match {path} (a {by_name} name)")
        if self.nsfw and self.nsfw[i]:
            raise UserError(f"image {i} was flagged by the safety checker (it is black): not saved")
        try:
            data = self.encode(i, fmt or by_name)
        except ValueError as e:  # settings too long for a JPEG's EXIF block
            raise UserError(str(e)) from None
        atomic_write_bytes(data, path)
        return path

    def summary(self) -> dict:
        return {"settings": asdict(self.settings), "concept": self.concept.name if self.concept else None,
                "uses_concept": self.uses_concept, "backend": self.backend, "timings": self.timings,
                "warnings": self.warnings, "nsfw": self.nsfw, "prompt_schedule": self.prompt_schedule(),
                "negative_prompt_schedule": self.prompt_schedule(negative=True), "prompt_chunks": self.chunks}


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    return bool(cancel.is_set() if hasattr(cancel, "is_set") else cancel())


def _check_finite(stage: str, *arrays: np.ndarray) -> None:
    for a in arrays:
        ok = a.all_finite() if hasattr(a, "all_finite") else np.isfinite(a).all()  # a DeviceArray checks in place
        if not ok:
            a = np.asarray(a)
            bad = int(a.size - np.isfinite(a).sum())
            raise NonFiniteError(f"NaN/inf in the {stage} ({bad} of {a.size} values); no image was produced "
                                 "(an fp16 bundle may overflow: try the fp32 bundle)")


class _Prompts:
    """A prompt's and a negative prompt's texts and their encodings (pm_runtime.prompt_schedule: one text,
    or one per stretch of steps with A1111's prompt editing / alternation; emphasis "none" takes each as one
    text)."""

    def __init__(self, pipe: "Pipeline", prompt: str, negative: str, allow_no_concept: bool, concept, emphasis: str):
        self.pipe, self.prompt, self.negative, self.concept, self.emphasis = pipe, prompt, negative, concept, emphasis
        self.allow_no_concept = allow_no_concept
        self.encs: dict[str, EncodedPrompt] = {}
        self.neg_encs: dict[str, EncodedPrompt] = {}  # the negative prompt's texts: plain, both versions equal
        self.warnings: list[str] = []

    def encode(self, text: str) -> EncodedPrompt:
        """One text's encoding. A text of a scheduled prompt may lack the concept word (the schedule as a
        whole is checked for it: check_concept)."""
        if text not in self.encs:
            c = self.concept
            allow = self.allow_no_concept or text != self.prompt
            self.encs[text] = encode_prompt(self.pipe.tokenizer, text, c.words if c else None,
                                            self.pipe.dims.max_length, allow, c.name if c else None, self.emphasis,
                                            self.pipe.max_chunks)
        return self.encs[text]

    def check_concept(self, steps: int) -> None:
        """UserError where the concept word is in no text of the schedule (unless allowed)."""
        c = self.concept
        if c is None or self.allow_no_concept or self.uses_concept:
            return
        encode_prompt(self.pipe.tokenizer, self.prompt, c.words, self.pipe.dims.max_length, False, c.name,
                      self.emphasis, self.pipe.max_chunks)  # the usual refusal where the prompt lacks the word
        raise UserError(f"the prompt's editing syntax leaves the concept word {c.words.word} out of every step's text "
                        f"over {steps} steps")

    def _schedule(self, text: str, steps: int, first_pass: int | None = None) -> tuple[list[str], list[int]]:
        if self.emphasis == "none":  # the text as plain text: no A1111 syntax at all
            return [text], [0] * steps
        return texts_per_step(text, steps, first_pass)

    def per_step(self, steps: int, first_pass: int | None = None) -> list[str]:
        """The prompt's text of each sampling step (from 0), each encoded (`first_pass`: the first pass's step
        count where these are the hires pass's steps: prompt_schedule)."""
        texts, index = self._schedule(self.prompt, steps, first_pass)
        for text in texts:
            self.encode(text)
        return [texts[i] for i in index]

    def neg_per_step(self, steps: int, first_pass: int | None = None) -> list[str]:
        """The negative prompt's text of each sampling step (from 0), each encoded."""
        texts, index = self._schedule(self.negative, steps, first_pass)
        for text in texts:
            if text not in self.neg_encs:
                p = self.pipe
                self.neg_encs[text] = encode_plain(p.tokenizer, text, p.dims.max_length, "negative prompt",
                                                   self.emphasis, p.max_chunks)
        return [texts[i] for i in index]

    @property
    def uses_concept(self) -> bool:
        return any(e.uses_concept for e in self.encs.values())

    def rows(self, keys: list[tuple[str, Context]], negative: bool = False) -> list[tuple[EncodedPrompt, Context]]:
        """(encoding, context) of each (text, context) of the prompt (or the negative prompt): the texts of a
        schedule padded with empty chunks to the most chunks any of them takes (each version on its own), as
        AUTOMATIC1111 pads them."""
        encs = {text: (self.neg_encs if negative else self.encs)[text] for text, _ in keys}
        if len(encs) > 1:
            L = self.pipe.dims.max_length
            most = [max(len(e.version(stage)[0]) for e in encs.values()) // L for stage in (False, True)]
            encs = {t: pad_chunks(e, *most, self.pipe.tokenizer, L) for t, e in encs.items()}
        return [(encs[text], context) for text, context in keys]

    def step_keys(self, plan: list[Context], first_pass: int | None = None,
                  schedule_steps: int | None = None) -> list[tuple[str, Context]]:
        """(text, context) of each step: the text encoder's row it reads (a text without the concept word
        reads its super-class version in every stage). `schedule_steps`: the texts of a schedule of that
        many steps, from its first (img2img)."""
        return [(text, c if self.encs[text].uses_concept else SUPER_CLASS)
                for text, c in zip(self.per_step(schedule_steps or len(plan), first_pass), plan)]


class _Progress:
    """Steps done over a generation's passes: each loop's before/after callbacks count from what the earlier
    loops did (callback(step, total) after each step; `cancel` checked before each)."""

    def __init__(self, callback, cancel, total: int):
        self.callback, self.cancel, self.total, self.done = callback, cancel, total, 0

    def before(self):
        base = self.done

        def before(i):
            if _is_cancelled(self.cancel):
                raise Cancelled(f"cancelled before step {base + i + 1} of {self.total}")
        return before

    def after(self):
        base = self.done

        def after(i):
            if self.callback is not None:
                self.callback(base + i + 1, self.total)
        return after


class Pipeline:
    def __init__(self, bundle: Bundle, backend: Backend, concept: str | Path | None = None,
                 safety_checker: bool = True):
        from .tokenizer import ClipTokenizer

        safety_checker = _flag("safety_checker", safety_checker)
        self.bundle, self.backend = bundle, backend
        self.tokenizer = ClipTokenizer.from_folder(bundle.tokenizer_dir)
        self.dims = bundle.dims
        self.max_chunks = prompt_chunks(self.dims.context_chunks)  # a long prompt's chunks of 75 tokens
        self.specs = backend.specs
        self._lock = threading.Lock()
        checker = [c for c in bundle.components if c[F.CK_NETWORK] == SAFETY_CHECKER]
        self.checker_settings = None  # the safety checker's preprocessing when it runs
        if checker and safety_checker:
            if not backend.provides(SAFETY_CHECKER):
                formats = ", ".join(sorted({c[F.CK_FORMAT] for c in checker}))
                raise UserError(f"the bundle's safety checker ({formats}) cannot run on the {backend.name} backend; "
                                "use a backend that can, or generate without it (--no-safety-checker)")
            self.checker_settings = dict(checker[0].get(F.CK_DETAILS, {}).get("preprocess", {}))
        self.safety_checker_note = (
            None if self.checker_settings is not None else
            "the bundle's safety checker is off: images are not checked" if checker else
            "the bundle has no safety checker ("
            + str(bundle.manifest.get(F.BK_BASE_MODEL, {}).get(F.BM_SAFETY_CHECKER, "none")) + "): images are not checked")
        self.concept: ActiveConcept | None = None
        names = [c[F.QK_NAME] for c in bundle.concepts]
        if concept is not None:
            self.use_concept(concept)
        elif len(names) == 1:
            self.use_concept(names[0])

    @classmethod
    def load(cls, bundle: str | Path | Bundle, backend: str = "auto", device: str | None = None,
             concept: str | Path | None = None, *, verify: bool = True, low_memory: bool = False,
             safety_checker: bool = True, prefer: str | None = None, log: Callable[[str], None] | None = None,
             **backend_options) -> "Pipeline":
        """Open a bundle and create the backend. backend: auto | onnxruntime | tensorrt | torch-cuda |
        torch (torch also needs model=FOLDER). backend_options go to the backend (onnxruntime:
        threads, graph_optimization; torch: model, dtype; torch-cuda: see its class). verify: each
        network file the backend loads is checked against its sha256 first (torch-cuda: while it
        loads); files it does not load are not read (Bundle.verify_all() checks them all)."""
        verify, low_memory, safety_checker = (_flag(n, v) for n, v in (
            ("verify", verify), ("low_memory", low_memory), ("safety_checker", safety_checker)))
        for name, value, kinds, what in (("bundle", bundle, (str, os.PathLike, Bundle), "a folder path or a Bundle"),
                                         ("backend", backend, (str,), "a backend name"),
                                         ("device", device, (str, type(None)), "a device name such as 'cpu' or "
                                                                              "'cuda:0', or None"),
                                         ("concept", concept, (str, os.PathLike, type(None)),
                                          "a concept name, a table file path, or None")):
            if not isinstance(value, kinds):
                raise UserError(f"{name} must be {what}, got {value!r}")
        if "threads" in backend_options and backend_options["threads"] is not None:
            backend_options["threads"] = _whole("threads", backend_options["threads"])
        b = bundle if isinstance(bundle, Bundle) else open_bundle(Path(bundle), verify=verify)
        cls_, why = select_backend(b, backend, prefer=prefer, device=device, **backend_options)
        if log:
            log(why)
        be = cls_(b, device=device, low_memory=low_memory, **backend_options)
        be.log = log
        return cls(b, be, concept, safety_checker)

    # ------------------------------------------------------------------ concepts
    def use_concept(self, name_or_path: str | Path | None) -> ActiveConcept | None:
        """Switch faces: a concept name of the bundle or a concept table file (.safetensors) baked
        for the same base model; None for plain Stable Diffusion. Engines are not touched."""
        if not isinstance(name_or_path, (str, os.PathLike, type(None))):
            raise UserError(f"concept must be a concept name, a table file path, or None, got {name_or_path!r}")
        if name_or_path is None:
            active = None
        elif str(name_or_path) in {c[F.QK_NAME] for c in self.bundle.concepts}:
            name = str(name_or_path)
            table = self.bundle.load_concept(name)
            active = ActiveConcept(name, table, self.bundle.concept(name)[F.FK_SHA256])
        elif Path(name_or_path).suffix == F.TABLE_SUFFIX or Path(name_or_path).is_file():
            path = Path(name_or_path)
            table = load_table(path, expected_fingerprint=self.bundle.fingerprint)
            active = ActiveConcept(path.stem, table, sha256_file(path))
        else:
            self.bundle.concept(str(name_or_path))  # raises: unknown concept, with the bundle's names
            raise AssertionError
        if active is not None and active.table.dim != self.dims.text_dim:
            raise UserError(f"concept {active.name} has {active.table.dim}-wide tokens; the bundle's text encoder "
                            f"is {self.dims.text_dim}-wide")
        with self._lock:
            self.concept = active
        return active

    # ------------------------------------------------------------------ plan
    def plan(self, steps: int, scheduler: str = "dpmpp-2m", late_stage: str = LATE_REUSE,
             concept_stage: tuple[int, int] | None = None, uses_concept: bool = True):
        """(scheduler tables, one Context per step, the concept stage used)."""
        steps = _whole("steps", steps)  # numpy integers too; not True or 2.0
        if steps < 1:
            raise UserError(f"steps must be a whole number >= 1, got {steps!r}")
        if scheduler not in schedulers.SCHEDULERS:
            raise UserError(f"unknown scheduler {scheduler!r}; choose one of {', '.join(schedulers.SCHEDULERS)}")
        if late_stage not in LATE_POLICIES:
            raise UserError(f"late stage must be one of {', '.join(LATE_POLICIES)}, got {late_stage!r}")
        num_train = self.num_train_timesteps
        if steps > num_train:
            raise UserError(f"steps must be at most the model's {num_train} training timesteps, got {steps}")
        try:
            tables = schedulers.make_tables(scheduler, self.bundle.scheduler_config, steps)
        except ValueError as e:
            raise UserError(str(e)) from None
        if not uses_concept or self.concept is None:
            return tables, [SUPER_CLASS] * tables.num_steps, None
        t = self.concept.table
        if concept_stage is None:
            lo, hi = t.stage_lo, t.stage_hi
        elif isinstance(concept_stage, (tuple, list)) and len(concept_stage) == 2:
            lo, hi = (_whole("concept stage bounds", v) for v in concept_stage)  # the table holds whole t
        else:
            raise UserError(f"concept stage must be a pair (low, high), got {concept_stage!r}")
        if not (t.stage_lo <= lo <= hi <= t.stage_hi):
            raise UserError(f"concept stage {lo}..{hi} must lie inside the baked range {t.stage_lo}..{t.stage_hi} "
                            "with low <= high")
        return tables, stage_plan([float(x) for x in tables.timesteps], lo, hi, late_stage), (int(lo), int(hi))

    # ------------------------------------------------------------------ generate
    def generate(self, prompt: str, *, seed: int | None = None, latents: np.ndarray | None = None, steps: int = 50,
                 guidance: float = 8.0, scheduler: str = "dpmpp-2m", negative_prompt: str = NEGATIVE_PROMPT,
                 height: int | None = None, width: int | None = None, num_images: int | None = None,
                 late_stage: str = LATE_REUSE, concept_stage: tuple[int, int] | None = None,
                 allow_no_concept: bool = False, callback: Callable[[int, int], None] | None = None,
                 cancel=None, emphasis: str = "original", hires_scale: float | None = None, hires_steps: int = 0,
                 denoising_strength: float | None = None, hires_upscaler: str = "latent",
                 hires_scheduler: str | None = None, hires_guidance: float | None = None,
                 init_image=None) -> Generation:
        """Images for `prompt`. Initial latents come from `seed` (project noise, the same on every
        backend) or are given as `latents` (N, C, H/8, W/8); `seed` then only seeds the per-step noise
        (euler-a, the -sde schedulers).
        `emphasis`: how AUTOMATIC1111's prompt weighting, "(words:1.2)", "(words)", "[words]", acts
        (pm_runtime.prompt_encoding): "original" (A1111's default), "no-norm", "ignore" (the syntax
        removed, no weights), "none" (the brackets read as words).
        `hires_scale` (AUTOMATIC1111's hires fix, latent form; None: off): the latents of this size are
        upscaled by that factor (`hires_upscaler`, pm_runtime.latent_upscale), noised by `denoising_strength`
        and denoised again for `hires_steps` steps (0: `steps`) at the larger size, which the image has
        (HiresFix; the same prompt; `hires_scheduler` and `hires_guidance`: the pass's own, None: the first's;
        `denoising_strength` None: HIRES_STRENGTH, 0.7).
        `init_image` (AUTOMATIC1111's img2img; a file path, a PIL image or an (H, W, 3) uint8 array): the image,
        resized to height x width where they are given (else generated at its own size), is encoded by the
        bundle's VAE encoder, noised by `denoising_strength` (None: IMG2IMG_STRENGTH, 0.75) and denoised from
        that step of the `steps`-step schedule on (Img2Img; the seed's noise is the one a text-to-image run starts from).
        callback(step, total) after every UNet step (both passes); `cancel` (threading.Event or a callable)
        is checked before every step and raises Cancelled."""
        with self._lock:
            return self._generate(prompt, seed, latents, steps, guidance, scheduler, negative_prompt, height, width,
                                  num_images, late_stage, concept_stage, allow_no_concept, callback, cancel, emphasis,
                                  (hires_scale, hires_steps,
                                   HIRES_STRENGTH if denoising_strength is None else denoising_strength,
                                   hires_upscaler, hires_scheduler, hires_guidance),
                                  (init_image, IMG2IMG_STRENGTH if denoising_strength is None else denoising_strength))

    @property
    def num_train_timesteps(self) -> int:
        """The model's training timesteps: the most steps a schedule may take."""
        return int(self.bundle.scheduler_config.get("num_train_timesteps", 1000))

    def check_size(self, height: int, width: int) -> None:
        """UserError naming the supported range unless the UNet and VAE engines take this size."""
        axis = self.specs[UNET].axes["latent_height"]
        f = self.dims.vae_scale_factor
        lo, hi, step = axis.min * f, axis.max * f, axis.multiple_of * f
        for v in (height, width):
            if not (isinstance(v, int) and lo <= v <= hi and v % step == 0):
                raise UserError(f"unsupported size {width}x{height}: height and width must be multiples of {step} "
                                f"from {lo} to {hi}")

    def check_prompt(self, prompt: str, negative_prompt: str = NEGATIVE_PROMPT, allow_no_concept: bool = False,
                     emphasis: str = "original", steps: int = 50) -> list[str]:
        """What generate() would say about these prompts with the active concept, without generating:
        UserError where it would refuse them (no concept word, a concept word of another concept, several
        concepts and none chosen, not a string), else its warnings (truncation, a concept word in the
        negative prompt, emphasis syntax the mode does not take), with prompt editing scheduled over `steps`.
        Cheap (tokenization only): check a list of prompts before generating any."""
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(text, str):
                raise UserError(f"{name} must be a string, got {type(text).__name__}")
        return self._encode_prompts(prompt, negative_prompt, _flag("allow_no_concept", allow_no_concept),
                                    self.concept, emphasis, _whole("steps", steps)).warnings

    def _encode_prompts(self, prompt, negative_prompt, allow_no_concept, concept, emphasis, steps=50
                        ) -> "_Prompts":
        """The prompt's texts (one, or one per stretch of steps with A1111's prompt editing / alternation,
        scheduled over `steps`), each encoded in both versions, and the negative prompt's. `steps` may be
        out of range (None, 0, 10**6: plan() refuses it later): the schedule is taken over 1 to 1000."""
        check_emphasis_mode(emphasis)
        steps = min(max(steps, 1), 1000) if isinstance(steps, int) else 1
        syntax = [*a1111_syntax(prompt, "prompt", emphasis, self.max_chunks),
                  *a1111_syntax(negative_prompt, "negative prompt", emphasis, self.max_chunks)]
        if concept is None and concept_words_in(prompt) and len(self.bundle.concepts) > 1:
            names = ", ".join(c[F.QK_NAME] for c in self.bundle.concepts)
            raise UserError(f"the bundle has several concepts ({names}): choose one (--concept)")
        prompts = _Prompts(self, prompt, negative_prompt, allow_no_concept, concept, emphasis)
        prompts.per_step(steps)  # every text of both schedules encoded (and checked) now
        prompts.check_concept(steps)
        prompts.neg_per_step(steps)
        warnings = [*syntax, *dict.fromkeys(w for e in (*prompts.encs.values(), *prompts.neg_encs.values())
                                            for w in e.warnings)]
        if concept_words_in(negative_prompt):
            warnings.append(f"the negative prompt's {concept_words_in(negative_prompt)[0]} is read as plain text: "
                            "a concept applies to the prompt only")
        prompts.warnings = warnings
        return prompts

    def hires_fix(self, height: int, width: int, steps: int, scale, hires_steps=0, denoising_strength=HIRES_STRENGTH,
                  upscaler: str = "latent", scheduler: str | None = None, guidance=None) -> HiresFix:
        """The hires pass of a generation of height x width in `steps` steps (UserError where it cannot run)."""
        if not _real(scale) or not 1.0 <= scale <= 8.0:
            raise UserError(f"the hires scale must be a number from 1 to 8, got {scale!r}")
        hires_steps = _whole("hires steps", hires_steps)
        if hires_steps < 0:
            raise UserError(f"hires steps must be a whole number >= 0 (0: as many as the first pass), got {hires_steps}")
        d = denoising_strength
        _check_strength(d)
        if upscaler not in HIRES_UPSCALERS:
            raise UserError(f"hires upscaler must be one of {', '.join(HIRES_UPSCALERS)} (A1111's latent upscalers, "
                            f"and its Lanczos and Nearest image upscalers), got {upscaler!r}")
        if upscaler in IMAGE_UPSCALERS:
            self._require_encoder(f"the hires upscaler {upscaler} (it encodes the resized image again; the latent "
                                  "upscalers need none)")
        if scheduler is not None and scheduler not in schedulers.SCHEDULERS:
            raise UserError(f"unknown hires scheduler {scheduler!r}; choose one of {', '.join(schedulers.SCHEDULERS)}")
        if guidance is not None and not _real(guidance):
            raise UserError(f"the hires guidance must be a finite number, got {guidance!r}")
        h2, w2 = int(height * scale), int(width * scale)  # as AUTOMATIC1111 sizes it
        try:
            self.check_size(h2, w2)
        except UserError as e:
            raise UserError(f"hires fix: {width}x{height} x {scale} is {w2}x{h2}: {e}") from None
        total, start = schedulers.img2img_steps(hires_steps or steps, float(d))
        num_train = self.num_train_timesteps
        if total > num_train:
            raise UserError(f"hires fix: {hires_steps or steps} steps at denoising strength {d} need a schedule of "
                            f"{total} steps, more than the model's {num_train} training timesteps")
        return HiresFix(float(scale), hires_steps, float(d), upscaler, h2, w2, total, start, scheduler,
                        None if guidance is None else float(guidance))

    def _init_image(self, source, strength, latents, hires_scale, height, width):
        """(InitImage, height, width) of an img2img call (UserError where it cannot run)."""
        if latents is not None:
            raise UserError("give an init image or initial latents, not both")
        if hires_scale is not None:
            raise UserError("img2img and the hires fix do not go together (AUTOMATIC1111's img2img has no hires fix): "
                            "run the hires fix on a text-to-image generation")
        self.check_img2img(strength)
        init = load_init_image(source, width, height, self.check_size)
        return init, init.pixels.shape[0], init.pixels.shape[1]

    def check_img2img(self, denoising_strength) -> None:
        """UserError unless img2img can run at this strength: a strength in (0, 1] and a VAE encoder."""
        _check_strength(denoising_strength)
        self._require_encoder("img2img")

    def _require_encoder(self, what: str) -> None:
        """UserError naming `what` where the backend has no VAE encoder (a bundle from before pm-export 0.5)."""
        if not self.backend.provides(VAE_ENCODER):
            made = self.bundle.manifest.get(F.BK_TOOLS, {}).get("personamagic-runtime", "?")
            raise UserError(f"{what} needs a VAE encoder, and this bundle (pm-export {made}) has none for the "
                            f"{self.backend.name} backend: bundles from pm-export 0.5 on have one; export it again")

    def _encode_pixels(self, pixels: np.ndarray, timings: dict, what: str) -> np.ndarray:
        """(N, H, W, 3) uint8 -> their latents (N, C, h, w) from the VAE encoder, one image per call, in the
        sampler's space (x scaling_factor)."""
        t0 = time.perf_counter()
        with self.backend.network(VAE_ENCODER) as encoder:
            t1 = time.perf_counter()
            x0 = np.concatenate([np.asarray(encoder.run({"image": encoder_input(p)})["latent"], dtype=np.float32)
                                 for p in pixels])
        timings["load_s"] += t1 - t0
        timings["vae_encoder_s"] = timings.get("vae_encoder_s", 0.0) + time.perf_counter() - t1
        _check_finite(f"VAE encoder output ({what})", x0)
        return x0

    def _decode(self, finals: list[np.ndarray], timings: dict) -> np.ndarray:
        """The VAE decoder's images (N, 3, H, W) in [-1, 1] of the groups' final latents."""
        t0 = time.perf_counter()
        with self.backend.network(VAE_DECODER) as vae:
            t1 = time.perf_counter()
            timings["load_s"] += t1 - t0
            # low memory: in tiles above 512 px (pm_runtime/vae_tiles.py) unless the backend tiles itself
            tiled = self.backend.vae_tiling and not self.backend.tiles_vae
            decoded = []
            run = lambda lat: vae.run({"latent": lat})["image"]  # noqa: E731 - (n, 3, H, W) in [-1, 1]
            step = self.backend.decode_batch or max(len(x) for x in finals)
            for x in (x[i:i + step] for x in finals for i in range(0, len(x), step)):
                image, calls = vae_tiles.decode_tiled(run, x, self.dims.vae_scale_factor) if tiled else (run(x), 1)
                decoded.append(image)
                timings["vae_calls"] = timings.get("vae_calls", 0) + calls
            timings["vae_s"] = timings.get("vae_s", 0.0) + time.perf_counter() - t1
        image = np.concatenate(decoded)
        _check_finite("VAE decoder output (image)", image)
        return image

    def _generate(self, prompt, seed, latents, steps, guidance, scheduler, negative_prompt, height, width,
                  num_images, late_stage, concept_stage, allow_no_concept, callback, cancel, emphasis,
                  hires_options, img2img_options=(None, IMG2IMG_STRENGTH)) -> Generation:
        t_start = time.perf_counter()
        concept, dims = self.concept, self.dims
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if not isinstance(text, str):
                raise UserError(f"{name} must be a string (one prompt per call; num_images for several images), "
                                f"got {type(text).__name__}")
        if callback is not None and not callable(callback):
            raise UserError(f"callback must be a callable, got {callback!r}")
        if cancel is not None and not (callable(cancel) or hasattr(cancel, "is_set")):
            raise UserError(f"cancel must be a threading.Event or a callable, got {cancel!r}")
        allow_no_concept = _flag("allow_no_concept", allow_no_concept)
        if not _real(guidance):
            raise UserError(f"guidance must be a finite number, got {guidance!r}")
        steps, seed, height, width, num_images = (None if v is None else _whole(name, v) for name, v in (
            ("steps", steps), ("seed", seed), ("height", height), ("width", width), ("num_images", num_images)))
        prompts = self._encode_prompts(prompt, negative_prompt, allow_no_concept, concept, emphasis, steps)
        warnings, uses_concept = prompts.warnings, prompts.uses_concept
        C, f = dims.latent_channels, dims.vae_scale_factor
        init, strength = img2img_options
        if init is not None:  # img2img: the size is the image's unless given
            init, height, width = self._init_image(init, strength, latents, hires_options[0], height, width)
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.ndim != 4 or latents.shape[1] != C:
                raise UserError(f"latents must be (N, {C}, H/{f}, W/{f}), got {latents.shape}")
            height = latents.shape[2] * f if height is None else height
            width = latents.shape[3] * f if width is None else width
            num_images = latents.shape[0] if num_images is None else num_images
            if latents.shape != (num_images, C, height // f, width // f):
                raise UserError(f"latents {latents.shape} do not match {num_images} image(s) of {width}x{height}")
            _check_finite("initial latents", latents)
        height, width = (512 if height is None else height), (512 if width is None else width)
        num_images = 1 if num_images is None else num_images
        self.check_size(height, width)
        if num_images < 1:
            raise UserError(f"the number of images must be >= 1, got {num_images}")
        if latents is None:
            seed = secrets.randbits(32) if seed is None else seed
            try:
                latents = pm_noise.initial_latents(seed, (num_images, C, height // f, width // f))
            except ValueError as e:
                raise UserError(str(e)) from None
        tables, plan, stage = self.plan(steps, scheduler, late_stage, concept_stage, uses_concept)
        img2img = level = None
        if init is not None:  # the tail of the schedule from the step the strength says, its contexts with it
            first, noised = schedulers.img2img_start(tables.num_steps, float(strength), tables.name)
            img2img = Img2Img(float(strength), first, init.name, init.source_size)
            level = schedulers.slice_tables(tables, noised)  # the noise level the image starts from
            tables, plan = schedulers.slice_tables(tables, first), plan[first:]
        hires = None if hires_options[0] is None else self.hires_fix(height, width, tables.num_steps, *hires_options)
        if hires is not None:  # the second pass: the tail of its own schedule, its contexts by its timesteps
            scheduler2 = hires.scheduler or scheduler
            guidance2 = float(guidance) if hires.guidance is None else hires.guidance
            tables2, plan2, _ = self.plan(hires.schedule_steps, scheduler2, late_stage, concept_stage, uses_concept)
            tables2, plan2 = schedulers.slice_tables(tables2, hires.start), plan2[hires.start:]
        noise_seed = seed if seed is not None else 0
        settings = Settings(prompt, negative_prompt, steps, float(guidance), scheduler, seed, height, width,
                            num_images, late_stage, stage, allow_no_concept, emphasis, hires, img2img)
        timings = {"load_s": 0.0, "text_encoder_s": 0.0, "unet_s": 0.0}  # load_s: engine creation (first use,
        # or every use in low-memory mode)
        # images in groups that fit the UNet's batch (2 rows per image) and the VAE's
        group = max(1, min(self.specs[UNET].axes["batch"].max // 2, self.specs[VAE_DECODER].axes["batch"].max))
        groups = [list(range(i, min(i + group, num_images))) for i in range(0, num_images, group)]
        progress = _Progress(callback, cancel, (tables.num_steps + (tables2.num_steps if hires else 0)) * len(groups))
        if init is not None:  # the seed's noise on the image's latents, at the level of the pass's first step
            x0 = self._encode_pixels(init.pixels[None], timings, "the init image's latents")  # (1, C, h, w)
            start = [schedulers.start_latents(np.repeat(x0, len(g), axis=0), latents[g], level) for g in groups]
        else:
            start = [latents[g] * np.float32(tables.init_noise_sigma) for g in groups]
        finals, step_keys, neg_steps, chunks = self._denoise_pass(
            prompts, plan, tables, start, groups, float(guidance), scheduler, emphasis, noise_seed, None, progress,
            timings, schedule_steps=steps if init is not None else None)
        if hires is not None:
            if hires.upscaler in IMAGE_UPSCALERS:  # A1111's image upscalers: decode, resize, encode again (the
                # first pass's image as A1111 hands it to the upscaler: truncated to uint8)
                pixels = a1111_pixels(self._decode(finals, timings))
                first = self._encode_pixels(np.stack([upscale_image(p, hires.height, hires.width, hires.upscaler)
                                                      for p in pixels]), timings,
                                            "hires fix: the upscaled image's latents")
            else:
                first = upscale(np.concatenate(finals), hires.height // self.dims.vae_scale_factor,
                                hires.width // self.dims.vae_scale_factor, hires.upscaler)
                _check_finite("hires fix: upscaled latents", first)
            eps = pm_noise.initial_latents(noise_seed, first.shape, pass_=1)
            start = [schedulers.start_latents(first[g], eps[g], tables2) for g in groups]
            timings["first_pass_unet_steps"] = progress.done
            finals, _, _, chunks2 = self._denoise_pass(  # prompt editing counts on from the first pass's steps
                prompts, plan2, tables2, start, groups, guidance2, scheduler2, emphasis, noise_seed,
                tables.num_steps, progress, timings)
            chunks = chunks + chunks2
        timings["unet_steps"] = progress.done
        timings["unet_step_ms"] = 1000 * timings["unet_s"] / max(progress.done, 1)

        # ---- image
        image = np.clip(self._decode(finals, timings) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        images = np.round(image * 255).astype(np.uint8)
        nsfw = self._safety_check(images, timings) if self.checker_settings is not None else None
        timings["total_s"] = time.perf_counter() - t_start
        model = str(self.bundle.manifest.get(F.BK_BASE_MODEL, {}).get(F.BM_MODEL_FOLDER, ""))
        step_texts = [text for text, _ in step_keys]
        return Generation(images, settings, concept, uses_concept, plan, tables.timesteps, timings,
                          self.backend.describe(), model, warnings, nsfw,
                          step_texts if len(set(step_texts)) > 1 else None, max(chunks),
                          neg_steps if len(set(neg_steps)) > 1 else None,
                          plan2 if hires else None, tables2.timesteps if hires else None)

    def _denoise_pass(self, prompts: "_Prompts", plan: list[Context], tables, start: list[np.ndarray], groups,
                      guidance: float, scheduler: str, emphasis: str, noise_seed: int, first_pass: int | None,
                      progress: "_Progress", timings: dict, schedule_steps: int | None = None):
        """One denoising pass: its contexts, then each group's loop from its `start` latents (already in the
        sampler's space) -> (final latents per group, the prompt's (text, context) per step, the negative
        prompt's text per step, each text-encoder row's chunks). `first_pass`: None for the first pass; for
        the hires pass, the first pass's step count (its prompt editing and its noise streams).
        `schedule_steps` (img2img): prompt editing is scheduled over that many steps and the pass's steps
        read its first ones, as AUTOMATIC1111's img2img counts them (its denoiser's step from 0)."""
        pass_ = 0 if first_pass is None else 1
        # ---- contexts: one batched text-encoder call (chunked only beyond the engine's max batch); a row
        # per distinct text of the negative prompt's steps (one unless it is scheduled), then one per distinct
        # (text, stage context) of the prompt's steps (one text unless the prompt is scheduled)
        step_keys = prompts.step_keys(plan, first_pass, schedule_steps)
        neg_steps = prompts.neg_per_step(schedule_steps or len(plan), first_pass)[:len(plan)]
        neg_keys = list(dict.fromkeys((text, SUPER_CLASS) for text in neg_steps))
        keys = list(dict.fromkeys(step_keys))
        t0 = time.perf_counter()
        with self.backend.network(TEXT_ENCODER) as te:
            t1 = time.perf_counter()
            encoded = [*prompts.rows(neg_keys, negative=True), *prompts.rows(keys)]
            c_k, c_v, chunks = self._encode(te, encoded)  # (chunks, L, D) each
            weights = _row_weights(encoded, chunks, self.dims.max_length)
            if weights is not None:  # emphasis: on the device where the contexts are (else numpy)
                c_k, c_v = (_emphasise(c, weights, emphasis == "original") for c in (c_k, c_v))
            if max(chunks) > 1:  # a long prompt: each row's chunks one after the other, rows of one length
                index = _chunk_index(chunks)
                c_k, c_v = (_regroup(c, index) for c in (c_k, c_v))  # (len(encoded), N * L, D) each
            timings["load_s"] += t1 - t0
            timings["text_encoder_s"] += time.perf_counter() - t1
        _check_finite("text encoder output (contexts)", c_k, c_v)
        row = {key: i for i, key in enumerate([*neg_keys, *keys])}

        # ---- denoising
        needs_noise = schedulers.get_scheduler(scheduler).needs_noise
        shape = (sum(len(g) for g in groups), *start[0].shape[1:])
        finals = []
        t0 = time.perf_counter()
        with self.backend.network(UNET) as unet:
            t1 = time.perf_counter()
            timings["load_s"] += t1 - t0
            rows = np.array([row[key] for key in step_keys], np.int64)
            neg_rows = (np.array([row[text, SUPER_CLASS] for text in neg_steps], np.int64) if len(neg_keys) > 1
                        else None)  # None: the negative prompt's one row, row 0
            for g, x in zip(groups, start):
                noise = ((lambda i, g=g: pm_noise.step_noise(noise_seed, i, shape, pass_)[g]) if needs_noise else None)
                job = DenoiseJob(x, c_k, c_v, rows, tables, guidance, noise, progress.before(), progress.after(),
                                 neg_rows)
                x = self.backend.denoise(unet, job)
                progress.done += tables.num_steps
                _check_finite(f"denoising loop ({scheduler}, {tables.num_steps} UNet steps) latents", x)
                finals.append(x)
            timings["unet_s"] += time.perf_counter() - t1
        return finals, step_keys, neg_steps, chunks

    def _safety_check(self, images: np.ndarray, timings: dict) -> list[bool]:
        """The bundle's safety checker on the finished images (N, H, W, 3) uint8: flagged ones are
        blacked out in place (as diffusers does); returns the per-image flags."""
        from .safety import clip_input

        t0 = time.perf_counter()
        batch = self.specs[SAFETY_CHECKER].axes["batch"].max
        with self.backend.network(SAFETY_CHECKER) as checker:
            t1 = time.perf_counter()
            scores = np.concatenate([
                checker.run({"clip_input": clip_input(images[i:i + batch], self.checker_settings)})["nsfw_score"]
                for i in range(0, len(images), batch)])
        timings["load_s"] += t1 - t0
        timings["safety_checker_s"] = time.perf_counter() - t1
        flags = [bool(v > 0) for v in scores]
        images[np.array(flags, bool)] = 0
        return flags

    def _encode(self, te, rows: list[tuple[EncodedPrompt, Context]]):
        """Rows -> (c_k, c_v, chunks): c_k and c_v (sum(chunks), L, D), each row's chunks (prompt_encoding)
        one after the other, `chunks` the number of each row. A row is a text's super-class version (the
        negative prompt's texts: their plain one), or its concept version with the table row of the context's
        timestep."""
        L, D = self.dims.max_length, self.dims.text_dim
        versions = [enc.version(c.is_concept)[0] for enc, c in rows]
        chunks = [len(v) // L for v in versions]
        ids = np.concatenate(versions).reshape(-1, L)
        n = len(ids)
        embeds, bypass = np.zeros((n, L, D), np.float32), np.zeros((n, L, D), np.float32)
        mask = np.zeros((n, L), bool)
        start = np.cumsum([0, *chunks])
        for r, (enc, c) in enumerate(rows):
            if c.is_concept:  # (a text without the concept word reads the super-class context: step_keys)
                E, B = self.concept.table.row(c.t)  # (K, D) each
                m = enc.mask.reshape(-1, L)
                where = slice(start[r], start[r + 1])
                mask[where] = m
                embeds[where][m], bypass[where][m] = E[enc.slots[enc.mask]], B[enc.slots[enc.mask]]
        batch = self.specs[TEXT_ENCODER].axes["batch"].max
        outs = [te.run({"input_ids": ids[i:i + batch], "concept_embeds": embeds[i:i + batch],
                        "bypass": bypass[i:i + batch], "concept_mask": mask[i:i + batch]})
                for i in range(0, n, batch)]
        if len(outs) == 1:  # as the network returned them (a backend's device arrays stay on the device)
            return outs[0]["c_k"], outs[0]["c_v"], chunks
        return np.concatenate([o["c_k"] for o in outs]), np.concatenate([o["c_v"] for o in outs]), chunks

    def close(self) -> None:
        """Free the backend's engines (device memory, sessions) now instead of when the Pipeline is
        garbage-collected. A later generate() loads them again."""
        self.backend.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _row_weights(rows: list[tuple[EncodedPrompt, Context]], chunks: list[int], length: int) -> np.ndarray | None:
    """(sum(chunks), L) emphasis weights of the text encoder's rows (Pipeline._encode: each row's chunks; a
    concept context weighs its prompt's concept version's positions, the others the super-class version's),
    or None where every weight is 1."""
    weights = [e.version(c.is_concept)[1] for e, c in rows]
    if all(w is None for w in weights):
        return None
    return np.concatenate([np.ones(n * length, np.float32) if w is None else w
                           for w, n in zip(weights, chunks)]).reshape(-1, length)


def _chunk_index(chunks: list[int]) -> np.ndarray:
    """(rows, N) text-encoder row of each chunk of each context row, N the least common multiple of the rows'
    chunk counts: a row of c chunks reads them N / c times over (prompt_encoding: the same attention)."""
    N = math.lcm(*chunks)
    start = np.cumsum([0, *chunks])
    return np.array([[start[r] + j % c for j in range(N)] for r, c in enumerate(chunks)], np.int64)


def _regroup(contexts, index: np.ndarray):
    """Contexts (chunks, L, D) -> (rows, N * L, D) by `index` (rows, N): a device array on its device."""
    if hasattr(contexts, "regrouped"):
        return contexts.regrouped(index)
    c = np.asarray(contexts)
    return c[index].reshape(len(index), -1, c.shape[-1])


def _emphasise(contexts, weights: np.ndarray, normalize: bool):
    """apply_emphasis on the text encoder's output as the backend returned it: a device array weighs in
    place on its device (torch backends), anything else as a numpy array."""
    if hasattr(contexts, "emphasised"):
        return contexts.emphasised(weights, normalize)
    return apply_emphasis(np.asarray(contexts), weights, normalize)


def _flag(name: str, value) -> bool:
    """`value` where it is a bool (numpy's too); UserError for "false", 0, None: a string from a config file
    would otherwise switch an option on by being non-empty."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise UserError(f"{name} must be True or False, got {value!r}")


def _check_strength(d) -> None:
    if not _real(d) or not 0.0 < d <= 1.0:
        raise UserError(f"the denoising strength must be a number in (0, 1], got {d!r}")


def _real(value) -> bool:
    """A finite real number (int, float, numpy's), not a bool or a string."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and bool(np.isfinite(value))


def _whole(name: str, value) -> int:
    """`value` as an int where it is one (int, numpy integer); UserError for 1.5, "256", True."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise UserError(f"{name} must be a whole number, got {value!r}") from None


__all__ = ["NEGATIVE_PROMPT", "Cancelled", "Generation", "NonFiniteError", "Pipeline", "Settings"]
