"""What the onnxruntime/TensorRT runtime imports must not import torch (DESIGN §3, the torch line)."""

import subprocess
import sys

RUNTIME_MODULES = ["pm_runtime", "pm_runtime.errors", "pm_runtime.formats", "pm_runtime.fingerprint",
                   "pm_runtime.noise", "pm_runtime.prompts", "pm_runtime.stages", "pm_runtime.schedulers",
                   "pm_runtime.tokenizer"]


def test_runtime_imports_without_torch():
    code = ("import sys\n"
            "for name in ('torch', 'diffusers', 'transformers'):\n"
            "    sys.modules[name] = None  # any import of these now fails\n"
            + "".join(f"import {m}\n" for m in RUNTIME_MODULES)
            + "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
