"""The safety checker's input, without torch: CLIP preprocessing of generated images as the
model folder's feature_extractor (transformers' CLIPImageProcessor) configures it, i.e. what
diffusers' StableDiffusionPipeline.run_safety_checker feeds the checker.

    resize the shortest side to `shortest_edge` (PIL, bicubic by default), centre-crop,
    scale to [0, 1], normalise with the CLIP mean/std, channels first.

pm-export copies the relevant settings into the safety checker's component details; the
pipeline flags an image when the checker's nsfw_score is > 0 (pm_runtime.specs).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULTS = {"shortest_edge": 224, "crop_height": 224, "crop_width": 224, "resample": 3,  # PIL BICUBIC
            "do_center_crop": True, "rescale_factor": 1 / 255, "image_mean": CLIP_MEAN, "image_std": CLIP_STD}


def settings_from_processor_config(cfg: dict) -> dict:
    """The subset of a preprocessor_config.json (CLIPImageProcessor) the checker input needs."""
    size, crop = cfg.get("size", 224), cfg.get("crop_size", 224)
    short = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else int(size)
    ch, cw = (crop.get("height", 224), crop.get("width", 224)) if isinstance(crop, dict) else (int(crop), int(crop))
    return {"shortest_edge": int(short), "crop_height": int(ch), "crop_width": int(cw),
            "resample": int(cfg.get("resample", 3)), "do_center_crop": bool(cfg.get("do_center_crop", True)),
            "rescale_factor": float(cfg.get("rescale_factor", 1 / 255)),
            "image_mean": [float(v) for v in cfg.get("image_mean", CLIP_MEAN)],
            "image_std": [float(v) for v in cfg.get("image_std", CLIP_STD)]}


def clip_input(images: np.ndarray, settings: dict | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, crop_h, crop_w) float32."""
    s = {**DEFAULTS, **(settings or {})}
    out = []
    for img in images:
        h, w = img.shape[:2]
        short = s["shortest_edge"]
        nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        pil = Image.fromarray(np.ascontiguousarray(img)).resize((nw, nh), resample=s["resample"])
        a = np.asarray(pil, dtype=np.float32)  # (nh, nw, 3)
        if s["do_center_crop"]:
            top, left = (nh - s["crop_height"]) // 2, (nw - s["crop_width"]) // 2
            a = a[max(top, 0):max(top, 0) + s["crop_height"], max(left, 0):max(left, 0) + s["crop_width"]]
        a = (a * np.float32(s["rescale_factor"]) - np.float32(s["image_mean"])) / np.float32(s["image_std"])
        out.append(a.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)
