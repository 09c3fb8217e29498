"""Shared fixtures: one tiny random SD model and a few synthetic photos per test session.

Without a CUDA GPU the Triton kernels (pm_kernels) run under Triton's CPU interpreter: the
variable must be set before any @triton.jit function is defined, i.e. before pm_kernels is
first imported, hence here. tests/test_kernels.py asserts that the Triton path really runs.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from PIL import Image

# the record of already-hashed bundle files (pm_runtime/bundle.py) lives in a folder of this session,
# not in the user's ~/.cache
os.environ.setdefault("PM_VERIFIED_CACHE", os.path.join(tempfile.mkdtemp(prefix="pm-verified-"), "verified.json"))
# and so do pm_kernels' tuning choices (kernels/tuning.py): none read from, or written to, ~/.cache
os.environ.setdefault("PM_KERNELS_TUNE_DIR", tempfile.mkdtemp(prefix="pm-tuning-"))

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # the torch-free runtime tests still run
    pass


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from pm_runtime.train.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


def slow_unless(cases, keep):
    """pytest params for a grid of `cases`: those for which keep(*case) is false are marked slow, so the
    default run takes a covering part of the grid (every value of every axis, and the pairs that
    interact) and `-m slow` the rest; the two runs together take the whole grid."""
    out = []
    for case in cases:
        args = case if isinstance(case, tuple) else (case,)
        out.append(pytest.param(*args) if keep(*args) else pytest.param(*args, marks=pytest.mark.slow))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8-range images in dB (inf when equal)."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.fixture()
def calls(monkeypatch):
    """Every network call of the test: [(network, inputs, outputs)]."""
    from pm_runtime.backends.base import CheckedNetwork

    seen = []
    run = CheckedNetwork.run

    def recording(self, inputs):
        out = run(self, inputs)
        seen.append((self.spec.name, inputs, out))
        return out

    monkeypatch.setattr(CheckedNetwork, "run", recording)
    return seen


def write_photos(folder, n=3, seed=0, sizes=((80, 72), (64, 96), (100, 100))):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        # smooth random images (a blurred gradient + noise) so that the VAE sees structure
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + rng.random((h, w, 3)) * 55
        Image.fromarray(base.astype(np.uint8)).save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos") / "person")


def train_config(model, images, out, **kw):
    from pm_runtime.train.trainer import TrainConfig

    defaults = dict(model=str(model), images=str(images), out=str(out), resolution=64, steps=4, device="cpu",
                    seed=0)
    defaults.update(kw)
    return TrainConfig(**defaults)


@pytest.fixture(scope="session")
def trained_concept(tiny_model, photos, tmp_path_factory):
    """A concept file from a short real training run."""
    from pm_runtime.train.concept_file import atomic_torch_save
    from pm_runtime.train.trainer import Trainer

    out = tmp_path_factory.mktemp("concepts") / "alice.pt"
    tr = Trainer(train_config(tiny_model, photos, out, steps=3), warn=lambda m: None)
    for _ in range(3):
        tr.optimizer_step()
    atomic_torch_save(tr.concept_dict(True), out)
    return out


@pytest.fixture(scope="session")
def cuda_bundle(tmp_path_factory, tiny_model, trained_concept):
    """A bundle with torch fp16 weights only (concept "alice"): what the GPU tests load. No ONNX
    export, so they do not depend on the GPU machine's onnxruntime (which the export's check uses)."""
    from pm_export.build import ExportConfig, export_bundle

    out = tmp_path_factory.getbasetemp() / "pm-cuda-bundle" / "bundle"
    return export_bundle(ExportConfig(concept=trained_concept, model=tiny_model, out=out, name="alice", target="torch"),
                         log=lambda m: None)


@pytest.fixture(scope="session")
def default_export(tmp_path_factory, tiny_model, trained_concept):
    """`pm-export CONCEPT --model TINY --out B` with every default (ONNX fp32, optimised, validated), through
    the command line: (bundle folder, what it printed). Shared read-only by test_export and
    test_export_optimize: a test that changes a bundle copies it first."""
    from click.testing import CliRunner

    from pm_export.cli import main

    out = tmp_path_factory.mktemp("default-export") / "bundle"
    r = CliRunner().invoke(main, [str(trained_concept), "--model", str(tiny_model), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.fixture(scope="session")
def run_bundle(tmp_path_factory, tiny_model, trained_concept, photos):
    """The exported bundle the pipeline, pm-run and backend tests share (built once per session):
    ONNX graphs and torch fp16 weights, concepts "alice" and "alice-photo2" (re-baked with photo2)."""
    from pm_export.build import ExportConfig, add_concept, export_bundle

    out = tmp_path_factory.getbasetemp() / "pm-run-bundle" / "bundle"
    export_bundle(ExportConfig(concept=trained_concept, model=tiny_model, out=out, name="alice", target="onnx,torch"),
                  log=lambda m: None)
    add_concept(ExportConfig(concept=trained_concept, bundle=out, name="alice-photo2",
                             reference_image=photos / "photo2.png", image_encoder=tiny_model / "image_encoder"),
                log=lambda m: None)
    return out
