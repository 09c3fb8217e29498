"""One fingerprint of a base model, shared by the trainer, the exporter and the runtime.

It covers what a concept depends on: the text encoder's config and token-embedding table
(the concept lives in that embedding space) and the UNet's config. numpy only, no torch.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

# Config keys that say how a file was written, not what the network computes.
_VOLATILE_KEYS = {"transformers_version", "torch_dtype", "dtype", "architectures", "name_or_path"}


def _canonical_config(config: dict) -> bytes:
    clean = {k: v for k, v in sorted(config.items()) if not k.startswith("_") and k not in _VOLATILE_KEYS}
    return json.dumps(clean, sort_keys=True, separators=(",", ":"), default=str).encode()


def fingerprint(text_encoder_config: dict, token_embedding: np.ndarray, unet_config: dict) -> str:
    """`token_embedding`: the base model's (V, D) input embedding table, before any token is added."""
    h = hashlib.sha256()
    h.update(b"text_encoder\0" + _canonical_config(text_encoder_config))
    table = np.ascontiguousarray(token_embedding, dtype="<f4")
    h.update(b"token_embedding\0" + str(table.shape).encode() + table.tobytes())
    h.update(b"unet\0" + _canonical_config(unet_config))
    return "sha256:" + h.hexdigest()
