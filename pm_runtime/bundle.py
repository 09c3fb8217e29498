"""bundle.json: writing and reading a bundle's manifest (DESIGN §3). numpy/json only, no torch.

A bundle is a folder: bundle.json, the network files (ONNX, TensorRT plans), tokenizer/ and
concepts/. The manifest lists every file with its sha256; the runtime loads only through it.
Reading refuses, each with a one-line UserError: another format name, a newer version, a file
path that leaves the folder (absolute, `..`, or a symlink pointing out), a missing file and a
checksum mismatch. Key names live in pm_runtime.formats.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
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


# Files already hashed on this machine and unchanged since (git's rule for its index: the same inode,
# size, mtime and ctime -> the same bytes; ctime cannot be set back from user space) are not hashed
# again: a warm start does not re-read 2 GB of weights. PM_VERIFIED_CACHE names the record file
# (default: $XDG_CACHE_HOME or ~/.cache, personamagic/verified-files.json); PM_VERIFIED_CACHE=0 hashes
# every time.
VERIFIED_CACHE_ENV = "PM_VERIFIED_CACHE"
_VERIFIED_LOCK = threading.Lock()


def _verified_cache_path() -> Path | None:
    value = os.environ.get(VERIFIED_CACHE_ENV)
    if value == "0":
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "personamagic" / "verified-files.json"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _read_verified(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def sha256_matches(path: Path, digest: str) -> bool:
    """Whether `path` hashes to `digest`; a file recorded as hashed to it and unchanged since is not
    read again (see VERIFIED_CACHE_ENV). Only matches are recorded."""
    cache = _verified_cache_path()
    key = str(Path(path).resolve())
    stamp = _stamp(path)  # taken before reading: a change while hashing leaves a stale stamp, never a wrong one
    if cache is not None and _read_verified(cache).get(key) == [digest, *stamp]:
        return True
    if sha256_file(path) != digest:
        return False
    if cache is not None:
        with _VERIFIED_LOCK:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                records = _read_verified(cache)
                records[key] = [digest, *stamp]
                atomic_write_bytes(json.dumps(records, indent=0).encode(), cache)
            except OSError:
                pass  # a read-only home: hash again next time
    return True


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
    if verify and not sha256_matches(path, digest):
        raise UserError(f"bundle file {rel} ({what}) fails its checksum: modified or corrupted")
    return path


@contextlib.contextmanager
def manifest_lock(root: Path, log=None):
    """Hold the bundle's edit lock (an flock on the bundle folder itself: no lock file) while bundle.json is
    read, changed and rewritten, so that two edits at once (pm-export --bundle adding a concept while
    pm-bundle removes one) cannot lose one another's change, or list a table that was deleted. Waits for
    the other edit (saying so through `log`). A full re-export (pm-export --force) takes it too while it
    swaps a new bundle folder into ROOT's place; an edit that was waiting on the folder swapped out then
    locks the new one at ROOT (the lock is on a folder, and the name may point to another by the time it
    is granted). Where flock does not exist (Windows) edits are not locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    said = False
    while True:
        try:
            fd = os.open(root, os.O_RDONLY)
        except FileNotFoundError:
            raise UserError(f"{root} is gone (removed or replaced while waiting for its edit lock)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log and not said:
                log(f"waiting for another edit of {root} (pm-export --bundle, pm-export --force or pm-bundle) "
                    "to finish")
                said = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            now = os.stat(root)
        except FileNotFoundError:
            now = None
        locked = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino):
            break
        os.close(fd)  # ROOT names another folder now (swapped in meanwhile): lock that one
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def write_manifest(root: Path, manifest: dict) -> Path:
    """Atomic write of ROOT/bundle.json (temp file + rename)."""
    path = Path(root) / F.BUNDLE_MANIFEST
    atomic_write_bytes((json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode(), path)
    return path


def component_files(comp: dict) -> list[tuple[dict, str]]:
    """(file entry, description) of a component's file and its external data files."""
    what = f"component {comp.get(F.CK_NAME, '?')}"
    return [(comp, what)] + [(d, what + " external data") for d in comp.get(F.CK_DATA_FILES, [])]


def listed_files(manifest: dict) -> list[tuple[dict, str, bool]]:
    """(file entry, description, small) of every file a manifest lists: the networks with their data
    files, then the tokenizer files and the concept tables (small: hashed whenever the bundle is opened;
    the networks only when used)."""
    files = [(e, what, False) for comp in manifest[F.BK_COMPONENTS] for e, what in component_files(comp)]
    files += [(e, "tokenizer", True) for e in manifest[F.BK_TOKENIZER][F.BK_TOKENIZER_FILES]]
    return files + [(q, f"concept {q.get(F.QK_NAME, '?')}", True) for q in manifest.get(F.BK_CONCEPTS, [])]


@dataclass(frozen=True)
class Bundle:
    """An opened bundle. With verify=True a network file (and its external data files) is checked
    against its sha256 when it is first used (component_path, or hashed alongside its loading with
    `verifying`), so a backend hashes only the networks it loads: a bundle with ONNX graphs, torch
    weights and TensorRT plans costs each backend only its own files. `verify_all()` checks them all."""

    root: Path
    manifest: dict
    verify: bool = True
    _verified: set = field(default_factory=set, compare=False, repr=False)

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
        """The component's file, checked against its sha256 (with its data files) on first use."""
        path = inside(self.root, self.component(network, fmt)[F.CK_FILE])
        self._check(network, fmt)
        return path

    def _check(self, network: str, fmt: str) -> None:
        if not self.verify or (network, fmt) in self._verified:
            return
        for entry, what in component_files(self.component(network, fmt)):
            check_file(self.root, entry, what, verify=True)
        self._verified.add((network, fmt))

    def verify_all(self) -> None:
        """Check every network file now (those of every format)."""
        for c in self.components:
            self._check(c[F.CK_NETWORK], c[F.CK_FORMAT])

    @contextlib.contextmanager
    def verifying(self, items: list[tuple[str, str]]):
        """`with bundle.verifying([(network, fmt), ...]) as paths:` paths[(network, fmt)] is the file to
        load; its sha256 is computed in a background thread meanwhile (one thread per file), and
        leaving the block waits for the hashes: a mismatch raises UserError there, so whatever the
        block built from the files must not be used before the block is left. A cheaper start than
        hashing first: the loading and the hashing read the same (cached) pages at once."""
        from concurrent.futures import ThreadPoolExecutor

        paths = {(n, f): inside(self.root, self.component(n, f)[F.CK_FILE]) for n, f in items}
        todo = [(key, entry, what) for key in paths if self.verify and key not in self._verified
                for entry, what in component_files(self.component(*key))]
        if not todo:
            yield paths
            return
        with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="pm-verify") as pool:
            futures = [(key, pool.submit(check_file, self.root, entry, what, True)) for key, entry, what in todo]
            yield paths  # an error in the block propagates after the pool's threads finish
            for _, fut in futures:
                fut.result()  # raises the UserError of a file that fails its checksum
        self._verified.update(key for key, _ in futures)

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
    """Read and check a bundle: the manifest, every path (inside the bundle, present), and the
    sha256 of the concept tables and tokenizer files (small). Network files are hashed when a
    backend first uses them (verify=True, Bundle.component_path / Bundle.verifying) or never
    (verify=False); Bundle.verify_all() hashes them all at once."""
    root = Path(root)
    manifest = read_manifest(root)
    try:
        for entry, what, small in listed_files(manifest):
            check_file(root, entry, what, verify=small)  # a network file is hashed on first use
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"malformed {root / F.BUNDLE_MANIFEST}: {type(e).__name__} {e}") from None
    return Bundle(root, manifest, verify=bool(verify))


@contextlib.contextmanager
def editing_bundle(root: Path, log=None):
    """An edit of a bundle's concepts (pm-export --bundle, pm-bundle remove-concept): ROOT checked to be a
    bundle (a one-line UserError, before any lock), its edit lock taken (manifest_lock), and the Bundle
    read again under the lock, so the edit starts from a manifest no other edit changes until it ends."""
    open_bundle(Path(root), verify=False)
    with manifest_lock(Path(root), log):
        yield open_bundle(Path(root), verify=False)  # paths + format; the networks are not re-hashed
