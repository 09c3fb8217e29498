"""Bake a concept (concept.pt's mapper) into a concept table (DESIGN §2).

For a fixed reference photo e_img is a constant, so M(t, e_img) is evaluated once for every
integer t in [stage_lo, stage_hi] and stored. Re-baking with another photo recomputes e_img
exactly as the trainer does (the photo squashed at the concept's training resolution, then
pm_runtime.modeling.image_embed) and needs no retraining; E[t] does not depend on e_img, so a
re-bake changes B only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pm_runtime import formats as F
from pm_runtime.concept_table import ConceptTable
from pm_runtime.errors import UserError
from pm_runtime.train.concept_file import Concept


@dataclass(frozen=True)
class ReferencePhoto:
    name: str
    sha256: str
    embedding: torch.Tensor  # (I,) float32


def concept_reference(concept: Concept) -> ReferencePhoto:
    """The photo the trainer kept for baking (concept.pt's `reference`)."""
    ref = concept.raw[F.K_REFERENCE]
    return ReferencePhoto(str(ref.get("name", "")), str(ref["sha256"]), concept.reference_embedding.float())


def embed_reference_photo(concept: Concept, photo: Path, image_encoder_dir: Path,
                          warn: Callable[[str], None]) -> ReferencePhoto:
    """e_img of another photo, computed as the trainer computed the concept's own photos."""
    from pm_runtime.modeling.image_embed import image_embeddings
    from pm_runtime.modeling.loading import load_image_encoder
    from pm_runtime.train import data

    settings = (concept.raw.get(F.K_TRAINING) or {}).get("settings") or {}
    if "resolution" not in settings:
        raise UserError("the concept file records no training resolution; cannot re-bake with another photo")
    photo = Path(photo)
    if not photo.is_file():
        raise UserError(f"--reference-image not found: {photo}")
    [im] = data.load_images(photo, int(settings["resolution"]), bool(settings.get("center_crop", False)), warn)
    encoder = load_image_encoder(Path(image_encoder_dir))
    pixels = torch.from_numpy(data.to_unit_range(im.pixels[None]))  # (1, 3, R, R) in [-1, 1]
    e_img = image_embeddings(encoder, pixels)[0]  # (I,)
    want = concept.mapper.config.image_dim
    if e_img.shape[0] != want:
        raise UserError(f"the image encoder gives {e_img.shape[0]}-wide embeddings; this concept was trained "
                        f"with {want}-wide ones (use the image encoder it was trained with)")
    return ReferencePhoto(im.name, im.sha256, e_img)


@torch.no_grad()
def bake_table(concept: Concept, reference: ReferencePhoto | None = None, source_sha256: str = "") -> ConceptTable:
    """E[t], B[t] for every integer t in the concept stage, float32, from one batched mapper call."""
    reference = reference or concept_reference(concept)
    mapper = concept.mapper.float().eval()
    lo, hi = concept.stage
    t = torch.arange(lo, hi + 1, dtype=torch.float32)  # (T,)
    e_img = reference.embedding.float().reshape(1, -1).expand(t.shape[0], -1)  # (T, I)
    E, B = mapper(t, e_img)  # (T, K, D) each
    tokens = concept.raw[F.K_TOKENS]
    return ConceptTable(
        E=np.ascontiguousarray(E.numpy(), dtype=np.float32), B=np.ascontiguousarray(B.numpy(), dtype=np.float32),
        concept_word=concept.concept_word, super_class=concept.super_class,
        placeholder_tokens=tuple(str(x) for x in tokens["placeholder_tokens"]),
        stage_lo=int(lo), stage_hi=int(hi), fingerprint=concept.fingerprint,
        reference_name=reference.name, reference_sha256=reference.sha256, source_sha256=source_sha256)
