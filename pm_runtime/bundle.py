"""bundle.json: writing and reading a bundle's manifest (DESIGN §3). numpy/json only, no torch.

A bundle is a folder: bundle.json, the network files (ONNX, TensorRT plans), tokenizer/ and
concepts/. The manifest lists every file with its sha256; the runtime loads only through it.
Reading refuses, each with a one-line UserError: another format name, a newer version, a file
path that leaves the folder (absolute, `..`, or a symlink pointing out), a missing file and a
checksum mismatch. Key names live in pm_runtime.formats.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from . import formats as F
from .concept_table import atomic_write_bytes
from .errors import UserError
from .specs import ModelDims


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inside(root: Path, rel: str) -> Path:
    """The path of bundle file `rel` (POSIX, relative); refuses anything that leaves `root`."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise UserError(f"bundle file path {rel!r} is not a plain relative path")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel.startswith("~"):
        raise UserError(f"bundle file path {rel!r} leaves the bundle folder; refused")
    root_real = Path(root).resolve()
    path = Path(root) / pure
    real = path.resolve()  # follows symlinks, also in parent folders
    if real != root_real and root_real not in real.parents:
        raise UserError(f"bundle file {rel!r} points outside the bundle folder (symlink); refused")
    return path


def file_entry(root: Path, rel: str) -> dict:
    """{file, sha256} for a file already inside the bundle folder."""
    return {F.FK_FILE: rel, F.FK_SHA256: sha256_file(inside(root, rel))}


def check_file(root: Path, entry: dict, what: str, verify: bool = True) -> Path:
    try:
        rel, digest = entry[F.FK_FILE], entry[F.FK_SHA256]
    except (KeyError, TypeError):
        raise UserError(f"malformed bundle.json: {what} has no file/sha256") from None
    path = inside(root, rel)
    if not path.is_file():
        raise UserError(f"bundle file missing: {rel} ({what})")
    if verify and sha256_file(path) != digest:
        raise UserError(f"bundle file {rel} ({what}) fails its checksum: modified or corrupted")
    return path


def write_manifest(root: Path, manifest: dict) -> Path:
    """Atomic write of ROOT/bundle.json (temp file + rename)."""
    path = Path(root) / F.BUNDLE_MANIFEST
    atomic_write_bytes((json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode(), path)
    return path


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict

    @property
    def fingerprint(self) -> str:
        return self.manifest[F.BK_FINGERPRINT]

    @property
    def dims(self) -> ModelDims:
        return ModelDims.from_dict(self.manifest[F.BK_BASE_MODEL])

    @property
    def scheduler_config(self) -> dict:
        return dict(self.manifest[F.BK_SCHEDULER])

    @property
    def components(self) -> list[dict]:
        return list(self.manifest[F.BK_COMPONENTS])

    @property
    def concepts(self) -> list[dict]:
        return list(self.manifest.get(F.BK_CONCEPTS, []))

    @property
    def tokenizer_dir(self) -> Path:
        return inside(self.root, F.BUNDLE_TOKENIZER_DIR)

    def component(self, network: str, fmt: str = "onnx") -> dict:
        for c in self.components:
            if c[F.CK_NETWORK] == network and c[F.CK_FORMAT] == fmt:
                return c
        raise UserError(f"the bundle in {self.root} has no {fmt} {network}")

    def component_path(self, network: str, fmt: str = "onnx") -> Path:
        return inside(self.root, self.component(network, fmt)[F.CK_FILE])

    def concept(self, name: str) -> dict:
        for c in self.concepts:
            if c[F.QK_NAME] == name:
                return c
        names = ", ".join(c[F.QK_NAME] for c in self.concepts) or "none"
        raise UserError(f"the bundle has no concept {name!r} (it has: {names})")

    def concept_path(self, name: str) -> Path:
        return inside(self.root, self.concept(name)[F.FK_FILE])

    def load_concept(self, name: str):
        from .concept_table import load_table

        return load_table(self.concept_path(name), expected_fingerprint=self.fingerprint)


def read_manifest(root: Path) -> dict:
    path = Path(root) / F.BUNDLE_MANIFEST
    if not Path(root).is_dir():
        raise UserError(f"bundle folder not found: {root}")
    if not path.is_file():
        raise UserError(f"{root} is not a bundle (no {F.BUNDLE_MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get(F.BK_FORMAT) != F.BUNDLE_FORMAT:
        fmt = manifest.get(F.BK_FORMAT) if isinstance(manifest, dict) else None
        raise UserError(f"{path} is not a PersonaMagic bundle manifest (format {fmt!r})")
    version = manifest.get(F.BK_VERSION)
    if not isinstance(version, int) or version < 1:
        raise UserError(f"{path}: bundle version {version!r} is not a positive integer")
    if version > F.BUNDLE_VERSION:
        raise UserError(f"{path} is bundle format version {version}; this tool reads up to {F.BUNDLE_VERSION} "
                        "(update personamagic-runtime)")
    missing = [k for k in (F.BK_FINGERPRINT, F.BK_BASE_MODEL, F.BK_COMPONENTS, F.BK_SCHEDULER, F.BK_TOKENIZER)
               if k not in manifest]
    if missing:
        raise UserError(f"malformed {path}: missing {', '.join(missing)}")
    return manifest


def open_bundle(root: Path, verify: bool = True) -> Bundle:
    """Read and check a bundle. verify=False checks paths and presence but skips the sha256 pass
    over the network files (concept tables and tokenizer files are always hashed: they are small)."""
    root = Path(root)
    manifest = read_manifest(root)
    try:
        for comp in manifest[F.BK_COMPONENTS]:
            what = f"component {comp.get(F.CK_NAME, '?')}"
            check_file(root, comp, what, verify)
            for data in comp.get(F.CK_DATA_FILES, []):
                check_file(root, data, what + " external data", verify)
        for entry in manifest[F.BK_TOKENIZER][F.BK_TOKENIZER_FILES]:
            check_file(root, entry, "tokenizer")
        for entry in manifest.get(F.BK_CONCEPTS, []):
            check_file(root, entry, f"concept {entry.get(F.QK_NAME, '?')}")
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"malformed {root / F.BUNDLE_MANIFEST}: {type(e).__name__} {e}") from None
    return Bundle(root, manifest)
