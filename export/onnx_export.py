"""Export the three networks to ONNX with the signatures of pm_runtime.specs.

torch.onnx.export with the TorchScript exporter (dynamo=False): it handles diffusers' UNet with
dynamic batch and resolution. The modules (pm_runtime.modeling.graphs) have exactly the IO of the specs:
  text_encoder  input_ids (N, L) int64, concept_embeds (N, L, D), bypass (N, L, D),
                concept_mask (N, L) bool -> c_k, c_v (N, L, D)
  unet          sample (N, 4, h, w), timestep (N,), c_k, c_v (N, L, D) -> noise_pred (N, 4, h, w)
  vae_decoder   latent (N, 4, h, w) -> image (N, 3, 8h, 8w) in [-1, 1]; the 1/scaling_factor
                division is INSIDE the graph: feed the scheduler's latent as it is.
Graphs whose weights exceed protobuf's 2 GB limit (or any graph, when forced) are saved with ONNX
external data: one `NAME.onnx.data` file beside `NAME.onnx`.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from pm_runtime.specs import NetworkSpec

from .onnx_ir import oldest_ir_version

OPSET = 17
EXTERNAL_DATA_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB, less headroom for the graph itself


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: Path, external_data: str = "auto") -> list[Path]:
    """Save `model` to `path` (at its opsets' oldest IR version); returns every file written (the
    graph, then any external data file).

    external_data: "auto" (only above protobuf's limit), "always" or "never".
    """
    oldest_ir_version(model)
    path = Path(path)
    use_external = external_data == "always" or (external_data == "auto" and weight_bytes(model) > EXTERNAL_DATA_LIMIT)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if use_external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


@contextlib.contextmanager
def _quiet_export():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape-dependent Python branches in diffusers
        yield


def export_network(module: nn.Module, spec: NetworkSpec, path: Path, *, opset: int = OPSET,
                   external_data: str = "auto") -> list[Path]:
    """Trace `module` with the spec's opt-shape dummy inputs and write `path` (+ external data)."""
    rng = np.random.default_rng(1234)
    # Trace at the opt shapes (batch 2 / 24, 64x64 latent): no dynamic size is 1, so none is
    # specialised away by the tracer; validation then runs other shapes.
    dummy = spec.dummy_inputs(rng, "opt")
    args = tuple(torch.from_numpy(dummy[n]) for n in spec.input_names)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"  # large models: torch writes external data beside it
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(module, args, str(raw), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(raw))  # external data, if any, is read into memory here
    model.doc_string = spec.doc
    return save_onnx(model, path, external_data)
