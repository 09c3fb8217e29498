"""Full-size Stable-Diffusion-1.5-SHAPED model folders with RANDOM weights, for benchmarks.

Speed does not depend on weight values (DESIGN §4), so the benchmarks time networks that have
SD 1.5's exact shapes but random weights, written by this module in the diffusers layout:

  unet/           UNet2DConditionModel, SD 1.5's config (320/640/1280/1280, 2 layers per block,
                  cross-attention 768, 8 heads, sample 64)                       ~860 M params
  vae/            AutoencoderKL, SD's config (128/256/512/512, 4 latent channels, 0.18215)  ~84 M
  text_encoder/   CLIPTextModel, CLIP ViT-L/14's text tower (768 wide, 12 layers, 12 heads,
                  MLP 3072, 77 positions, vocab 49408, quick_gelu)                  ~123 M
  image_encoder/  CLIPVisionModelWithProjection, CLIP ViT-B/32's vision tower (768 wide, 12
                  layers, 12 heads, MLP 3072, patch 32, 224 px, projection 512)       ~88 M
  tokenizer/, scheduler/, model_index.json, image_encoder/preprocessor_config.json
                  copied from the project's tiny model (pm_runtime.train.tiny_model): its BPE
                  vocabulary is small (all ids < 49408), the text config's bos/eos/pad ids are
                  set to that tokenizer's, and the scheduler is SD 1.5's.

THESE ARE NOT MODELS: images they make are noise. They exist so that timings and memory are
those of SD 1.5. The tokenizer is not CLIP's 49408-token one, so prompts tokenize into other
(but equally long, <= 77) sequences; the text encoder's cost depends on the padded length (77)
only. Weights are stored in float16 by default (half the disk and write time; the trainer loads
everything in float32 and casts itself), `save_dtype="float32"` for full-precision files.

Command line:
  python benchmarks/random_models.py OUT [--seed 0] [--no-image-encoder] [--save-dtype fp32]
  python benchmarks/random_models.py OUT --tiny        # just pm_runtime's tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

_REPO = pathlib.Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # this tree's pm_runtime, also when it is not pip-installed
    sys.path.insert(0, str(_REPO))

# SD 1.5's unet/config.json (runwayml/stable-diffusion-v1-5), the keys that shape the network.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' legacy name: 8 HEADS for SD 1.x (head dim 40..160)
)
# SD 1.x vae/config.json.
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# openai/clip-vit-large-patch14 text tower (SD 1.x's text encoder).
SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)
# openai/clip-vit-base-patch32 vision tower + projection (PersonaMagic's e_img encoder).
VIT_B32_VISION_CONFIG = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
)
_SAVE_DTYPES = {"fp16": "float16", "float16": "float16", "fp32": "float32", "float32": "float32"}
MARKER = "random_model.json"  # written last: a folder with it is complete


def _quiet():
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _build(root: pathlib.Path, seed: int, image_encoder: bool, save_dtype: str) -> dict:
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pm_runtime.train.tiny_model import make_tiny_model

    _quiet()
    dtype = getattr(torch, save_dtype)
    timings = {}
    # Tokenizer, scheduler config, model_index and the image processor config: the tiny model's.
    with tempfile.TemporaryDirectory(prefix="pm-tiny-src-") as tmp:
        tiny = make_tiny_model(pathlib.Path(tmp) / "tiny", seed=seed)
        for part in ("tokenizer", "scheduler"):
            shutil.copytree(tiny / part, root / part)
        shutil.copy2(tiny / "model_index.json", root / "model_index.json")
        if image_encoder:
            (root / "image_encoder").mkdir(parents=True)
            shutil.copy2(tiny / "image_encoder" / "preprocessor_config.json",
                         root / "image_encoder" / "preprocessor_config.json")
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    specials = json.loads((root / "tokenizer" / "special_tokens_map.json").read_text(encoding="utf-8"))
    bos_id, eos_id = vocab[specials["bos_token"]], vocab[specials["eos_token"]]
    pad_id = vocab[specials.get("pad_token", specials["eos_token"])]
    if max(vocab.values()) >= SD15_TEXT_CONFIG["vocab_size"]:
        raise ValueError("the tiny tokenizer's ids do not fit SD 1.5's 49408-row embedding table")

    def save(sub: str, seed_offset: int, make) -> None:
        t0 = time.perf_counter()
        torch.manual_seed(seed + seed_offset)
        model = make()
        model.to(dtype=dtype).eval().save_pretrained(root / sub, safe_serialization=True)
        timings[sub] = round(time.perf_counter() - t0, 2)
        del model

    # Each network with its own seed offset (as the tiny model does). Default torch init: the
    # values do not matter for speed, only that they are finite and of a sane scale.
    save("unet", 0, lambda: UNet2DConditionModel(**SD15_UNET_CONFIG))
    save("vae", 1, lambda: AutoencoderKL(**SD15_VAE_CONFIG))
    text_cfg = transformers.CLIPTextConfig(**SD15_TEXT_CONFIG, bos_token_id=bos_id, eos_token_id=eos_id,
                                           pad_token_id=pad_id)
    save("text_encoder", 2, lambda: transformers.CLIPTextModel(text_cfg))
    if image_encoder:
        vis_cfg = transformers.CLIPVisionConfig(**VIT_B32_VISION_CONFIG)
        save("image_encoder", 3, lambda: transformers.CLIPVisionModelWithProjection(vis_cfg))
    info = {"kind": "sd15-shaped-random", "seed": seed, "image_encoder": image_encoder,
            "save_dtype": save_dtype, "build_s": timings,
            "note": "RANDOM weights with SD 1.5's shapes, for benchmarks only; images are noise"}
    return info


def make_sd15_shaped_model(out_dir, seed: int = 0, image_encoder: bool = True, *, save_dtype: str = "fp16",
                           overwrite: bool = False) -> pathlib.Path:
    """Write a full-size SD-1.5-shaped RANDOM model folder (diffusers layout) and return its path.

    A complete folder (one holding `random_model.json` with the same seed / image_encoder /
    save_dtype) is reused as is unless `overwrite`. Built in a temp folder next to `out_dir`
    and renamed, so an interrupted build never leaves a half-written model.
    """
    save_dtype = _SAVE_DTYPES[save_dtype]
    out = pathlib.Path(out_dir).absolute()
    marker = out / MARKER
    if marker.is_file() and not overwrite:
        info = json.loads(marker.read_text())
        if (info.get("seed"), info.get("image_encoder"), info.get("save_dtype")) == (seed, image_encoder, save_dtype):
            return out
    if out.exists() and any(out.iterdir()) and not overwrite and not marker.is_file():
        raise FileExistsError(f"{out} exists, is not empty and is not a random model folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        info = _build(tmp, seed, image_encoder, save_dtype)
        (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_tiny(out_dir, seed: int = 0) -> pathlib.Path:
    """The project's tiny random model (pm_runtime.train.tiny_model.make_tiny_model); reused if present."""
    from pm_runtime.train.tiny_model import make_tiny_model

    out = pathlib.Path(out_dir).absolute()
    if (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file():
        return out
    return make_tiny_model(out, seed=seed, overwrite=out.exists())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=pathlib.Path, help="folder to write (reused if already a complete build)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="write pm_runtime's tiny model instead")
    p.add_argument("--no-image-encoder", action="store_true", help="leave out image_encoder/")
    p.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16",
                   help="storage precision of the random weights (loaders cast anyway)")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT is a complete build")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if a.tiny:
        path = make_tiny(a.out, a.seed)
    else:
        path = make_sd15_shaped_model(a.out, a.seed, not a.no_image_encoder, save_dtype=a.save_dtype,
                                      overwrite=a.force)
    files = sorted(q for q in path.rglob("*") if q.is_file())
    total = sum(q.stat().st_size for q in files)
    print(f"{path}: {len(files)} files, {total / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s")
    return 0


def make_untrained_concept(model_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A concept file with an untrained mapper for `model_dir` (what the trainer writes, minus training)."""
    import torch

    from pm_runtime import formats as F
    from pm_runtime.modeling.loading import load_base_model, placeholder_names, super_class_id
    from pm_runtime.modeling.mapper import Mapper, MapperConfig
    from pm_runtime.train.concept_file import atomic_torch_save

    base = load_base_model(model_dir, with_unet=False, with_vae=False)
    sid = super_class_id(base.tokenizer, "face")
    e_super = base.text_encoder.get_input_embeddings().weight[sid].detach().float()
    torch.manual_seed(0)
    cfg = MapperConfig(num_tokens=4, dim=base.text_dim, image_dim=512)
    mapper = Mapper(cfg, e_super)
    d = {F.K_FORMAT: F.CONCEPT_FORMAT, F.K_VERSION: F.CONCEPT_VERSION,
         F.K_MAPPER_STATE: mapper.state_dict(), F.K_MAPPER_CONFIG: cfg.to_dict(),
         F.K_TOKENS: {"concept_word": "<persona>", "super_class": "face", "super_class_id": sid,
                      "placeholder_tokens": list(placeholder_names(4))},
         F.K_SUPER_EMBEDDING: e_super, F.K_IMAGES: [],
         F.K_REFERENCE: {"name": "random", "sha256": "0" * 64, "embedding": torch.randn(512)},
         F.K_FINGERPRINT: base.fingerprint, F.K_TRAINING: {"settings": {"resolution": 512}}}
    atomic_torch_save(d, out)
    return out


if __name__ == "__main__":
    sys.exit(main())
