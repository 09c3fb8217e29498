"""`pm-run --settings-from IMAGE`: the settings an image was made with, read back as pm-run options.

pm-run writes every image's settings into the file as AUTOMATIC1111 does (a PNG `parameters` chunk,
EXIF UserComment in JPEG and WebP; `pm_runtime.png`). This module turns that text (or a text file
holding it) back into RunConfig values, so that the same bundle and backend make the same image again;
an option given on the command line wins over the image's value (same settings, another seed). An image
from a batch is made again by generating its whole batch (the initial noise of image i depends on the
batch it was drawn with) and keeping that one image.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .latent_upscale import A1111_NAMES as UPSCALER_NAMES
from .png import SAMPLER_NAMES, SCHEDULE_TYPE_NAMES, parse_parameters, read_parameters
from .prompt_encoding import EMPHASIS_MODES
from .stages import LATE_POLICIES

SCHEDULERS_BY_NAME = {v: k for k, v in SAMPLER_NAMES.items()}
# what the "Automatic" schedule type is for a sampler in AUTOMATIC1111 1.9 and later (its sampler table;
# the others: the model's own discretisation)
_AUTOMATIC = {"DPM++ 2M": "Karras", "DPM++ 2M SDE": "Exponential"}
# A1111 schedule types some pm-run scheduler steps on (and Polyexponential at rho 1; A1111's others: DDIM, Karras
# Exponential)
_SCHEDULE_TYPES = ("Karras", "Exponential", "Beta", *SCHEDULE_TYPE_NAMES.values())
# parameter keys that are records of the run, not settings (compared or ignored, never applied)
_RECORDS = {"Concept hash", "Model", "Backend", "Version", "Batch pos"}
_KEYS = {"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Concept",
         "Concept stage", "Late stage", "Batch size", "Emphasis", "Hires upscale", "Hires steps", "Hires upscaler",
         "Denoising strength", "Hires sampler", "Hires schedule type", "Hires CFG Scale", "Schedule rho",
         "Schedule min sigma", "Schedule max sigma"} | _RECORDS
UPSCALERS_BY_NAME = {v: k for k, v in UPSCALER_NAMES.items()}
EMPHASIS_BY_NAME = {v: k for k, v in EMPHASIS_MODES.items()}
# pm-run versions that read emphasis syntax as words (and recorded no Emphasis): their images are remade so
_WORDS_ONLY_VERSIONS = {"personamagic-runtime 0.1.0"}
# pm-run versions before 0.3: every prompt cut at CLIP's 75 tokens (one chunk, BREAK ignored), the negative
# prompt's editing syntax read as words
BEFORE_0_3 = {"personamagic-runtime 0.1.0", "personamagic-runtime 0.2.0"}


@dataclass(frozen=True)
class ImageSettings:
    source: Path
    values: dict = field(default_factory=dict)  # RunConfig field -> value, for those not given explicitly
    batch_pos: int | None = None  # keep image `batch_pos` of a batch of values["num_images"]
    concept_hash: str | None = None  # the first 12 hex digits of the concept table's sha256
    model: str | None = None
    backend: str | None = None
    ignored: tuple[str, ...] = ()  # keys pm-run does not use (AUTOMATIC1111's "Model hash", "Clip skip", ...)
    version: str | None = None  # the pm-run that made the image ("personamagic-runtime 0.2.0")

    def generate_kwargs(self) -> dict:
        """The values as Pipeline.generate keyword arguments (all but the concept, which is
        Pipeline.use_concept's: `self.values.get("concept")`); the image is then
        `result.images[self.batch_pos or 0]`. An img2img image (values["img2img"]) needs its init image too:
        generate(..., init_image=...).

            s = reproduce.load("knight.png")
            pipe.use_concept(s.values.get("concept"))
            image = pipe.generate(**s.generate_kwargs()).images[s.batch_pos or 0]
        """
        return {k: v for k, v in self.values.items() if k not in ("concept", "img2img")}

    def describe(self) -> str:
        v = self.values
        parts = [f"{k} {v[k]}" for k in ("seed", "steps", "scheduler", "guidance") if k in v]
        if "width" in v and "height" in v:
            parts.append(f"{v['width']}x{v['height']}")
        else:  # one side given on the command line
            parts += [f"{k} {v[k]}" for k in ("width", "height") if k in v]
        if v.get("concept"):
            parts.append(f"concept {v['concept']}")
        if v.get("hires_scale"):
            parts.append(f"hires fix x{v['hires_scale']}")
        if v.get("img2img"):
            parts.append("img2img" + (f" at denoising strength {v['denoising_strength']}"
                                      if "denoising_strength" in v else ""))
        if self.batch_pos is not None:
            parts.append(f"image {self.batch_pos + 1} of a batch of {v['num_images']} (the whole batch is generated, "
                         "that image kept)")
        text = f"settings from {self.source}: " + (", ".join(parts) or "the prompt")
        if self.ignored:
            text += f"; not used: {', '.join(self.ignored)}"
        return text


def read_text(path: Path) -> str:
    """The parameters text of an image file pm-run or AUTOMATIC1111 wrote, or of a text file holding it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            text = read_parameters(im)
        if text is None:
            raise UserError(f"--settings-from {path}: the image carries no generation settings (no PNG 'parameters' "
                            "chunk, no EXIF UserComment)")
        return text
    except UnidentifiedImageError:
        pass
    except OSError as e:
        raise UserError(f"--settings-from {path}: {e.strerror or e}") from None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--settings-from {path}: neither an image nor a UTF-8 text file ({e})") from None


def _int(path, key, text, lo=0) -> int:
    if not re.fullmatch(r"\d+", text.strip()) or int(text) < lo:
        raise UserError(f"--settings-from {path}: {key} {text!r} is not a whole number >= {lo}")
    return int(text)


def _float(path, key, text) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"--settings-from {path}: {key} {text!r} is not a number")
    return value


def _scheduler(source: Path, sampler: str, schedule: str | None, rho: str | None = None) -> str:
    """pm-run's scheduler for an A1111 sampler name and schedule type: "DPM++ 2M Karras" (A1111 before 1.9,
    and pm-run) or "DPM++ 2M" with "Schedule type: Karras" (A1111 1.9 and later, where "Automatic" is the
    sampler's own default: Karras for DPM++ 2M, Exponential for DPM++ 2M SDE; "Uniform" the model's own
    discretisation, the sampler's plain form here, as a sampler name without a schedule type was before
    1.9); Beta (A1111 1.10), SGM Uniform, Normal, Simple, KL Optimal and Align Your Steps only as schedule
    types, as A1111 and pm-run write them; Polyexponential at its default rho 1 is the Exponential schedule.
    `rho`: A1111's "Schedule rho" (written where its setting differs from the type's default: Karras 7,
    Polyexponential 1), which pm-run's levels do not take."""
    base, kind = sampler, None
    for k in _SCHEDULE_TYPES:
        if sampler.endswith(" " + k):
            base, kind = sampler[:-len(k) - 1], k
    if schedule == "Polyexponential":  # exp(ramp^rho * log range): at rho 1 the exponential levels
        if rho is not None and _float(source, "Schedule rho", rho) != 1.0:
            raise UserError(f"--settings-from {source}: its Polyexponential levels used rho {rho} (A1111's "
                            "'Schedule rho'; at rho 1 they are the Exponential ones pm-run has): give --scheduler")
        schedule = "Exponential"
    automatic = schedule == "Automatic"
    if automatic:
        schedule = _AUTOMATIC.get(base)  # None: the sampler's plain form
    elif schedule == "Uniform":
        schedule = None
    if schedule is not None:
        if schedule not in _SCHEDULE_TYPES:
            raise UserError(f"--settings-from {source}: schedule type {schedule!r}"
                            + (f" (what 'Automatic' is for {base})" if automatic else "")
                            + f" is not one pm-run has ({', '.join(_SCHEDULE_TYPES)}, Uniform, or Automatic where it "
                              "means one of those or the plain schedule): give --scheduler")
        kind = schedule
    if rho is not None and kind == "Karras" and _float(source, "Schedule rho", rho) != 7.0:
        raise UserError(f"--settings-from {source}: its Karras levels used rho {rho} (A1111's 'Schedule rho'; "
                        "pm-run's are rho 7): give --scheduler")
    name = SCHEDULERS_BY_NAME.get(f"{base} {kind}" if kind else base)
    if name is None:
        what = f"sampler {sampler!r}" + (f" with schedule type {schedule!r}" if schedule else "")
        raise UserError(f"--settings-from {source}: {what} is not one pm-run has "
                        f"({', '.join(SCHEDULERS_BY_NAME)}): give --scheduler")
    return name


def parse(text: str, source: Path, given: set[str] = frozenset()) -> ImageSettings:
    """ImageSettings from a parameters text. `given`: RunConfig fields set on the command line: those are
    neither read nor checked (an image from a sampler pm-run lacks can still lend its prompt)."""
    p = parse_parameters(text)
    if not p["Prompt"].strip() and "prompt" not in given:
        raise UserError(f"--settings-from {source}: no prompt in its settings")
    v: dict = {}
    take = lambda f: f not in given  # noqa: E731
    if take("prompt"):
        v["prompt"] = p["Prompt"]
    if take("negative_prompt"):
        v["negative_prompt"] = p["Negative prompt"]  # "" where the image had none (not pm-run's default)
    if take("steps") and "Steps" in p:
        v["steps"] = _int(source, "Steps", p["Steps"], lo=1)
    if take("scheduler") and "Sampler" in p:
        cut = {k: p[k] for k in ("Schedule min sigma", "Schedule max sigma") if k in p}
        if cut:  # A1111's sigma_min / sigma_max settings, written where set
            raise UserError(f"--settings-from {source}: its noise levels were cut to "
                            + ", ".join(f"{k.split()[1]} sigma {x}" for k, x in cut.items())
                            + " (A1111's 'Schedule min/max sigma'); pm-run's span the model's range: give --scheduler")
        v["scheduler"] = _scheduler(source, p["Sampler"], p.get("Schedule type"), p.get("Schedule rho"))
    if take("guidance") and "CFG scale" in p:
        v["guidance"] = _float(source, "CFG scale", p["CFG scale"])
    if take("seed") and "Seed" in p:
        if not re.fullmatch(r"\d+", p["Seed"]):
            raise UserError(f"--settings-from {source}: its seed is {p['Seed']!r} (the image was not made from a "
                            "seed): give --seed")
        v["seed"] = int(p["Seed"])
    if "Size" in p and (take("width") or take("height")):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", p["Size"])
        if not m:
            raise UserError(f"--settings-from {source}: Size {p['Size']!r} is not WIDTHxHEIGHT")
        if take("width"):
            v["width"] = int(m.group(1))
        if take("height"):
            v["height"] = int(m.group(2))
    if take("concept") and "Concept" in p:
        v["concept"] = p["Concept"]
    if take("allow_no_concept") and "Concept" not in p:
        v["allow_no_concept"] = True  # made without a concept: its prompt has no concept word
    if take("concept_stage") and "Concept stage" in p:
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", p["Concept stage"])
        if not m:
            raise UserError(f"--settings-from {source}: Concept stage {p['Concept stage']!r} is not LOW-HIGH")
        v["concept_stage"] = (int(m.group(1)), int(m.group(2)))
    if take("late_stage") and "Late stage" in p:
        if p["Late stage"] not in LATE_POLICIES:
            raise UserError(f"--settings-from {source}: Late stage {p['Late stage']!r} is not one of "
                            f"{', '.join(LATE_POLICIES)}")
        v["late_stage"] = p["Late stage"]
    if take("emphasis"):
        if "Emphasis" in p:
            if p["Emphasis"] not in EMPHASIS_BY_NAME:
                raise UserError(f"--settings-from {source}: Emphasis {p['Emphasis']!r} is not one of "
                                f"{', '.join(EMPHASIS_BY_NAME)}: give --emphasis")
            v["emphasis"] = EMPHASIS_BY_NAME[p["Emphasis"]]
        else:  # AUTOMATIC1111's default, or an older pm-run's words
            v["emphasis"] = "none" if p.get("Version") in _WORDS_ONLY_VERSIONS else "original"
    if "Hires resize" in p and take("hires_scale"):
        raise UserError(f"--settings-from {source}: its hires fix resized to {p['Hires resize']} (A1111's 'Hires "
                        "resize'); pm-run's scales both sides by one factor: give --hires-scale")
    if "Hires upscale" in p:  # A1111's hires fix (Size is the first pass's)
        if take("hires_scale"):
            v["hires_scale"] = _float(source, "Hires upscale", p["Hires upscale"])
        if take("hires_steps") and "Hires steps" in p:
            v["hires_steps"] = _int(source, "Hires steps", p["Hires steps"])
        if take("denoising_strength") and "Denoising strength" in p:
            v["denoising_strength"] = _float(source, "Denoising strength", p["Denoising strength"])
        if take("hires_upscaler") and "Hires upscaler" in p:
            if p["Hires upscaler"] not in UPSCALERS_BY_NAME:
                raise UserError(f"--settings-from {source}: its hires fix upscaled with {p['Hires upscaler']!r}; "
                                f"pm-run has {', '.join(UPSCALERS_BY_NAME)}: give --hires-upscaler")
            v["hires_upscaler"] = UPSCALERS_BY_NAME[p["Hires upscaler"]]
        if take("hires_scheduler") and ("Hires sampler" in p or "Hires schedule type" in p):
            # A1111 writes what differs from the first pass's (its get_hr_sampler_and_scheduler reads it so)
            sampler = p.get("Hires sampler", "Use same sampler")
            schedule = p.get("Hires schedule type", "Use same scheduler")
            name = _scheduler(source, p.get("Sampler", "") if sampler == "Use same sampler" else sampler,
                              p.get("Schedule type") if schedule == "Use same scheduler" else schedule,
                              p.get("Schedule rho"))
            if name != v.get("scheduler"):
                v["hires_scheduler"] = name
        if take("hires_guidance") and "Hires CFG Scale" in p:
            v["hires_guidance"] = _float(source, "Hires CFG Scale", p["Hires CFG Scale"])
    pos = None
    if take("num_images") and "Batch size" in p:
        size = _int(source, "Batch size", p["Batch size"], lo=1)
        pos = _int(source, "Batch pos", p.get("Batch pos", "0"))
        if pos >= size:
            raise UserError(f"--settings-from {source}: Batch pos {pos} is outside a batch of {size}")
        v["num_images"] = size
    if "Denoising strength" in p and "Hires upscale" not in p:  # an img2img image: its init image is needed
        if take("denoising_strength"):
            v["denoising_strength"] = _float(source, "Denoising strength", p["Denoising strength"])
        v["img2img"] = True
    ignored = tuple(k for k in p if k not in _KEYS)
    return ImageSettings(Path(source), v, pos, p.get("Concept hash"), p.get("Model"), p.get("Backend"), ignored,
                         p.get("Version"))


def load(path: Path, given: set[str] = frozenset()) -> ImageSettings:
    return parse(read_text(path), Path(path), given)


__all__ = ["ImageSettings", "load", "parse", "read_text"]
