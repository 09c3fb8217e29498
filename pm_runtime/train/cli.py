"""`pm-train`: learn a face concept (a PersonaMagic mapper) from a few photos."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ..errors import UserError

HELP = """Learn a face concept from photos of one person and write CONCEPT.pt.

Only a small mapper network trains; the Stable Diffusion model stays frozen. Defaults follow
the published PersonaMagic settings: 4 tokens, concept stage 400..800, 1000 optimiser steps
of batch 1 with 2-step gradient accumulation, AdamW, effective learning rate 1e-4, 512 px.

\b
Example (the project's tiny random model, seconds on a CPU):
  pm-make-tiny-model tiny-sd --photos photos   # the model and 4 synthetic photos
  pm-train --model tiny-sd --images photos/ --out concept.pt --resolution 64 --steps 20
"""


def _warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", required=True, type=click.Path(path_type=Path),
              help="Local Stable Diffusion 1.x/2.x folder in the diffusers layout.")
@click.option("--images", required=True, type=click.Path(path_type=Path),
              help="A folder of photos of one person (or a single photo).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Concept file to write (concept.pt). An existing file is replaced only if it is a PyTorch file "
                   "(an earlier concept or checkpoint).")
@click.option("--image-encoder", type=click.Path(path_type=Path), default=None,
              help="Local CLIP ViT-B/32 folder for e_img. Required unless MODEL has image_encoder/.")
@click.option("--super-class", default="face", show_default=True,
              help="Super-class word: one token; used before the concept stage and to initialise the tokens.")
@click.option("--concept-word", default="<persona>", show_default=True,
              help="The word you will write in prompts for this person: a name in angle brackets, like <anna>.")
@click.option("--num-tokens", default=4, show_default=True, type=int, help="K placeholder tokens.")
@click.option("--stage", nargs=2, type=int, default=(400, 800), show_default=True, metavar="LO HI",
              help="Concept-stage timesteps [LO, HI): trained t is drawn there.")
@click.option("--steps", default=1000, show_default=True, type=int, help="Optimiser steps.")
@click.option("--lr", default=5e-5, show_default=True, type=float,
              help="Base learning rate. The rate used is LR x grad-accum x batch-size (the published rule): "
                   "the defaults give an effective 1e-4.")
@click.option("--grad-accum", default=2, show_default=True, type=int, help="Micro-steps per optimiser step.")
@click.option("--batch-size", default=1, show_default=True, type=int, help="Images per micro-step.")
@click.option("--resolution", default=512, show_default=True, type=int, help="Training resolution (images are squashed).")
@click.option("--center-crop/--no-center-crop", default=False, show_default=True,
              help="Crop the centre square before resizing (the published code squashes).")
@click.option("--mask-dir", type=click.Path(path_type=Path), default=None,
              help="Soft masks named like the images [default: IMAGES/mask/ when present; else no mask].")
@click.option("--clipseg", type=click.Path(path_type=Path), default=None,
              help="Local CLIPSeg (rd64-refined) folder: make face masks with it instead of reading a mask folder.")
@click.option("--reference-image", type=click.Path(path_type=Path), default=None,
              help="The photo whose embedding the concept keeps for baking [default: the first image by name].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Precision of the frozen networks (the mapper trains in fp32). fp32 disables TF32.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute UNet activations in backward (less memory).")
@click.option("--channels-last", is_flag=True, help="Run the UNet in channels-last memory layout.")
@click.option("--cuda-graph", is_flag=True,
              help="CUDA only: capture text encoder + UNet forward/backward in CUDA graphs (much less launch "
                   "overhead at batch 1; a few seconds of capture at start).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue from a checkpoint (or a finished concept file) of the same run settings.")
@click.option("--save-every", default=0, show_default=True, type=int,
              help="Write OUT_STEM.stepN.pt every N steps (0: only the final file).")
@click.option("--preview-every", default=0, show_default=True, type=int,
              help="Write OUT_STEM.previewN.png every N steps: 'a photo of CONCEPT-WORD', 20 DPM-Solver++ steps.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_main(**kw) -> None:
    saved: list[Path] = []  # the checkpoints this run wrote, in order
    try:
        _run(saved=saved, **kw)
    except UserError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        click.echo(f"interrupted; resume with --resume {saved[-1]}" if saved else
                   "interrupted before this run wrote a checkpoint (--save-every N writes one every N steps)",
                   err=True)
        sys.exit(130)


def _run(resume, quiet, saved: list, **kw) -> None:
    from tqdm.auto import tqdm

    from ..concept_table import is_torch_file
    from .concept_file import Concept, atomic_torch_save, load_concept_dict
    from .trainer import TrainConfig, Trainer, peak_memory_bytes

    kw = {k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()}
    cfg = TrainConfig(**kw)
    out = Path(cfg.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'concept.pt'}")
    if not out.parent.exists():
        raise UserError(f"--out: folder {out.parent} does not exist")
    if out.is_file() and not is_torch_file(out):  # a concept or checkpoint is replaced; a photo is not
        raise UserError(f"--out {out} exists and is not a concept file; refusing to overwrite it")
    resume_dict = load_concept_dict(resume) if resume else None  # fail early on a bad file
    trainer = Trainer(cfg, warn=_warn)
    if resume_dict is not None:
        trainer.load_train_state(resume_dict)
        if trainer.step >= cfg.steps:
            raise UserError(f"--resume: the checkpoint already has {trainer.step} steps (>= --steps {cfg.steps})")
    click.echo(f"training {cfg.concept_word} on {len(trainer.image_names)} image(s), device {trainer.device}, "
               f"{cfg.precision}, effective lr {cfg.effective_lr:g}, steps {trainer.step}->{cfg.steps}", err=True)
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc="pm-train", unit="step", disable=quiet, file=sys.stderr)
    start = time.perf_counter() - trainer.elapsed
    while trainer.step < cfg.steps:
        loss = trainer.optimizer_step()
        trainer.elapsed = time.perf_counter() - start
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if cfg.save_every and trainer.step % cfg.save_every == 0 and trainer.step < cfg.steps:
            checkpoint = out.with_name(f"{out.stem}.step{trainer.step}.pt")
            _save(atomic_torch_save, trainer.concept_dict(True), checkpoint, saved)
            saved.append(checkpoint)
        if cfg.preview_every and trainer.step % cfg.preview_every == 0:
            preview = out.with_name(f"{out.stem}.preview{trainer.step}.png")
            _save(_write_png, _preview(trainer, Concept), preview, saved)
    bar.close()
    _save(atomic_torch_save, trainer.concept_dict(True), out, saved, final=True)
    peak = peak_memory_bytes(trainer.device) / 2**30
    what = "GPU memory (allocated)" if trainer.device.type == "cuda" else "RSS"
    final = trainer.loss_history[-1] if trainer.loss_history else float("nan")
    click.echo(f"wrote {out}: {trainer.step} steps in {trainer.elapsed:.1f} s, final loss {final:.4f}, "
               f"peak {what} {peak:.2f} GiB", err=True)


def _save(write, obj, path: Path, saved: list, final: bool = False) -> None:
    """write(obj, path); a full disk or an unwritable folder is a one-line error that says what survives."""
    try:
        write(obj, path)
    except OSError as e:
        lost = "; the trained concept was NOT saved" if final else ""
        last = f" (the last checkpoint is {saved[-1]}: --resume it)" if saved else ""
        raise UserError(f"cannot write {path}: {e.strerror or e}{lost}{last}") from None


def _write_png(img, path: Path) -> None:
    from ..concept_table import atomic_write_bytes
    from ..png import png_bytes

    atomic_write_bytes(png_bytes(img), path)  # temp file + rename, removed if the write fails


def _preview(trainer, Concept):
    """The preview image: 'a photo of CONCEPT-WORD' from the reference generator, 20 DPM-Solver++ steps."""
    from .reference import Reference

    mapper = trainer.mapper
    mapper.eval()
    concept = Concept(mapper, trainer.cfg.concept_word, trainer.cfg.super_class, trainer.cfg.num_tokens,
                      trainer.reference["embedding"], trainer.reference["sha256"], trainer.base.fingerprint, {})
    ref = Reference(trainer.base, trainer.placeholders, concept, trainer.device, trainer.dtype)
    r = trainer.cfg.resolution
    img = ref.generate(f"a photo of {trainer.cfg.concept_word}", seed=0, height=r, width=r, steps=20)[0]
    mapper.train()
    return img
