"""Training images and masks, read the way the published trainer reads them (DESIGN §1):
each image squashed to the training resolution (bicubic, no crop, no flip) unless center_crop;
soft masks from <mask_dir>/<same file name>, grayscale/255, resized NEAREST to latent size.
EXIF orientation is applied (the published code ignores it; a rotated phone photo is a bug).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
Warn = Callable[[str], None]


@dataclass(frozen=True)
class TrainImage:
    name: str
    sha256: str
    pixels: np.ndarray  # (R, R, 3) uint8, as the trainer sees it
    source: Image.Image  # RGB, EXIF-transposed, original size (for CLIPSeg)


def list_images(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"image path not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"no images in {path} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def _open_rgb(path: Path, warn: Warn, min_size: int) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode != "RGB":
        what = {"L": "grayscale", "LA": "grayscale+alpha", "RGBA": "RGBA", "P": "palette"}.get(im.mode, im.mode)
        warn(f"{path.name}: {what} image converted to RGB")
        im = im.convert("RGB")
    if min(im.size) < min_size:
        warn(f"{path.name}: {im.size[0]}x{im.size[1]} is smaller than the training resolution {min_size}; upscaled")
    return im


def squash(image: Image.Image, resolution: int, center_crop: bool = False) -> np.ndarray:
    """RGB image -> (R, R, 3) uint8: optional center crop, then a bicubic resize (a squash)."""
    if center_crop:
        w, h = image.size
        c = min(w, h)
        image = image.crop(((w - c) // 2, (h - c) // 2, (w + c) // 2, (h + c) // 2))
    return np.asarray(image.resize((resolution, resolution), resample=Image.BICUBIC), dtype=np.uint8)


def load_images(path: Path, resolution: int, center_crop: bool, warn: Warn) -> list[TrainImage]:
    out = []
    for p in list_images(path):
        try:
            data = p.read_bytes()
            img = _open_rgb(p, warn, resolution)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            warn(f"{p.name}: unreadable, skipped ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            continue
        out.append(TrainImage(p.name, hashlib.sha256(data).hexdigest(), squash(img, resolution, center_crop), img))
    if not out:
        raise UserError(f"no usable image in {path}: every file was unreadable")
    return out


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [-1, 1]."""
    x = pixels.astype(np.float32) / 127.5 - 1.0
    return np.moveaxis(x, -1, -3)


def mask_to_latent(mask: Image.Image, latent_size: int) -> np.ndarray:
    """Grayscale mask -> (1, h, w) float32 in [0, 1], NEAREST like the published dataset."""
    m = mask.convert("L").resize((latent_size, latent_size), resample=Image.NEAREST)
    return (np.asarray(m, dtype=np.float32) / 255.0)[None]


def load_masks(images: list[TrainImage], mask_dir: Path | None, latent_size: int, warn: Warn) -> list[np.ndarray]:
    """One (1, h, w) mask per image; ones (with a warning) where no mask file exists."""
    masks = []
    for im in images:
        path = Path(mask_dir) / im.name if mask_dir is not None else None
        if path is None or not path.is_file():
            if mask_dir is not None:
                warn(f"{im.name}: no mask in {mask_dir}; the whole image counts")
            masks.append(np.ones((1, latent_size, latent_size), np.float32))
            continue
        try:
            with Image.open(path) as m:
                m.load()
                m = ImageOps.exif_transpose(m)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"mask {path} is unreadable: {e}") from e
        if m.size != im.source.size:
            warn(f"{path.name}: mask is {m.size[0]}x{m.size[1]}, image is {im.source.size[0]}x{im.source.size[1]}; resized")
        masks.append(mask_to_latent(m, latent_size))
    return masks
