"""Image files carrying their generation parameters as AUTOMATIC1111's web UI writes them. No torch.

PNG (the default): one text chunk with the keyword `parameters` (tEXt when the text is Latin-1,
else iTXt, as Pillow's PngInfo.add_text decides; that is what A1111 writes through Pillow too):

    a photo of <persona> as a knight
    Negative prompt: monochrome, lowres, bad anatomy, worst quality, low quality
    Steps: 50, Sampler: DPM++ 2M, CFG scale: 8.0, Seed: 233, Size: 512x512, ...

Values holding a comma, colon or newline are JSON-quoted (A1111's `quote`), so A1111, ComfyUI
loaders, sd-parsers, civitai and `parse_parameters` below read them back. JPEG (quality 95, 4:4:4) and
WebP (lossless: the PNG's pixels exactly) carry the same text where A1111 puts it in those formats:
the EXIF UserComment tag, "UNICODE\\0" + UTF-16 big-endian (piexif's encoding); `read_parameters`
reads either place. Encoding is deterministic: the same image and text give the same bytes.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np

# pm-run scheduler names -> A1111 sampler names ("X Karras", "X Exponential": A1111 before 1.9 named samplers so;
# 1.9 and later read such a name as sampler X with that schedule type, and write the two apart: `reproduce`
# reads both)
SAMPLER_NAMES = {"dpmpp-2m": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a",
                 "dpmpp-2m-karras": "DPM++ 2M Karras", "euler-karras": "Euler Karras", "dpmpp-2m-sde": "DPM++ 2M SDE",
                 "dpmpp-2m-sde-karras": "DPM++ 2M SDE Karras", "dpmpp-2m-sde-exponential": "DPM++ 2M SDE Exponential",
                 "dpmpp-2m-beta": "DPM++ 2M Beta", "euler-beta": "Euler Beta", "dpmpp-2m-sde-beta": "DPM++ 2M SDE Beta"}
# the schedule types AUTOMATIC1111 (1.9 and later) writes apart from the sampler's name: "Sampler: DPM++ 2M,
# Schedule type: Beta" (the older ones, Karras and Exponential, also as a suffix of the name, as pm-run writes them)
SCHEDULE_TYPE_NAMES = {"sgm-uniform": "SGM Uniform", "normal": "Normal", "simple": "Simple", "kl-optimal": "KL Optimal",
                       "align-your-steps": "Align Your Steps"}
SEPARATE_SCHEDULE_TYPES = ("Beta", *SCHEDULE_TYPE_NAMES.values())
SAMPLER_NAMES.update({"euler-exponential": "Euler Exponential", "dpmpp-2m-exponential": "DPM++ 2M Exponential"})
SAMPLER_NAMES.update({f"{sampler}-{kind}": f"{SAMPLER_NAMES[sampler]} {label}"
                      for kind, label in SCHEDULE_TYPE_NAMES.items() for sampler in ("euler", "dpmpp-2m", "dpmpp-2m-sde")})
# Euler ancestral on every type (no A1111 sampler was ever named "Euler a Karras": written apart, as 1.9+ does)
_EULER_A_TYPES = {"karras": "Karras", "exponential": "Exponential", "beta": "Beta", **SCHEDULE_TYPE_NAMES}
SAMPLER_NAMES.update({f"euler-a-{kind}": f"Euler a {label}" for kind, label in _EULER_A_TYPES.items()})


def split_sampler(scheduler: str) -> tuple[str, str | None]:
    """(A1111 sampler, schedule type or None) of a pm-run scheduler, the type split off whatever way
    sampler_fields writes it: "dpmpp-2m-karras" -> ("DPM++ 2M", "Karras")."""
    name = SAMPLER_NAMES[scheduler]
    for kind in ("Karras", "Exponential", *SEPARATE_SCHEDULE_TYPES):
        if name.endswith(" " + kind):
            return name[:-len(kind) - 1], kind
    return name, None


def sampler_fields(scheduler: str) -> dict[str, str]:
    """The Sampler (and Schedule type) parameters of a pm-run scheduler, as AUTOMATIC1111 names it: the
    types of SEPARATE_SCHEDULE_TYPES, and all of Euler ancestral's, apart; Karras and Exponential otherwise in
    the sampler's name."""
    sampler, kind = split_sampler(scheduler)
    if kind is not None and (kind in SEPARATE_SCHEDULE_TYPES or scheduler.startswith("euler-a-")):
        return {"Sampler": sampler, "Schedule type": kind}
    return {"Sampler": SAMPLER_NAMES[scheduler]}
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param_code


def quote(value) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def parameters_text(prompt: str, negative_prompt: str, params: dict) -> str:
    """The `parameters` text: prompt, 'Negative prompt: ...' line, 'Key: value, ...' line."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_parameters(text: str) -> dict[str, str]:
    """A1111's reading of a `parameters` text: {"Prompt", "Negative prompt", key: value, ...}."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        out[key.strip()] = unquote(value.strip())
    return out


# file suffix -> format written (anything else with an image suffix is refused by pm-run)
IMAGE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
JPEG_QUALITY = 95
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD, its UserComment tag
_UNICODE, _ASCII = b"UNICODE\0", b"ASCII\0\0\0"  # UserComment's 8-byte character-code prefixes


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")


def image_bytes(image: np.ndarray, parameters: str | None = None, fmt: str = "png") -> bytes:
    """(H, W, 3) uint8 -> the bytes of a PNG, JPEG or WebP file carrying `parameters`."""
    if fmt == "png":
        return png_bytes(image, parameters)
    if fmt not in ("jpeg", "webp"):
        raise ValueError(f"unknown image format {fmt!r}; choose png, jpeg or webp")
    from PIL import Image

    _check_image(image)
    exif = Image.Exif()
    if parameters is not None:
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = _UNICODE + parameters.encode("utf-16-be")
    # JPEG without chroma subsampling (4:4:4): Pillow's default 4:2:0 halves the colour resolution
    options = {"quality": JPEG_QUALITY, "subsampling": 0} if fmt == "jpeg" else {"lossless": True}
    buf = io.BytesIO()
    try:
        Image.fromarray(image, "RGB").save(buf, format=fmt.upper(), exif=exif.tobytes(), **options)
    except ValueError as e:  # a JPEG marker segment holds at most 64 KiB
        raise ValueError(f"the settings text ({len(parameters or '')} characters) does not fit a {fmt.upper()} "
                         f"file's EXIF block ({e}): write PNG or WebP") from None
    return buf.getvalue()


def read_parameters(image) -> str | None:
    """The parameters text of an opened PIL image: a PNG's `parameters` chunk, or a JPEG's / WebP's
    EXIF UserComment (UNICODE: UTF-16 big-endian, ASCII, or no prefix as UTF-8). None if it has neither."""
    text = image.info.get("parameters")
    if text is not None:
        return text
    raw = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):
        return None
    if raw.startswith(_UNICODE):
        return raw[len(_UNICODE):].decode("utf-16-be", errors="replace")
    return raw[len(_ASCII):].decode("ascii", errors="replace") if raw.startswith(_ASCII) else raw.decode(
        "utf-8", errors="replace")


def png_bytes(image: np.ndarray, parameters: str | None = None) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes with a `parameters` text chunk."""
    from PIL import Image, PngImagePlugin

    _check_image(image)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
