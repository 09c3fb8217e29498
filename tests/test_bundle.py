"""The torch-free half of export: concept tables, network specs and the bundle manifest.

Bundles here are synthetic (placeholder network files), so these tests need neither torch nor
onnx; tests/test_export.py checks real exported bundles.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pm_runtime import formats as F
from pm_runtime.bundle import file_entry, inside, open_bundle, write_manifest
from pm_runtime.concept_table import ConceptTable, load_table, save_table
from pm_runtime.errors import UserError
from pm_runtime.specs import TEXT_ENCODER, UNET, VAE_DECODER, ModelDims, network_specs

FP = "sha256:" + "ab" * 32


def make_table(lo=400, hi=410, K=2, D=8, seed=0, fingerprint=FP) -> ConceptTable:
    rng = np.random.default_rng(seed)
    shape = (hi - lo + 1, K, D)
    return ConceptTable(rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32),
                        "<persona>", "face", tuple(f"<pm-concept-{i + 1}>" for i in range(K)), lo, hi, fingerprint,
                        "photo0.png", "cd" * 32, "ef" * 32)


# ---------------------------------------------------------------- concept tables
def test_table_round_trip(tmp_path):
    t = make_table()
    save_table(t, tmp_path / "a.safetensors")
    u = load_table(tmp_path / "a.safetensors", expected_fingerprint=FP)
    assert np.array_equal(u.E, t.E) and np.array_equal(u.B, t.B)
    assert u.metadata() == t.metadata()
    assert u.placeholder_tokens == t.placeholder_tokens and (u.stage_lo, u.stage_hi) == (400, 410)
    E, B = u.row(405)
    assert np.array_equal(E, t.E[5]) and np.array_equal(B, t.B[5])
    with pytest.raises(IndexError):
        u.row(411)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file


@pytest.mark.parametrize("case", ["garbage", "json", "other-format", "newer", "missing-key", "bad-shape"])
def test_malformed_tables_refused(tmp_path, case):
    from safetensors.numpy import save

    path = tmp_path / "t.safetensors"
    t = make_table()
    meta = t.metadata()
    tensors = {F.T_TOKEN_EMBEDS: t.E, F.T_BYPASS: t.B}
    if case == "garbage":
        path.write_bytes(os.urandom(64))
    elif case == "json":
        path.write_text('{"not": "a table"}')
    else:
        if case == "other-format":
            meta[F.TM_FORMAT] = "something-else"
        elif case == "newer":
            meta[F.TM_VERSION] = str(F.TABLE_VERSION + 1)
        elif case == "missing-key":
            del meta[F.TM_FINGERPRINT]
        elif case == "bad-shape":
            tensors[F.T_BYPASS] = t.B[:, :1]
        path.write_bytes(save(tensors, metadata=meta))
    with pytest.raises(UserError) as e:
        load_table(path)
    assert "\n" not in str(e.value)


def test_table_fingerprint_checked(tmp_path):
    save_table(make_table(), tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="different base model"):
        load_table(tmp_path / "a.safetensors", expected_fingerprint="sha256:other")


# ---------------------------------------------------------------- specs
def test_specs_shapes_profiles_and_axes():
    specs = network_specs(ModelDims(text_dim=768, vocab_size=49408))
    unet, vae, text = specs[UNET], specs[VAE_DECODER], specs[TEXT_ENCODER]
    assert unet.profile()["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert unet.input_shapes("opt", latent_height=40, latent_width=96)["c_k"] == (2, 77, 768)
    assert vae.output_shapes("min", latent_height=40)["image"] == (1, 3, 320, 256)
    assert text.dynamic_axes()["input_ids"] == {0: "batch"}
    assert unet.dynamic_axes()["noise_pred"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    for bad in (dict(latent_height=36), dict(latent_height=136), dict(batch=0)):
        with pytest.raises(ValueError):
            unet.input_shapes(**bad)
    with pytest.raises(ValueError, match="no axis"):
        text.input_shapes(latent_height=32)
    x = text.dummy_inputs(np.random.default_rng(0), batch=3)
    assert x["input_ids"].dtype == np.int64 and x["input_ids"].max() < 49408 and x["concept_mask"].dtype == bool
    assert {k: v.shape for k, v in x.items()} == text.input_shapes(batch=3)
    t = unet.dummy_inputs(np.random.default_rng(0))["timestep"]
    assert t.shape == (2,) and t.dtype == np.float32 and 0 <= t.min() and t.max() < 1000
    d = unet.to_dict()
    assert d["axes"]["latent_height"] == {"min": 32, "opt": 64, "max": 128, "multiple_of": 8}
    assert json.loads(json.dumps(d)) == d


# ---------------------------------------------------------------- bundle manifest
def make_bundle(root, fingerprint=FP):
    """A bundle-shaped folder with placeholder network files, a real table and a manifest."""
    root.mkdir()
    (root / "unet.onnx").write_bytes(b"graph")
    (root / "unet.onnx.data").write_bytes(b"weights" * 10)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    save_table(make_table(fingerprint=fingerprint), root / "concepts" / "alice.safetensors")
    specs = network_specs(ModelDims(text_dim=8))
    comp = {F.CK_NAME: "unet", F.CK_NETWORK: UNET, F.CK_FORMAT: "onnx", **file_entry(root, "unet.onnx"),
            F.CK_DATA_FILES: [file_entry(root, "unet.onnx.data")], F.CK_PRECISION: "fp32",
            **{k: v for k, v in specs[UNET].to_dict().items() if k in ("inputs", "outputs", "axes")}}
    manifest = {F.BK_FORMAT: F.BUNDLE_FORMAT, F.BK_VERSION: F.BUNDLE_VERSION, F.BK_FINGERPRINT: FP,
                F.BK_BASE_MODEL: ModelDims(text_dim=8).to_dict(), F.BK_COMPONENTS: [comp],
                F.BK_SCHEDULER: {"num_train_timesteps": 1000},
                F.BK_TOKENIZER: {F.BK_TOKENIZER_FILES: [file_entry(root, "tokenizer/vocab.json")]},
                F.BK_CONCEPTS: [{F.QK_NAME: "alice", **file_entry(root, "concepts/alice.safetensors")}]}
    write_manifest(root, manifest)
    return root


def edit_manifest(root, fn):
    m = json.loads((root / F.BUNDLE_MANIFEST).read_text())
    fn(m)
    (root / F.BUNDLE_MANIFEST).write_text(json.dumps(m))


def test_bundle_reads_and_verifies(tmp_path):
    root = make_bundle(tmp_path / "b")
    b = open_bundle(root)
    assert b.fingerprint == FP and b.dims.text_dim == 8
    assert b.component_path(UNET) == root / "unet.onnx"
    assert b.load_concept("alice").E.shape == (11, 2, 8)
    with pytest.raises(UserError, match="no concept 'bob'"):
        b.concept("bob")
    with pytest.raises(UserError, match="no tensorrt unet"):
        b.component(UNET, "tensorrt")


@pytest.mark.parametrize("victim", ["tokenizer/vocab.json", "concepts/alice.safetensors"])
def test_tampered_small_file_refused_at_open(tmp_path, victim):
    root = make_bundle(tmp_path / "b")
    with open(root / victim, "ab") as f:
        f.write(b"x")
    with pytest.raises(UserError, match="checksum"):
        open_bundle(root)


def with_vae(root):
    """make_bundle's folder plus a second network file (the VAE decoder's)."""
    (root / "vae_decoder.onnx").write_bytes(b"vae graph")
    vae = {F.CK_NAME: "vae_decoder", F.CK_NETWORK: VAE_DECODER, F.CK_FORMAT: "onnx",
           **file_entry(root, "vae_decoder.onnx"), F.CK_DATA_FILES: []}
    edit_manifest(root, lambda m: m[F.BK_COMPONENTS].append(vae))
    return root


@pytest.mark.parametrize("victim", ["unet.onnx", "unet.onnx.data"])
def test_tampered_network_refused_on_use(tmp_path, victim):
    """Network files are hashed when first used (only those a backend loads), or all by verify_all."""
    root = with_vae(make_bundle(tmp_path / "b"))
    with open(root / victim, "ab") as f:
        f.write(b"x")
    b = open_bundle(root)
    assert b.component_path(VAE_DECODER) == root / "vae_decoder.onnx"  # an intact one is fine
    with pytest.raises(UserError, match=r"unet.onnx(.data)? \(component unet( external data)?\) fails its checksum"):
        b.component_path(UNET)
    with pytest.raises(UserError, match="checksum"):
        open_bundle(root).verify_all()
    with pytest.raises(UserError, match="checksum"):
        with open_bundle(root).verifying([(UNET, "onnx")]) as paths:
            assert paths[(UNET, "onnx")] == root / "unet.onnx"  # the body runs; leaving it raises
    assert open_bundle(root, verify=False).component_path(UNET) == root / "unet.onnx"


def test_verifying_checks_once_and_lets_errors_of_the_body_through(tmp_path):
    root = with_vae(make_bundle(tmp_path / "b"))
    b = open_bundle(root)
    with b.verifying([(UNET, "onnx"), (VAE_DECODER, "onnx")]) as paths:
        assert set(paths) == {(UNET, "onnx"), (VAE_DECODER, "onnx")}
    assert b._verified == {(UNET, "onnx"), (VAE_DECODER, "onnx")}
    with pytest.raises(ValueError, match="from the body"):
        with open_bundle(root).verifying([(UNET, "onnx")]):
            raise ValueError("from the body")


def test_missing_file_refused(tmp_path):
    root = make_bundle(tmp_path / "b")
    (root / "unet.onnx.data").unlink()
    with pytest.raises(UserError, match="missing: unet.onnx.data"):
        open_bundle(root, verify=False)


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/passwd", "sub/../../x", "~/x", "a\\..\\b", ""])
def test_paths_leaving_the_bundle_refused(tmp_path, path):
    root = make_bundle(tmp_path / "b")
    (tmp_path / "outside.onnx").write_bytes(b"graph")
    edit_manifest(root, lambda m: m[F.BK_COMPONENTS][0].update({F.CK_FILE: path}))
    with pytest.raises(UserError, match="leaves the bundle|plain relative"):
        open_bundle(root, verify=False)


def test_symlink_out_of_the_bundle_refused(tmp_path):
    root = make_bundle(tmp_path / "b")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"graph")
    (root / "unet.onnx").unlink()
    (root / "unet.onnx").symlink_to(secret)
    with pytest.raises(UserError, match="outside the bundle"):
        open_bundle(root)
    # a symlinked folder pointing out is refused too
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "vocab.json").write_text("{}")
    import shutil

    shutil.rmtree(root / "tokenizer")
    (root / "tokenizer").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="outside the bundle"):
        inside(root, "tokenizer/vocab.json")


@pytest.mark.parametrize("change,needle", [
    (lambda m: m.update({F.BK_FORMAT: "other-bundle"}), "not a PersonaMagic bundle"),
    (lambda m: m.update({F.BK_VERSION: F.BUNDLE_VERSION + 1}), "reads up to"),
    (lambda m: m.update({F.BK_VERSION: "1"}), "not a positive integer"),
    (lambda m: m.pop(F.BK_FINGERPRINT), "missing fingerprint"),
])
def test_other_formats_and_versions_refused(tmp_path, change, needle):
    root = make_bundle(tmp_path / "b")
    edit_manifest(root, change)
    with pytest.raises(UserError, match=needle):
        open_bundle(root)


def test_not_a_bundle(tmp_path):
    with pytest.raises(UserError, match="not found"):
        open_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a bundle"):
        open_bundle(tmp_path / "empty")
    (tmp_path / "empty" / F.BUNDLE_MANIFEST).write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        open_bundle(tmp_path / "empty")


def test_concept_table_of_another_model_refused_by_bundle(tmp_path):
    root = make_bundle(tmp_path / "b", fingerprint="sha256:another-model")
    with pytest.raises(UserError, match="different base model"):
        open_bundle(root).load_concept("alice")


def test_runtime_half_imports_without_torch():
    code = ("import sys\n"
            "for name in ('torch', 'diffusers', 'transformers', 'onnx', 'onnxruntime'):\n"
            "    sys.modules[name] = None  # any import of these now fails\n"
            "import pm_runtime.bundle, pm_runtime.specs, pm_runtime.concept_table\n"
            "from pm_runtime.concept_table import load_table\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_hashed_files_are_not_hashed_again_until_they_change(tmp_path, monkeypatch):
    """A warm start skips files hashed before and unchanged since (inode, size, mtime, ctime); any
    change, even of the same size, hashes again; PM_VERIFIED_CACHE=0 always hashes."""
    import pm_runtime.bundle as B

    monkeypatch.setenv("PM_VERIFIED_CACHE", str(tmp_path / "cache" / "verified.json"))
    root = make_bundle(tmp_path / "b")
    calls = []
    real = B.sha256_file
    monkeypatch.setattr(B, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    open_bundle(root).component_path(UNET)
    assert calls.count("unet.onnx") == 1 and calls.count("unet.onnx.data") == 1
    calls.clear()
    open_bundle(root).component_path(UNET)  # a new process would see the same record
    assert calls == []
    with open(root / "unet.onnx", "r+b") as f:  # same size, other bytes
        f.write(b"GRAPH")
    with pytest.raises(UserError, match="unet.onnx \\(component unet\\) fails its checksum"):
        open_bundle(root).component_path(UNET)
    assert calls == ["unet.onnx"]
    (root / "unet.onnx").write_bytes(b"graph")  # restored: hashed again, recorded again
    calls.clear()
    open_bundle(root).component_path(UNET)
    assert calls == ["unet.onnx"]
    monkeypatch.setenv("PM_VERIFIED_CACHE", "0")
    calls.clear()
    open_bundle(root).component_path(UNET)
    assert {"unet.onnx", "unet.onnx.data", "vocab.json"} <= set(calls)


def _folder(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "mark.txt").write_text(text)
    return path


def test_a_full_re_export_waits_for_a_concept_edit_and_a_waiting_edit_follows_the_new_folder(tmp_path):
    """pm-export --force swaps a new bundle folder into the old one's place under the old one's edit lock:
    an edit holding the lock finishes first; an edit still waiting when the swap happens is given the new
    folder's lock, not the dead old folder's (the lock is on a folder; the name moved on)."""
    import threading
    import time

    from pm_export.build import _swap_into_place
    from pm_runtime.bundle import manifest_lock

    out = _folder(tmp_path / "bundle", "old")
    order = []
    holding, release = threading.Event(), threading.Event()

    def edit():
        with manifest_lock(out):
            holding.set()
            release.wait(10)
            order.append("edit done in " + (out / "mark.txt").read_text())

    worker = threading.Thread(target=edit)
    worker.start()
    assert holding.wait(10)
    swap = threading.Thread(target=lambda: (_swap_into_place(_folder(tmp_path / "new", "new"), out),
                                            order.append("swapped")))
    swap.start()
    time.sleep(0.3)
    assert swap.is_alive() and (out / "mark.txt").read_text() == "old"  # waiting for the edit
    release.set()
    worker.join(10)
    swap.join(10)
    assert order == ["edit done in old", "swapped"] and (out / "mark.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the old folder deleted, nothing left

    # an edit that starts waiting on the old folder and is granted the lock after the swap: it holds the
    # new folder's lock (a third edit of the new folder waits for it)
    seen, granted = [], threading.Event()
    new = _folder(tmp_path / "newer", "newer")
    with manifest_lock(out):
        def late_edit():
            with manifest_lock(out):
                seen.append((out / "mark.txt").read_text())
                granted.set()
                time.sleep(0.3)
                seen.append("late edit done")

        waiter = threading.Thread(target=late_edit)
        waiter.start()
        time.sleep(0.2)
        os.replace(out, tmp_path / "aside")  # the swap, as _swap_into_place does it under this lock
        os.replace(new, out)
    assert granted.wait(10) and seen[0] == "newer"
    with manifest_lock(out):  # waits for the late edit: it locked the folder now at `out`
        seen.append("third edit")
    waiter.join(10)
    assert seen == ["newer", "late edit done", "third edit"]


def test_a_swap_that_fails_puts_the_old_bundle_back(tmp_path, monkeypatch):
    from pm_export import build

    out = _folder(tmp_path / "bundle", "old")
    real = os.replace

    def failing(src, dst):
        if Path(src).name == "new":
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(build.os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        build._swap_into_place(_folder(tmp_path / "new", "new"), out)
    assert (out / "mark.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "new"]  # (the caller removes its tmp)
