"""What the onnxruntime/TensorRT runtime imports must not import torch (DESIGN §3, the torch line)."""

import subprocess
import sys

RUNTIME_MODULES = ["pm_runtime", "pm_runtime.errors", "pm_runtime.formats", "pm_runtime.fingerprint",
                   "pm_runtime.noise", "pm_runtime.prompts", "pm_runtime.stages", "pm_runtime.schedulers",
                   "pm_runtime.schedulers.linear", "pm_runtime.tokenizer", "pm_runtime.specs", "pm_runtime.bundle",
                   "pm_runtime.concept_table", "pm_runtime.png", "pm_runtime.prompt_encoding", "pm_runtime.pipeline",
                   "pm_runtime.cli", "pm_runtime.reproduce", "pm_runtime.bundle_cli", "pm_runtime.interrupts", "pm_runtime.backends.base", "pm_runtime.backends.onnxruntime",
                   "pm_runtime.backends.tensorrt",
                   # torch backends: importable without torch; they say what is missing when used
                   "pm_runtime.backends.torch", "pm_runtime.backends.torch_cuda"]


def test_runtime_imports_without_torch():
    code = ("import sys\n"
            "for name in ('torch', 'diffusers', 'transformers'):\n"
            "    sys.modules[name] = None  # any import of these now fails\n"
            + "".join(f"import {m}\n" for m in RUNTIME_MODULES)
            + "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_torch_backends_explain_a_missing_torch(tmp_path):
    """Without torch, the torch backends are 'unavailable' with an install hint (auto skips them)."""
    code = ("import sys\n"
            "for name in ('torch', 'diffusers', 'transformers'):\n"
            "    sys.modules[name] = None\n"
            "from pm_runtime.backends.torch_cuda import TorchCudaBackend\n"
            "from pm_runtime.backends.torch import TorchBackend\n"
            "print(TorchCudaBackend.unavailable(None))\n"
            "print(TorchBackend.unavailable(None))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stderr
    assert "needs PyTorch" in lines[0] and "pip install" in lines[0] and "needs PyTorch" in lines[1]
