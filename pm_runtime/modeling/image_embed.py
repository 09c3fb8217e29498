"""e_img: CLIP ViT-B/32 projected image features with the published preprocessing (DESIGN §1).

The image as the trainer sees it (squashed to the training resolution, values in [-1, 1]) is
resized to 224 bicubic with align_corners=True and no antialias (what kornia.geometry.resize
does in the published code), mapped to [0, 1] and normalised with CLIP's mean/std. The
projected features are NOT L2-normalised. Hugging Face's CLIPImageProcessor (resize shortest
side with antialias, center crop) gives a slightly different vector and is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(pixels: torch.Tensor, size: int = 224) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 3, size, size) normalised for CLIP."""
    x = F.interpolate(pixels.float(), size=(size, size), mode="bicubic", align_corners=True, antialias=False)
    x = (x + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def image_embeddings(image_encoder: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, I) float32 projected CLIP image features."""
    size = int(image_encoder.config.image_size)
    param = next(image_encoder.parameters())
    x = clip_preprocess(pixels.to(param.device), size).to(param.dtype)
    return image_encoder(pixel_values=x).image_embeds.float()
