"""A tiny *random* Stable-Diffusion-1.x folder in the exact diffusers layout (DESIGN.md §4).

No machine that builds or tests this project reaches a model hub, so tests, CI and the demo run
on a model this module writes: same folder layout, same component classes and wiring as SD 1.5
(UNet with cross-attention everywhere, VAE with scale factor 8, CLIP text encoder + CLIP BPE
tokenizer, SD 1.5's PNDM scheduler config), plus a stand-in for the separate CLIP ViT-B/32 image
encoder (512-wide ``image_embeds``). Weights are random: images are noise, but every code path,
shape and file format is the real one, and everything is byte-for-byte deterministic in ``seed``.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import shutil
import tempfile

import click

from ..concept_table import atomic_write_bytes
from ..tokenizer import bytes_to_unicode  # one byte table for the writer and the reader
from . import templates

# Network sizes: the smallest that still exercise every SD 1.x code path, fast on a CPU.
UNET_CONFIG = dict(
    sample_size=8,  # 8 latent px -> 64x64 images (vae scale factor 8)
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,  # = text encoder hidden size, as in SD (768 there)
    attention_head_dim=8,  # diffusers' legacy name: it is the number of heads for SD 1.x
    norm_num_groups=8,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    # four blocks -> three downsamplings -> scale factor 2**3 = 8, like SD's VAE
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
TEXT_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=32,
)
VISION_CONFIG = dict(
    image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, projection_dim=512,  # ViT-B/32's image_embeds width
)
# SD 1.5's scheduler/scheduler_config.json, key for key (clip_sample is not a PNDM argument;
# SD 1.5 carries it anyway and diffusers ignores it, so we do too).
# SD 1.5's scheduler file as published: no timestep_spacing key, so each scheduler class uses
# its own default as diffusers would (DDIM/PNDM "leading", DPM-Solver/Euler "linspace").
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77
# Words beyond the templates that prompts, tests and the demo use; super-classes must be 1 token.
EXTRA_WORDS = (
    "face person man woman boy girl child people portrait photo photograph picture image "
    "knight astronaut beach painting style oil watercolor sketch anime cartoon drawing art "
    "wearing hat glasses smiling standing sitting in on at of with and the a an as by for to "
    "city street forest mountain snow space moon sea sunset night studio lighting background "
    "high detailed realistic blurry ugly deformed dog cat van gogh"
).split()
# CLIP's pre-tokenizer (the same regex transformers and openai/CLIP use), on lower-cased text.
_PRETOKENIZE = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+"""
)




def template_words() -> list[str]:
    """Every pre-token of the method's fixed strings plus EXTRA_WORDS, sorted (deterministic)."""
    texts = [*templates.IMAGENET_TEMPLATES_SMALL, *templates.SCENE_TEMPLATES,
             templates.NEGATIVE_PROMPT, *templates.CLIPSEG_TEMPLATES, *EXTRA_WORDS]
    words = set()
    for text in texts:  # "{}" is the placeholder slot, not a word
        words.update(_PRETOKENIZE.findall(text.replace("{}", " ").lower()))
    return sorted(words)


def build_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocab + merges in which each word of `words` is a single token.

    Layout as in CLIP: 256 byte symbols, the same with ``</w>``, merged tokens in merge order,
    then <|startoftext|>, <|endoftext|>. The byte alphabet guarantees that any text (unicode,
    emoji) falls back to byte symbols instead of the unknown token. Merges are *learned* with
    greedy BPE on the word list (ties broken by the pair's text), so their order is valid (parts
    exist before) and the tokenizer's lowest-rank-first merging re-creates each word whole;
    hand-ordered per-word chains would break each other ("h o" before "p h" splits "photo").
    """
    byte_syms = list(bytes_to_unicode().values())
    vocab_list = byte_syms + [s + "</w>" for s in byte_syms]
    enc = bytes_to_unicode()
    corpus = []
    for w in words:
        syms = [enc[b] for b in w.encode("utf-8")]
        corpus.append(syms[:-1] + [syms[-1] + "</w>"])
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for syms in corpus:
            for pair in zip(syms, syms[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        if joined not in vocab_list:
            vocab_list.append(joined)
        for i, syms in enumerate(corpus):
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and (syms[j], syms[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            corpus[i] = out
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def _write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def _write_tokenizer(folder: pathlib.Path) -> dict[str, int]:
    vocab, merges = build_bpe(template_words())
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(folder / "tokenizer_config.json", {
        **specials, "tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True, "errors": "replace", "add_prefix_space": False})
    return vocab


def _write_safety_checker(root: pathlib.Path, seed: int) -> None:
    """A tiny StableDiffusionSafetyChecker (random CLIP vision tower, 224 px, 16-wide projection)
    and its feature_extractor/, as real SD folders have them. Its concept thresholds are diffusers'
    initial ones (1.0): a cosine never exceeds 1, so nothing is flagged unless a test lowers them."""
    import torch
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(seed + 4)
    vision = {k: v for k, v in VISION_CONFIG.items() if k != "projection_dim"}
    cfg = transformers.CLIPConfig(text_config=dict(TEXT_CONFIG), vision_config=vision, projection_dim=16)
    checker = StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():  # distinct concept directions (diffusers initialises them all to ones)
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
    checker.save_pretrained(root / "safety_checker", safe_serialization=True)
    _write_json(root / "feature_extractor" / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
        "crop_size": {"height": 224, "width": 224}, "do_resize": True, "do_center_crop": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3})


def _build(root: pathlib.Path, seed: int, safety_checker: bool = False) -> None:
    """Write every component under `root` (an empty folder)."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vocab = _write_tokenizer(root / "tokenizer")

    # Each network gets its own seed offset so changing one config does not shift the others.
    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(root / "unet", safe_serialization=True)
    torch.manual_seed(seed + 1)
    AutoencoderKL(**VAE_CONFIG).save_pretrained(root / "vae", safe_serialization=True)
    torch.manual_seed(seed + 2)
    text_cfg = transformers.CLIPTextConfig(
        **TEXT_CONFIG, vocab_size=len(vocab), bos_token_id=vocab[BOS],
        # eos = the real <|endoftext|> id: CLIPTextModel then pools at the first EOS token
        # (with the legacy eos_token_id=2 it would take argmax(input_ids) instead).
        eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    transformers.CLIPTextModel(text_cfg).eval().save_pretrained(
        root / "text_encoder", safe_serialization=True)
    torch.manual_seed(seed + 3)
    vision_cfg = transformers.CLIPVisionConfig(**VISION_CONFIG)
    transformers.CLIPVisionModelWithProjection(vision_cfg).eval().save_pretrained(
        root / "image_encoder", safe_serialization=True)
    # Written by hand (what CLIPImageProcessor.save_pretrained writes) so it needs no torchvision.
    _write_json(root / "image_encoder" / "preprocessor_config.json", {
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224},
        "crop_size": {"height": 224, "width": 224}, "do_resize": True, "do_center_crop": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3})

    if safety_checker:
        _write_safety_checker(root, seed)
    version = diffusers.__version__
    _write_json(root / "scheduler" / "scheduler_config.json",
                {**SCHEDULER_CONFIG, "_diffusers_version": version})
    _write_json(root / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": version,
        "feature_extractor": ["transformers", "CLIPImageProcessor"] if safety_checker else [None, None],
        "safety_checker": (["stable_diffusion", "StableDiffusionSafetyChecker"] if safety_checker
                           else [None, None]),
        # Not a pipeline component: real SD folders have no image encoder (DESIGN.md §4); the
        # runtime loads image_encoder/ itself, standing in for a separate CLIP ViT-B/32 folder.
        "image_encoder": [None, None],
        "requires_safety_checker": bool(safety_checker),
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })


def make_tiny_model(out_dir, seed: int = 0, *, overwrite: bool = False, safety_checker: bool = False) -> pathlib.Path:
    """Write the tiny random SD 1.x folder to `out_dir` and return its path.

    Same `seed` -> byte-identical files. Atomic: built in a temp folder next to `out_dir`, then
    renamed, so a crash never leaves a half-written model. Raises FileExistsError if `out_dir`
    exists and is not empty, unless `overwrite` (then the old folder is swapped out and removed
    only after the new one is complete); even then, a non-empty folder that is not a diffusers model
    folder (no model_index.json: a typo such as `.` or `~`) or a file is never replaced.
    """
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; use --force (overwrite=True in Python) to replace it")
        if not (out / "model_index.json").is_file():
            raise FileExistsError(f"{out} exists and is not a diffusers model folder (no model_index.json); "
                                  "refusing to replace it even with --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    import transformers.utils.logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bars for a 5 MB model
    try:
        _build(tmp, seed, safety_checker)
        # mkdtemp makes 0700 and safetensors writes come out 0600; a model folder is shared data.
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        old = None
        if out.exists():
            # Swap: move the old folder aside, move the new one in, then delete the old one.
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "model")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out


def write_demo_photos(folder: pathlib.Path, n: int = 4, seed: int = 0, size: int = 256) -> list[pathlib.Path]:
    """A few synthetic 'photos' of one cartoon face (drawn, not real people), for the demo run."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        bg = tuple(int(v) for v in rng.integers(40, 200, 3))
        im = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(im)
        cx, cy = size // 2 + int(rng.integers(-20, 21)), size // 2 + int(rng.integers(-15, 16))
        r = size // 4
        d.ellipse((cx - r, cy - int(r * 1.25), cx + r, cy + int(r * 1.25)), fill=(224, 180, 150))  # head
        d.pieslice((cx - r, cy - int(r * 1.4), cx + r, cy), 180, 360, fill=(70, 45, 30))  # hair
        for ex in (cx - r // 2, cx + r // 2):  # eyes
            d.ellipse((ex - 8, cy - 10, ex + 8, cy + 4), fill=(255, 255, 255))
            d.ellipse((ex - 4, cy - 7, ex + 4, cy + 1), fill=(40, 80, 40))
        d.arc((cx - r // 2, cy + r // 4, cx + r // 2, cy + int(r * 0.8)), 20, 160, fill=(150, 50, 50), width=4)
        path = folder / f"face{i}.png"
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        atomic_write_bytes(buf.getvalue(), path)  # a killed run leaves no half-written photo
        paths.append(path)
    return paths


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(path_type=pathlib.Path))
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed -> same bytes).")
@click.option("--force", is_flag=True,
              help="Replace OUT if it is a model folder (atomically); any other folder or a file is refused.")
@click.option("--photos", type=click.Path(path_type=pathlib.Path), default=None,
              help="Also write a few synthetic face-like photos to this folder, to train the demo on.")
@click.option("--safety-checker", is_flag=True,
              help="Also write a tiny safety_checker/ + feature_extractor/ (as real SD folders have; it flags nothing).")
def main(out: pathlib.Path, seed: int, force: bool, photos: pathlib.Path | None, safety_checker: bool) -> None:
    """Write a tiny RANDOM Stable-Diffusion-1.x model folder to OUT, for tests and the demo.

    It is NOT a real model: weights are random, so images are noise. It has the exact diffusers
    layout (unet, vae, text_encoder, tokenizer, scheduler, model_index.json) plus image_encoder/
    (a tiny stand-in for CLIP ViT-B/32, 512-wide image_embeds), so every code path can run
    without downloading anything. For real results point --model at a real SD 1.x/2.x folder.
    """
    try:
        path = make_tiny_model(out, seed=seed, overwrite=force, safety_checker=safety_checker)
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc}") from None
    files = sorted(p for p in path.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    click.echo(f"wrote tiny RANDOM SD-1.x model (seed {seed}) to {path}:")
    for p in files:
        click.echo(f"  {p.relative_to(path)}  ({p.stat().st_size:,} bytes)")
    click.echo(f"{len(files)} files, {total / 2**20:.2f} MiB")
    if photos is not None:
        written = write_demo_photos(photos, seed=seed)
        click.echo(f"wrote {len(written)} synthetic photos to {photos}")


if __name__ == "__main__":
    main()
