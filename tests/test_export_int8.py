"""pm-export --int8: the bundle ships an int8 UNet graph that the onnxruntime backend runs."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from pm_runtime.errors import UserError  # noqa: E402


def _export(tiny_model, trained_concept, out, mode, **kw):
    from pm_export.build import ExportConfig, export_bundle

    return export_bundle(ExportConfig(concept=trained_concept, model=tiny_model, out=out, name="alice", int8=mode,
                                      **kw), log=lambda m: None)


@pytest.fixture(scope="module")
def static_int8_bundle(tiny_model, trained_concept, tmp_path_factory):
    """One static-qdq export with the int8 VAE decoder too (--int8-vae; one calibration recording for both,
    quantization and validation: ~10 s) for the tests that only read it."""
    return _export(tiny_model, trained_concept, tmp_path_factory.mktemp("static") / "b", "static-qdq", int8_vae=True)


# the default run exports one mode end to end (static-qdq, the one with calibration and the int8 VAE); the
# other modes' quantization is checked on the UNet graph in test_quantize, their whole export with -m slow
@pytest.mark.parametrize("mode", [pytest.param("dynamic-matmul", marks=pytest.mark.slow),
                                  pytest.param("weight-only-qdq", marks=pytest.mark.slow), "static-qdq"])
def test_pm_export_int8_bundle_runs(tiny_model, trained_concept, run_bundle, tmp_path, mode, request):
    """pm-export --int8 MODE ships an int8 unet.onnx (validated, precision int8) that pm-run's
    onnxruntime backend runs; its image stays close to the fp32 bundle's. static-qdq: with --int8-vae,
    the VAE decoder int8 too (calibrated on the same runs' finished latents, its image validated)."""
    import json

    from pm_runtime.pipeline import Pipeline

    out = (request.getfixturevalue("static_int8_bundle") if mode == "static-qdq"
           else _export(tiny_model, trained_concept, tmp_path / "b", mode))
    onnx_parts = {c["network"]: c for c in json.loads((out / "bundle.json").read_text())["components"]
                  if c["format"] == "onnx"}
    unet, vae = onnx_parts["unet"], onnx_parts["vae_decoder"]
    assert unet["precision"] == "int8" and unet["details"]["int8"]["mode"] == mode
    assert any(v["precision"].startswith("int8") and v["passed"] for v in unet["validation"])
    if mode == "static-qdq":  # calibrated on the bundle's own fp32 runs, validated on a held-out prompt's feeds
        facts = unet["details"]["int8"]
        assert facts["calibration_feeds"] > 0 and all("<persona>" in p for p in facts["calibration_prompts"])
        assert facts["validation_prompt"] not in facts["calibration_prompts"]
        assert sum(v["precision"] == "int8-static" for v in unet["validation"]) == 3
        assert facts["weight_only_nodes"] == 0  # every int8 weight's activation calibrated too
        vfacts = vae["details"]["int8"]
        assert vae["precision"] == "int8" and vfacts["mode"] == "static-qdq-conv"
        assert vfacts["calibration_feeds"] == 2 and vfacts["validation_prompt"] == facts["validation_prompt"]
        assert vfacts["kept_fp32_nodes"] == 2 and vfacts["quantized_nodes"] > 10 and vfacts["weight_only_nodes"] == 0
        checked = [v for v in vae["validation"] if v["precision"] == "int8-vae"]
        assert len(checked) == 1 and checked[0]["passed"] and checked[0]["psnr_db"] >= checked[0]["psnr_min_db"] == 30
    else:  # the other modes leave the decoder alone
        assert vae["precision"] == "fp32" and "int8" not in vae["details"]
    kw = dict(seed=5, steps=4, height=256, width=256)
    a = Pipeline.load(out, backend="onnxruntime").generate("a photo of <persona>", **kw).images.astype(float)
    b = Pipeline.load(run_bundle, backend="onnxruntime", concept="alice").generate("a photo of <persona>",
                                                                                  **kw).images.astype(float)
    psnr = 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12))
    assert psnr >= 30, psnr


def test_int8_needs_an_fp32_onnx_export(tiny_model, trained_concept, tmp_path):
    from pm_export.build import ExportConfig, export_bundle

    for bad in (dict(precision="fp16"), dict(target="torch")):
        with pytest.raises(UserError, match="--int8 quantizes"):
            export_bundle(ExportConfig(concept=trained_concept, model=tiny_model, out=tmp_path / "b",
                                       int8="dynamic-matmul", **bad), log=lambda m: None)
        with pytest.raises(UserError, match="--int8-vae quantizes"):
            export_bundle(ExportConfig(concept=trained_concept, model=tiny_model, out=tmp_path / "b",
                                       int8_vae=True, **bad), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # (15 s) the same cleanup as the int8-VAE failure below, which the default run keeps
def test_static_int8_over_tolerance_leaves_no_bundle(tiny_model, trained_concept, tmp_path, monkeypatch):
    """The static mode runs after the fp32 bundle is complete (in the temporary folder): a failed
    held-out validation still leaves no bundle behind, only the one-line error."""
    from pm_export import validate as PV
    from pm_export.build import ExportConfig, export_bundle

    monkeypatch.setitem(PV.TOLERANCES, "int8-static", (0.0, 0.0))
    with pytest.raises(UserError, match="validation failed: unet int8-static"):
        export_bundle(ExportConfig(concept=trained_concept, model=tiny_model, out=tmp_path / "b", name="alice",
                                   int8="static-qdq"), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_int8_vae_under_its_image_floor_leaves_no_bundle(tiny_model, trained_concept, tmp_path, monkeypatch):
    """--int8-vae alone (fp32 UNet): recorded, quantized, and its held-out image checked against the
    PyTorch decoder's; under the PSNR floor the export fails with the numbers and leaves nothing."""
    from pm_export import validate as PV

    monkeypatch.setitem(PV.PSNR_MIN, "int8-vae", 200.0)  # int8 never reaches 200 dB
    with pytest.raises(UserError, match=r"validation failed: vae_decoder int8-vae .* dB \(at least 200\)"):
        # the UNet's fusions do not matter here (the VAE decoder's check fails): unoptimised, ~3 s faster
        _export(tiny_model, trained_concept, tmp_path / "b", None, int8_vae=True, optimize="none")
    assert list(tmp_path.iterdir()) == []


def test_adding_a_concept_to_a_static_int8_bundle_warns(static_int8_bundle, trained_concept, tmp_path):
    import shutil

    from pm_export.build import ExportConfig, add_concept

    out = tmp_path / "b"
    shutil.copytree(static_int8_bundle, out)  # add_concept writes into the bundle: a copy of the shared one
    said = []
    add_concept(ExportConfig(concept=trained_concept, bundle=out, name="bob"), log=said.append)
    warned = [m for m in said if m.startswith("warning:")]  # both calibrated graphs named: UNet and VAE decoder
    assert len(warned) == 1 and "calibrated" in warned[0] and "'bob'" in warned[0], said
    assert "unet (static-qdq) and vae_decoder (static-qdq-conv) were" in warned[0], warned


def test_static_int8_memory_warning(monkeypatch):
    """A warning (not an error) before the work when MemAvailable is below the measured need."""
    import torch

    from pm_export import build

    unet = torch.nn.Linear(1000, 1000)  # 4 MB of fp32 weights -> ~14.4 MB needed
    said = []
    monkeypatch.setattr(build, "available_memory_bytes", lambda: 10 * 2**20)
    build._warn_static_int8_memory(unet, None, said.append)
    assert len(said) == 1 and said[0].startswith("warning: the calibration and quantization of --int8 static-qdq need")
    vae = torch.nn.Linear(100, 1000)  # 0.4 MB of fp32 weights -> ~12.4 MB for the VAE's calibration
    build._warn_static_int8_memory(None, vae, said.append)
    assert len(said) == 2 and said[1].startswith("warning: the calibration and quantization of --int8-vae need")
    monkeypatch.setattr(build, "available_memory_bytes", lambda: 13 * 2**20)  # 13.6 MB: short for the UNet only
    build._warn_static_int8_memory(unet, vae, said.append)
    assert len(said) == 3 and "of --int8 static-qdq and --int8-vae need about" in said[2]
    build._warn_static_int8_memory(None, vae, said.append)
    assert len(said) == 3
    monkeypatch.setattr(build, "available_memory_bytes", lambda: 2**40)
    build._warn_static_int8_memory(unet, vae, said.append)
    assert len(said) == 3
    monkeypatch.undo()
    have = build.available_memory_bytes()  # the real one: /proc/meminfo on Linux
    assert have is None or 0 < have < 2**50
