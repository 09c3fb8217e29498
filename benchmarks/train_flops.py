"""Arithmetic of one training micro-step, the published way against pm-train's, counted (not timed)
at SD-1.5 shapes: what the >= 3x-per-step-at-equal-precision target of the training issue can and
cannot reach by removing work. Not a test: nothing here asserts.

Counted with torch.utils.flop_counter.FlopCounterMode on the meta device (shapes only, no weights,
seconds on a CPU), batch 1, 512 px, the networks built from benchmarks/random_models.py's SD-1.5 /
ViT-B/32 configs:
  shared       equilibrium text encoder forward + backward (to the concept embeddings) and the UNet
               forward + backward to its contexts (the UNet is frozen: no weight gradients), what
               both ways compute every micro-step
  vae_encoder  the VAE encoder forward at 512 px: the published code every micro-step, pm-train once
               per image (posterior cached)
  clip_image   CLIP ViT-B/32 vision tower + projection at 224 px: the same
Attention: the published naive softmax(QK^T) and SDPA do the same multiply-adds (they differ in
memory traffic, which this does not count). So published/ours here is what removing work alone
buys at equal arithmetic speed; the rest of a measured ratio comes from how fast each does the
same arithmetic (SDPA vs naive attention, CUDA graphs).

  python benchmarks/train_flops.py --out benchmarks/results/train-flops.jsonl
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
if __package__:
    from .random_models import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, VIT_B32_VISION_CONFIG
    from .records import environment, save_records
else:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from random_models import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, VIT_B32_VISION_CONFIG
    from records import environment, save_records

SCHEMA = "pm-train-flops/1"


def count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def parts(resolution: int = 512, tokens: int = 77) -> dict[str, int]:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pm_runtime.modeling.text_encoder import EquilibriumTextEncoder

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).requires_grad_(False)
        vae = AutoencoderKL(**SD15_VAE_CONFIG).requires_grad_(False)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT_CONFIG)).requires_grad_(False)
        vision = transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(**VIT_B32_VISION_CONFIG)).requires_grad_(False)
    encoder = EquilibriumTextEncoder(text)
    D, lat = SD15_TEXT_CONFIG["hidden_size"], resolution // 8

    def shared():
        ids = torch.zeros(1, tokens, dtype=torch.long, device=meta)
        concept = torch.zeros(1, tokens, D, device=meta, requires_grad=True)
        mask = torch.zeros(1, tokens, dtype=torch.bool, device=meta)
        c_k, c_v = encoder(ids, concept, torch.zeros(1, tokens, D, device=meta), mask)
        noisy = torch.zeros(1, 4, lat, lat, device=meta)
        t = torch.zeros(1, device=meta)
        pred = unet(noisy, t, c_k + c_v, return_dict=False)[0]  # one context: the same arithmetic as split K/V
        pred.float().pow(2).mean().backward()

    return {
        "shared": count(shared),
        "vae_encoder": count(lambda: vae.encode(torch.zeros(1, 3, resolution, resolution, device=meta))),
        "clip_image": count(lambda: vision(pixel_values=torch.zeros(1, 3, 224, 224, device=meta))),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    a = ap.parse_args(argv)
    p = parts(a.resolution)
    ours = p["shared"]
    published = p["shared"] + p["vae_encoder"] + p["clip_image"]
    rec = {"schema": SCHEMA, **environment("cpu", a.commit), "resolution": a.resolution, "batch": 1,
           **{f"{k}_gflop": round(v / 1e9, 1) for k, v in p.items()},
           "published_micro_step_gflop": round(published / 1e9, 1), "ours_micro_step_gflop": round(ours / 1e9, 1),
           "work_ratio_published_over_ours": round(published / ours, 3),
           "command": "python benchmarks/train_flops.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps({k: v for k, v in rec.items() if k.endswith(("gflop", "ratio_published_over_ours"))}, indent=1))
    save_records(a.out, [rec])
    return 0


if __name__ == "__main__":
    sys.exit(main())
