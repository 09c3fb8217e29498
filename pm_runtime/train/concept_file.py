"""concept.pt: the trainer's self-describing output (DESIGN §3, "Concept file vs concept table").

A plain dict of tensors and Python values, loadable with torch.load(weights_only=True), written
atomically. Every checkpoint is a usable concept file; checkpoints also carry `train_state`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import formats as F
from ..concept_table import atomic_write_bytes, is_torch_file
from ..errors import UserError
from ..modeling.mapper import Mapper, MapperConfig


def atomic_torch_save(obj: dict, path: Path) -> None:
    """torch.save, written atomically (temp file, fsync, rename) like every file the project writes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(buf.getvalue(), path)


def load_concept_dict(path: Path) -> dict:
    """Load and validate a concept file. Never unpickles code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"concept file not found: {path}")
    if not is_torch_file(path):  # else torch.load's legacy reader would call any file "Python objects"
        raise UserError(f"{path} is not a concept file (not a PyTorch file; pm-train writes concept files)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only: nothing in the file can run, so any failure means "not ours"
        text = str(e)
        if "Weights only load failed" in text:
            why = "it holds Python objects, not just tensors; refused, nothing in it was run"
        else:
            why = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
        raise UserError(f"{path} is not a concept file ({why})") from e
    if not isinstance(d, dict) or d.get(F.K_FORMAT) != F.CONCEPT_FORMAT:
        raise UserError(f"{path} is not a PersonaMagic concept file")
    version = d.get(F.K_VERSION)
    if not isinstance(version, int) or version > F.CONCEPT_VERSION:
        raise UserError(f"{path} is concept format version {version}; this tool reads up to {F.CONCEPT_VERSION}")
    missing = [k for k in (F.K_MAPPER_STATE, F.K_MAPPER_CONFIG, F.K_TOKENS, F.K_SUPER_EMBEDDING,
                           F.K_REFERENCE, F.K_FINGERPRINT) if k not in d]
    if missing:
        raise UserError(f"{path} is an incomplete concept file (missing {', '.join(missing)})")
    return d


@dataclass
class Concept:
    """What a consumer needs from concept.pt: the mapper, the token settings and the reference."""

    mapper: Mapper
    concept_word: str
    super_class: str
    num_tokens: int
    reference_embedding: torch.Tensor  # (I,)
    reference_sha256: str
    fingerprint: str
    raw: dict

    @property
    def stage(self) -> tuple[int, int]:
        return self.mapper.config.stage_lo, self.mapper.config.stage_hi


def mapper_from_dict(d: dict) -> Mapper:
    config = MapperConfig.from_dict(d[F.K_MAPPER_CONFIG])
    mapper = Mapper(config, d[F.K_SUPER_EMBEDDING])
    try:
        mapper.load_state_dict(d[F.K_MAPPER_STATE])
    except RuntimeError as e:
        raise UserError(f"concept file mapper weights do not match its config: {str(e).splitlines()[0]}") from e
    return mapper.eval()


def trained_on(path: Path) -> Path:
    """The model folder a concept file was trained on, as pm-train recorded it (the path given to
    --model): where it names a folder from here (the working folder) or from the concept file's folder
    (one holding model_index.json first). UserError where it names none (the caller asks for --model)."""
    path = Path(path)
    given = str(load_concept_dict(path).get(F.K_BASE_MODEL, {}).get("model_dir", "") or "")
    if not given:
        raise UserError(f"give --model DIR: {path} does not record the model folder it was trained on")
    folder = Path(given)
    found = [c for c in ([folder] if folder.is_absolute() else [folder, path.parent / folder]) if c.is_dir()]
    if found:  # a diffusers model folder first (the export says what is wrong with one that is not)
        return next((c for c in found if (c / "model_index.json").is_file()), found[0])
    elsewhere = "" if path.parent.resolve() == Path.cwd().resolve() else f" (nor from {path.parent})"
    raise UserError(f"give --model DIR: {path} was trained on {given!r}, which is not a folder from here{elsewhere}")


def load_concept(path: Path) -> Concept:
    d = load_concept_dict(path)
    tokens = d[F.K_TOKENS]
    ref = d[F.K_REFERENCE]
    return Concept(mapper_from_dict(d), tokens["concept_word"], tokens["super_class"],
                   int(d[F.K_MAPPER_CONFIG]["num_tokens"]), ref["embedding"].float(), ref["sha256"],
                   d[F.K_FINGERPRINT], d)
