"""The repository's kernels/ folder (installed as pm_kernels) must not hide Hugging Face's `kernels`
package, which transformers 5.25+ imports by that name, when this checkout's root is on sys.path
(python -m pytest, python -c, the benchmark scripts run from the tree)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels package is not installed here")
def test_kernels_from_the_repo_root_is_hugging_faces():
    out = _run("import sys, kernels, pm_kernels\n"
               "print(kernels.__file__); print(pm_kernels.__file__)\n"
               "print(callable(pm_kernels.group_norm_silu), hasattr(kernels, 'group_norm_silu'))")
    hf, ours, flags = out.strip().splitlines()
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert Path(hf).resolve().parent != ROOT / "kernels"
    assert flags == "True False"


def test_transformers_and_diffusers_import_from_the_repo_root():
    # (the failure this guards: transformers' hub_kernels importing CUDAProperties from our folder)
    out = _run("from transformers import CLIPTextModel\nfrom diffusers import UNet2DConditionModel\n"
               "import pm_kernels\nprint(pm_kernels.kernel_path('attention', __import__('torch').zeros(1)))")
    assert out.strip() in ("triton", "reference")
