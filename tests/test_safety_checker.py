"""The safety checker (an optional bundle component): exported and validated when the model folder
has one, run by default by the pipeline, flagged images blacked out in the API and not written by
pm-run (exit status 3). On the tiny model with a tiny random checker (pm-make-tiny-model
--safety-checker): it flags nothing until a test lowers its thresholds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pm_runtime.errors import UserError  # noqa: E402
from pm_runtime.pipeline import Pipeline  # noqa: E402
from pm_runtime.safety import clip_input  # noqa: E402

PROMPT = "a photo of <persona> as a knight"
FAST = dict(seed=3, steps=2, height=256, width=256)


@pytest.fixture(autouse=True)
def reference_kernels():
    """torch-cuda on a CPU: the kernels' PyTorch references (the interpreter is for tests/test_kernels.py)."""
    import pm_kernels

    pm_kernels.set_enabled(torch.cuda.is_available())
    yield
    pm_kernels.set_enabled(True)


@pytest.fixture(scope="module")
def checker_model(tmp_path_factory):
    from pm_runtime.train.tiny_model import make_tiny_model

    # seed 0 like the shared tiny model: same fingerprint, so the shared trained concept fits it
    return make_tiny_model(tmp_path_factory.mktemp("sc") / "tiny-sd-sc", seed=0, safety_checker=True)


@pytest.fixture(scope="module")
def flagging_model(checker_model, tmp_path_factory):
    """The same model with every concept threshold at -1: the checker flags every image."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    out = tmp_path_factory.mktemp("sc-flag") / "tiny-sd-flag"
    shutil.copytree(checker_model, out)
    checker = StableDiffusionSafetyChecker.from_pretrained(out / "safety_checker")
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-1.0)
    checker.save_pretrained(out / "safety_checker", safe_serialization=True)
    return out


def _export(model, concept, out, target):
    from pm_export.build import ExportConfig, export_bundle

    return export_bundle(ExportConfig(concept=concept, model=model, out=out, target=target, name="alice"),
                         log=lambda m: None)


@pytest.fixture(scope="module")
def checker_bundle(checker_model, trained_concept, tmp_path_factory):
    return _export(checker_model, trained_concept, tmp_path_factory.mktemp("scb") / "bundle", "onnx,torch")


@pytest.fixture(scope="module")
def flagging_bundle(flagging_model, trained_concept, tmp_path_factory):
    return _export(flagging_model, trained_concept, tmp_path_factory.mktemp("scf") / "bundle", "torch")


def test_preprocessing_matches_clip_image_processor(checker_model):
    from PIL import Image
    from transformers import CLIPImageProcessor

    from pm_runtime.modeling.loading import load_safety_checker

    settings = load_safety_checker(checker_model)[1]
    proc = CLIPImageProcessor.from_pretrained(checker_model / "feature_extractor")
    rng = np.random.default_rng(0)
    for h, w in ((256, 256), (512, 320), (300, 700)):
        imgs = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        ref = proc([Image.fromarray(i) for i in imgs], return_tensors="np").pixel_values
        ours = clip_input(imgs, settings)
        assert ours.shape == ref.shape == (2, 3, 224, 224) and np.abs(ours - ref).max() < 1e-4


def test_score_is_diffusers_decision(flagging_model, checker_model):
    """nsfw_score > 0 exactly where diffusers' forward_onnx says has_nsfw_concepts."""
    from pm_runtime.modeling.graphs import SafetyCheckerGraph
    from pm_runtime.modeling.loading import load_safety_checker

    x = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for model in (checker_model, flagging_model):
        checker = load_safety_checker(model)[0]
        with torch.no_grad():
            checker.concept_embeds_weights[:8] = torch.linspace(-0.6, 0.6, 8)  # a mix of flagged and not
            score = SafetyCheckerGraph(checker)(x)
            _, has_nsfw = checker.forward_onnx(x, x.clone())
        assert torch.equal(score > 0, has_nsfw)
    assert 0 < int(has_nsfw.sum()) <= 6


def test_export_adds_a_validated_optional_component(checker_bundle):
    manifest = json.loads((checker_bundle / "bundle.json").read_text())
    comps = {(c["network"], c["format"]): c for c in manifest["components"]}
    onnx = comps[("safety_checker", "onnx")]
    assert onnx["details"]["optional"] and onnx["precision"] == "fp32"
    assert onnx["details"]["preprocess"]["shortest_edge"] == 224
    assert onnx["validation"] and all(v["passed"] and v["max_abs"] <= v["limit"] for v in onnx["validation"])
    assert ("safety_checker", "torch") in comps
    assert manifest["base_model"]["safety_checker"] == "exported"


@pytest.mark.parametrize("backend", ["onnxruntime", "torch-cuda"])
def test_pipeline_runs_it_by_default(checker_bundle, backend):
    kw = {"device": "cpu"} if backend == "torch-cuda" else {}
    pipe = Pipeline.load(checker_bundle, backend=backend, **kw)
    g = pipe.generate(PROMPT, num_images=2, **FAST)
    assert g.nsfw == [False, False] and g.images.any() and "safety_checker_s" in g.timings
    off = Pipeline.load(checker_bundle, backend=backend, safety_checker=False, **kw).generate(PROMPT, **FAST)
    assert off.nsfw is None
    if backend == "torch-cuda":  # its weights rest in host memory, on the device only for its call
        parked = pipe.backend._parked["safety_checker"]
        assert parked.on_host() and pipe.backend.loads["safety_checker"] == 1
        pipe.generate(PROMPT, **FAST)
        assert parked.on_host() and pipe.backend.loads["safety_checker"] == 2 and pipe.backend.loads["unet"] == 1
        resident = Pipeline.load(checker_bundle, backend=backend, offload_safety_checker=False, **kw)
        again = resident.generate(PROMPT, num_images=2, **FAST)
        assert "safety_checker" not in resident.backend._parked and again.nsfw == [False, False]
        np.testing.assert_array_equal(again.images, g.images)


def test_flagged_images_are_black_and_not_written(flagging_bundle, tmp_path):
    pipe = Pipeline.load(flagging_bundle, backend="torch-cuda", device="cpu")
    g = pipe.generate(PROMPT, **FAST)
    assert g.nsfw == [True] and not g.images.any()
    from click.testing import CliRunner

    from pm_runtime.cli import main

    out = tmp_path / "img.png"
    args = ["--engine", str(flagging_bundle), "--backend", "torch-cuda", "--device", "cpu", "--prompt", PROMPT,
            "--steps", "2", "--height", "256", "--width", "256", "--seed", "3", "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 3, r.output
    assert "flagged by the safety checker" in r.output and "not written" in r.output and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.iterdir())
    r = CliRunner().invoke(main, [*args, "--no-safety-checker"])
    assert r.exit_code == 0 and out.is_file() and "safety checker is off" in r.output


def test_a_backend_that_cannot_run_it_is_refused(checker_bundle, tiny_model):
    """The torch backend runs the model folder's checker; the shared tiny model has none."""
    with pytest.raises(UserError, match="cannot run on the torch backend.*--no-safety-checker"):
        Pipeline.load(checker_bundle, backend="torch", model=tiny_model)
    assert Pipeline.load(checker_bundle, backend="torch", model=tiny_model, safety_checker=False)
