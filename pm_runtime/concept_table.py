"""The baked concept table (DESIGN §2-3): what the runtime loads instead of concept.pt. numpy only.

For one identity and one reference photo the mapper is a pure function of t, so E[t] and B[t]
are stored for every integer t in [stage_lo, stage_hi] (row i is t = stage_lo + i) as float32
tensors in a safetensors file, with the token settings, the base-model fingerprint and the
reference photo's hash in its metadata (key names in pm_runtime.formats).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import formats as F
from .errors import UserError


@dataclass(frozen=True, eq=False)  # arrays: compare with np.array_equal
class ConceptTable:
    E: np.ndarray  # (T, K, D) float32, T = stage_hi - stage_lo + 1
    B: np.ndarray  # (T, K, D) float32
    concept_word: str
    super_class: str
    placeholder_tokens: tuple[str, ...]
    stage_lo: int
    stage_hi: int
    fingerprint: str
    reference_name: str
    reference_sha256: str
    source_sha256: str = ""

    def __post_init__(self):
        rows = self.stage_hi - self.stage_lo + 1
        K = len(self.placeholder_tokens)
        for name, a in (("E", self.E), ("B", self.B)):
            if a.dtype != np.float32 or a.ndim != 3 or a.shape[:2] != (rows, K):
                raise ValueError(f"{name} must be float32 ({rows}, {K}, D), got {a.dtype} {a.shape}")
        if self.E.shape != self.B.shape:
            raise ValueError(f"E {self.E.shape} and B {self.B.shape} differ")

    @property
    def num_tokens(self) -> int:
        return len(self.placeholder_tokens)

    @property
    def dim(self) -> int:
        return int(self.E.shape[2])

    def row(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Integer t in [stage_lo, stage_hi] -> (E[t], B[t]), each (K, D)."""
        if not self.stage_lo <= t <= self.stage_hi:
            raise IndexError(f"t={t} is outside the concept stage {self.stage_lo}..{self.stage_hi}")
        i = int(t) - self.stage_lo
        return self.E[i], self.B[i]

    def metadata(self) -> dict[str, str]:
        return {
            F.TM_FORMAT: F.TABLE_FORMAT,
            F.TM_VERSION: str(F.TABLE_VERSION),
            F.TM_CONCEPT_WORD: self.concept_word,
            F.TM_SUPER_CLASS: self.super_class,
            F.TM_PLACEHOLDERS: json.dumps(list(self.placeholder_tokens)),
            F.TM_NUM_TOKENS: str(self.num_tokens),
            F.TM_DIM: str(self.dim),
            F.TM_STAGE_LO: str(self.stage_lo),
            F.TM_STAGE_HI: str(self.stage_hi),
            F.TM_FINGERPRINT: self.fingerprint,
            F.TM_REFERENCE_NAME: self.reference_name,
            F.TM_REFERENCE_SHA256: self.reference_sha256,
            F.TM_SOURCE_SHA256: self.source_sha256,
        }


def atomic_write_bytes(data: bytes, path: Path, exclusive: bool = False) -> None:
    """Write to a temp file in the same folder, fsync, rename: never a half-written file. `exclusive`:
    never replace an existing `path` (FileExistsError instead), even against another process writing the
    same name at the same moment: the finished temp file is hard-linked to the name, which the OS does
    only where nothing is there (on filesystems without hard links the name is first created empty with
    O_EXCL, then replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600
        if exclusive:
            _install_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _install_exclusive(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic: fails with FileExistsError where `path` exists
    except FileExistsError:
        raise
    except OSError:  # no hard links here (FAT, some network filesystems): claim the name, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        try:
            os.replace(tmp, path)
        except BaseException:
            Path(path).unlink(missing_ok=True)  # the empty name this call claimed
            raise
        return
    os.unlink(tmp)


def save_table(table: ConceptTable, path: Path) -> None:
    from safetensors.numpy import save

    tensors = {F.T_TOKEN_EMBEDS: np.ascontiguousarray(table.E), F.T_BYPASS: np.ascontiguousarray(table.B)}
    atomic_write_bytes(save(tensors, metadata=table.metadata()), path)


def is_torch_file(path: Path) -> bool:
    """Whether `path` starts as torch.save's zip container does (pm-train's concept files). No torch."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        if is_torch_file(path):  # most likely pm-train's concept file
            raise UserError(f"{path} is a PyTorch file (a concept file from pm-train?), not a baked concept table: "
                            f"bake it into the bundle first (pm-export {path} --bundle BUNDLE), then use "
                            "--concept NAME") from e
        raise UserError(f"{path} is not a concept table ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    return tensors, meta


def load_table(path: Path, expected_fingerprint: str | None = None) -> ConceptTable:
    """Read and check a concept table; `expected_fingerprint`: the bundle's base model."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"concept table not found: {path}")
    tensors, meta = _read(path)
    if meta.get(F.TM_FORMAT) != F.TABLE_FORMAT:
        raise UserError(f"{path} is not a PersonaMagic concept table (format {meta.get(F.TM_FORMAT)!r})")
    try:
        version = int(meta.get(F.TM_VERSION, ""))
    except ValueError:
        raise UserError(f"{path}: concept table version {meta.get(F.TM_VERSION)!r} is not a number") from None
    if version > F.TABLE_VERSION:
        raise UserError(f"{path} is concept table version {version}; this tool reads up to {F.TABLE_VERSION}")
    try:
        table = ConceptTable(
            E=tensors[F.T_TOKEN_EMBEDS], B=tensors[F.T_BYPASS],
            concept_word=meta[F.TM_CONCEPT_WORD], super_class=meta[F.TM_SUPER_CLASS],
            placeholder_tokens=tuple(str(t) for t in json.loads(meta[F.TM_PLACEHOLDERS])),
            stage_lo=int(meta[F.TM_STAGE_LO]), stage_hi=int(meta[F.TM_STAGE_HI]),
            fingerprint=meta[F.TM_FINGERPRINT], reference_name=meta.get(F.TM_REFERENCE_NAME, ""),
            reference_sha256=meta[F.TM_REFERENCE_SHA256], source_sha256=meta.get(F.TM_SOURCE_SHA256, ""))
    except KeyError as e:
        raise UserError(f"{path} is an incomplete concept table (missing {e.args[0]})") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} is a malformed concept table ({str(e).splitlines()[0]})") from None
    if int(meta.get(F.TM_NUM_TOKENS, table.num_tokens)) != table.num_tokens:
        raise UserError(f"{path} is a malformed concept table (num_tokens disagrees with the placeholder list)")
    if expected_fingerprint is not None and table.fingerprint != expected_fingerprint:
        raise UserError(f"{path} was baked for a different base model than this bundle (fingerprint mismatch)")
    return table
