"""img2img's init image: read, flattened to RGB, resized, and turned into the VAE encoder's input.

As AUTOMATIC1111's img2img prepares it (modules/processing.py, StableDiffusionProcessingImg2Img.init):
EXIF orientation applied, transparency flattened onto white (its img2img background colour), then
"Just resize" (its default resize mode: the whole picture stretched to width x height with Lanczos
resampling, as its resize_image does when no upscaler is named), then pixels / 255 * 2 - 1 (diffusers'
VaeImageProcessor: the same float32 arithmetic). numpy and Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

BACKGROUND = (255, 255, 255)  # AUTOMATIC1111's default img2img background colour (#ffffff)


@dataclass(frozen=True)
class InitImage:
    pixels: np.ndarray  # (H, W, 3) uint8 at the size generated: what the VAE encoder reads
    source_size: tuple[int, int]  # (width, height) as given, before resizing
    name: str  # the file's name, or "<array>" / "<PIL image>"

    @property
    def resized(self) -> bool:
        return self.source_size != (self.pixels.shape[1], self.pixels.shape[0])

    def encoder_input(self) -> np.ndarray:
        """(1, 3, H, W) float32 in [-1, 1]."""
        return encoder_input(self.pixels)


def encoder_input(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> the VAE encoder's input (1, 3, H, W) float32 in [-1, 1]: pixels / 255 * 2 - 1."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    return (np.float32(2.0) * x - np.float32(1.0)).transpose(2, 0, 1)[None].copy()


def _open(source):
    """(PIL image, name) of a path, a PIL image or an (H, W[, C]) uint8 array."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source, "<PIL image>"
    if isinstance(source, np.ndarray):
        a = source
        if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4))):
            raise UserError(f"an init image array must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {a.dtype} "
                            f"{a.shape}")
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        return Image.fromarray(np.ascontiguousarray(a)), "<array>"
    if not isinstance(source, (str, Path)):
        raise UserError(f"init image must be a file path, a PIL image or a uint8 array, got {type(source).__name__}")
    path = Path(source)
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise UserError(f"init image not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"init image {path} is a folder, not an image file") from None
    except Image.DecompressionBombError as e:  # Pillow's guard against decompression bombs (> ~179 Mpx)
        raise UserError(f"init image {path} is too large to read safely: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot read init image {path}: {e}") from None
    try:
        image = ImageOps.exif_transpose(image)  # a phone photo's orientation, as A1111 applies it
    except Exception:  # a broken EXIF block: the pixels as stored
        pass
    return image, path.name


def _rgb(image):
    """RGB pixels; transparency flattened onto the background colour (A1111's images.flatten)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: to 8 bits, not clipped at 255
        a = np.asarray(image, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        return Image.fromarray(np.round(a / top * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def load_init_image(source, width: int | None = None, height: int | None = None, check_size=None) -> InitImage:
    """The init image at width x height (None: the image's own side). `check_size(height, width)` raises
    UserError where the engines do not take that size; an image whose own size they do not take is
    refused naming --width / --height (it is resized only to a size that was asked for)."""
    from PIL import Image

    if isinstance(source, InitImage):  # already read (pm-run reads it once for all its images)
        h0, w0 = source.pixels.shape[:2]
        if (w0 if width is None else width, h0 if height is None else height) == (w0, h0):
            if check_size is not None:
                check_size(h0, w0)
            return source
        resized = load_init_image(source.pixels, width, height, check_size)
        return InitImage(resized.pixels, source.source_size, source.name)
    image, name = _open(source)
    image = _rgb(image)
    w0, h0 = image.size
    w, h = w0 if width is None else width, h0 if height is None else height
    if check_size is not None:
        try:
            check_size(h, w)
        except UserError as e:
            if width is None or height is None:
                raise UserError(f"init image {name} is {w0}x{h0}: {e}; give --width and --height to resize it "
                                "(A1111's 'Just resize')") from None
            raise
    if (w, h) != (w0, h0):
        image = image.resize((w, h), resample=Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.uint8)
    return InitImage(pixels, (w0, h0), name)


__all__ = ["InitImage", "encoder_input", "load_init_image"]
