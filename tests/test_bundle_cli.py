"""pm-bundle: info (what a bundle holds), verify (every file hashed in full), remove-concept (atomic)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from pm_runtime import formats as F
from pm_runtime.bundle import _stamp, open_bundle, sha256_matches
from pm_runtime.bundle_cli import main


@pytest.fixture()
def bundle(run_bundle, tmp_path):
    return shutil.copytree(run_bundle, tmp_path / "b")


def pm_bundle(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_info_lists_what_the_bundle_holds(bundle):
    r = pm_bundle("info", bundle, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [q["name"] for q in d["concepts"]] == ["alice", "alice-photo2"]
    assert d["concepts"][0]["concept_word"] == "<persona>" and d["concepts"][0]["stage"] == [400, 800]
    # which photo each table was baked from (from the table's header): alice-photo2 was re-baked with photo2
    assert d["concepts"][1]["reference_photo"] == "photo2.png" != d["concepts"][0]["reference_photo"]
    assert d["concepts"][0]["super_class"] == "face"
    kinds = {(n["network"], n["format"]) for n in d["networks"]}
    assert {("text_encoder", "onnx"), ("unet", "onnx"), ("vae_decoder", "onnx"), ("unet", "torch")} <= kinds
    assert all(n["validated"] and n["max_rel"] < 1e-3 for n in d["networks"] if n["format"] == "onnx")
    assert d["image_sizes"] == {"min": 256, "max": 1024, "multiple_of": 64}
    on_disk = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert d["bytes"] == on_disk  # every file of the folder is one the manifest lists (or bundle.json)
    r = pm_bundle("info", bundle)
    assert r.exit_code == 0, r.output
    assert "alice-photo2" in r.output and "image sizes: 256 to 1024 px, multiples of 64" in r.output
    assert "prompts: up to 4 chunks of 75 tokens (AUTOMATIC1111's long prompts)" in r.output
    assert "reference photo photo2.png" in r.output
    assert d["img2img"] == ["onnx", "torch"] and "img2img (pm-run --init-image): yes, a VAE encoder (onnx, torch)" \
        in r.output
    unet = [line for line in r.output.splitlines() if line.split()[:2] == ["unet", "onnx"]]
    assert len(unet) == 1 and "validated, max rel" in unet[0]


def test_info_names_the_gpu_a_plan_was_built_for(bundle):
    """A TensorRT plan runs only with its TensorRT version on its GPU model: info shows both. The entry is
    written here as pm-export records one (TensorRT cannot be installed on this project's machines; the
    file is bytes, never loaded: info reads the manifest only)."""
    from pm_runtime.bundle import file_entry, write_manifest

    (bundle / "unet.plan").write_bytes(b"not an engine: info does not load it")
    manifest = json.loads((bundle / F.BUNDLE_MANIFEST).read_text())
    manifest[F.BK_COMPONENTS].append({F.CK_NAME: "unet.plan", F.CK_NETWORK: "unet", F.CK_FORMAT: "tensorrt",
                                      **file_entry(bundle, "unet.plan"), F.CK_PRECISION: "fp16",
                                      F.CK_DETAILS: {"tensorrt_version": "10.3.0", "gpu": "NVIDIA GeForce RTX 4090",
                                                     "compute_capability": "8.9", "fp16": True}})
    write_manifest(bundle, manifest)
    r = pm_bundle("info", bundle)
    assert r.exit_code == 0, r.output
    plan = [line for line in r.output.splitlines() if line.split()[:2] == ["unet", "tensorrt"]]
    assert len(plan) == 1 and "built with TensorRT 10.3.0 for NVIDIA GeForce RTX 4090 (compute 8.9)" in plan[0]
    assert "not validated" in plan[0]  # no validation entry recorded for it


def test_verify_reads_every_file_in_full(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("PM_VERIFIED_CACHE", str(tmp_path / "verified.json"))
    r = pm_bundle("verify", bundle)
    assert r.exit_code == 0 and "all" in r.output and "files match bundle.json" in r.output, r.output
    table = bundle / "concepts" / "alice-photo2.safetensors"
    digest = next(q for q in open_bundle(bundle).concepts if q[F.QK_NAME] == "alice-photo2")[F.FK_SHA256]
    data = bytearray(table.read_bytes())
    data[-1] ^= 1
    table.write_bytes(bytes(data))
    # bit rot leaves the file's stamp (inode, size, times) as pm-run recorded it after hashing: make the
    # record say so, so that pm-run's shortcut passes the damaged file
    (tmp_path / "verified.json").write_text(json.dumps({str(table.resolve()): [digest, *_stamp(table)]}))
    assert sha256_matches(table, digest)
    r = pm_bundle("verify", bundle)
    assert r.exit_code == 1 and "concepts/alice-photo2.safetensors (concept alice-photo2) fails its checksum" in r.output
    table.unlink()
    r = pm_bundle("verify", bundle)
    assert r.exit_code == 1 and "missing" in r.output, r.output


def test_remove_concept(bundle):
    from pm_runtime.pipeline import Pipeline

    r = pm_bundle("remove-concept", bundle, "alice")
    assert r.exit_code == 0 and "1 concept left" in r.output, r.output
    assert not (bundle / "concepts" / "alice.safetensors").exists()
    assert [q[F.QK_NAME] for q in open_bundle(bundle).concepts] == ["alice-photo2"]
    assert pm_bundle("verify", bundle).exit_code == 0
    r = pm_bundle("remove-concept", bundle, "alice")
    assert r.exit_code == 1 and "has no concept 'alice' (it has: alice-photo2)" in r.output
    with Pipeline.load(bundle, "onnxruntime") as pipe:  # the only concept left is picked
        assert pipe.concept.name == "alice-photo2"
    assert not [p for p in bundle.rglob(".*")]  # no temporary files left


def test_edits_wait_for_each_other(bundle):
    """remove-concept waits while another edit (here: the lock held as pm-export --bundle holds it) has the
    bundle, and then reads the manifest again: no edit is lost."""
    import threading

    from pm_runtime.bundle import manifest_lock, write_manifest

    results = []
    with manifest_lock(bundle):
        worker = threading.Thread(target=lambda: results.append(pm_bundle("remove-concept", bundle, "alice")))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and (bundle / "concepts" / "alice.safetensors").is_file()  # waiting
        manifest = json.loads((bundle / F.BUNDLE_MANIFEST).read_text())  # the other edit's change, meanwhile
        manifest[F.BK_CONCEPTS][1][F.QK_STAGE] = [450, 750]
        write_manifest(bundle, manifest)
    worker.join(timeout=60)
    r = results[0]
    assert r.exit_code == 0 and "waiting for another edit" in r.output, r.output
    left = open_bundle(bundle).concepts
    assert [q[F.QK_NAME] for q in left] == ["alice-photo2"] and left[0][F.QK_STAGE] == [450, 750]  # both kept


@pytest.mark.parametrize("args, needle", [(("info", "missing-folder"), "bundle folder not found"),
                                          (("verify", "."), "is not a bundle (no bundle.json)")])
def test_not_a_bundle(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = pm_bundle(*args)
    assert r.exit_code == 1 and needle in r.output and "Traceback" not in r.output
