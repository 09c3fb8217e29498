"""PNG files carrying their generation parameters as AUTOMATIC1111's web UI writes them. No torch.

One text chunk with the keyword `parameters` (tEXt when the text is Latin-1, else iTXt, as
Pillow's PngInfo.add_text decides; that is what A1111 writes through Pillow too):

    a photo of <persona> as a knight
    Negative prompt: monochrome, lowres, bad anatomy, worst quality, low quality
    Steps: 50, Sampler: DPM++ 2M, CFG scale: 8.0, Seed: 233, Size: 512x512, ...

Values holding a comma, colon or newline are JSON-quoted (A1111's `quote`), so A1111, ComfyUI
loaders, sd-parsers, civitai and `parse_parameters` below read them back. Encoding is
deterministic: the same image and text give the same bytes.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np

# pm-run scheduler names -> A1111 sampler names
SAMPLER_NAMES = {"dpmpp-2m": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a"}
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


def png_bytes(image: np.ndarray, parameters: str | None = None) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes with a `parameters` text chunk."""
    from PIL import Image, PngImagePlugin

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
