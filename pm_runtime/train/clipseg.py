"""Soft face masks with CLIPSeg (rd64-refined), computed the way the published PersonaMagic script does.

Per image: RGB -> [0, 1] float (ToTensor) -> ImageNet Normalize -> 352x352 bilinear squash (no crop)
-> one forward with the image repeated for the 9 CLIPSEG_TEMPLATES prompts -> sigmoid -> mean over
prompts -> uint8(pred * 255) (truncation, like numpy's astype).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .templates import CLIPSEG_TEMPLATES

CLIPSEG_SIZE = 352
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_clipseg(model_dir, device, dtype=torch.float32):
    """Load (model, tokenizer) of a CLIPSeg folder (the CIDAS/clipseg-rd64-refined layout), local files only."""
    from transformers import AutoTokenizer, CLIPSegForImageSegmentation

    model_dir = os.fspath(model_dir)
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise ValueError(f"CLIPSeg model folder not found: {model_dir}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise ValueError(f"not a CLIPSeg model folder (no readable config.json): {model_dir} ({e})") from None
    if model_type != "clipseg":
        raise ValueError(f"not a CLIPSeg model folder: {model_dir} has model_type={model_type!r}, want 'clipseg'")
    try:
        model = CLIPSegForImageSegmentation.from_pretrained(model_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load CLIPSeg model/tokenizer from {model_dir}: {msg}") from None
    # Cast after loading (works the same whether transformers spells the kwarg torch_dtype or dtype).
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, tokenizer


def _preprocess(image: Image.Image) -> torch.Tensor:
    """PIL image -> (1, 3, 352, 352) float32, as ToTensor -> Normalize -> Resize((352, 352)) on a tensor."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())  # (H, W, 3) uint8
    x = x.permute(2, 0, 1).float().div_(255.0)  # (3, H, W) in [0, 1], == ToTensor
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = ((x - mean) / std).unsqueeze(0)  # (1, 3, H, W), == Normalize (applied BEFORE resizing, as published)
    # torchvision's Resize on tensors antialiases by default in recent versions (antialias=True since 0.17;
    # it calls F.interpolate(bilinear, align_corners=False, antialias=True) for float tensors), so we pick
    # antialias=True to match current torchvision. It only changes downscaling; upscaling is plain bilinear.
    return F.interpolate(x, size=(CLIPSEG_SIZE, CLIPSEG_SIZE), mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def clipseg_masks(model, tokenizer, images: list[Image.Image], super_class: str, device) -> list[np.ndarray]:
    """One uint8 (352, 352) soft mask per image: mean over the 9 prompts of sigmoid(CLIPSeg logits) * 255."""
    model.eval()
    prompts = [t.format(super_class) for t in CLIPSEG_TEMPLATES]  # P = 9
    # padding=True is exact: the CLIP text encoder is causal and pools at the first EOS, so pad tokens
    # after it change nothing (same as the original repo's fixed-length clip.tokenize).
    tok = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    input_ids = tok["input_ids"].to(device)  # (P, L)
    attention_mask = tok["attention_mask"].to(device)  # (P, L)
    dtype = next(model.parameters()).dtype
    masks = []
    for image in images:
        pixels = _preprocess(image).to(device=device, dtype=dtype)  # (1, 3, 352, 352)
        pixels = pixels.expand(len(prompts), -1, -1, -1)  # (P, 3, 352, 352): image repeated per prompt
        # Vision config is 224 px / patch 16; the model bicubically interpolates its position embeddings to
        # the 22x22 grid of a 352 input (interpolate_pos_encoding defaults to True for CLIPSeg).
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels).logits
        logits = logits.reshape(len(prompts), CLIPSEG_SIZE, CLIPSEG_SIZE)  # (P, 352, 352)
        pred = logits.float().sigmoid().mean(0)  # (352, 352) in [0, 1]
        masks.append((pred.cpu().numpy() * 255).astype(np.uint8))  # (352, 352) uint8, truncated
    return masks
