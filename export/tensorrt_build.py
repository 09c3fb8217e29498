"""TensorRT plans from the exported ONNX graphs (TensorRT 10 Python API).

NOT RUN: TensorRT cannot be installed on the machines that build this project. This file is
written against TensorRT 10's documented API (Builder, OnnxParser, IBuilderConfig, optimisation
profiles, timing cache) and is exercised only where `tensorrt` imports; tests skip it elsewhere.

One plan per network, built from the fp32 ONNX graph with the FP16 builder flag (TensorRT picks
per-layer precision), one optimisation profile from the network's spec (min/opt/max shapes),
and a timing cache shared across the builds (read from / written to a file when given; one
made on another GPU or TensorRT version is left aside with a note, not an error). The layers
that the ONNX fp16 conversion keeps in fp32 (export/fp16.py: normalisation, reductions, softmax,
Pow, Sqrt, Sin, Cos and the whole timestep path up to the first learned layer) are asked for
fp32 here too (FP16 alone lets TensorRT pick fp16 for any of them). TensorRT 10 only: 11 removed
the weakly typed API this uses (BuilderFlag.FP16, per-layer precision), and the runtime refuses
it. A plan only runs on the TensorRT version and GPU architecture that built it, so both go into
the manifest and the runtime refuses a mismatch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pm_runtime.concept_table import atomic_write_bytes
from pm_runtime.errors import UserError
from pm_runtime.specs import NetworkSpec


def _timestep_nodes(onnx_path: Path) -> list[str]:
    """The ONNX nodes export/fp16.py keeps in fp32 on the timestep path (the UNet's; none elsewhere)."""
    import onnx

    from .fp16 import timestep_path

    return timestep_path(onnx.load(str(onnx_path), load_external_data=False))


def require_tensorrt():
    """The tensorrt module (>= 10), or a one-line UserError with the install hint."""
    from pm_runtime.backends.tensorrt import require_tensorrt as runtime_require

    return runtime_require(alternative=", or use --target onnx")


def gpu_facts() -> dict:
    """The GPU the plans are built for (plans are specific to its compute capability)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("TensorRT plans are built on the GPU that will run them; no CUDA GPU is visible here")
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


class PlanBuilder:
    """Builds plans one after another, sharing one timing cache."""

    def __init__(self, timing_cache: Path | None = None, workspace_bytes: int | None = None,
                 log: Callable[[str], None] = lambda m: None):
        self.trt = require_tensorrt()
        self.gpu = gpu_facts()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.timing_cache_path = Path(timing_cache) if timing_cache else None
        self.workspace_bytes = workspace_bytes
        self.log = log
        self._cache_bytes = (self.timing_cache_path.read_bytes()
                             if self.timing_cache_path and self.timing_cache_path.is_file() else b"")

    def _fp32_layers(self, network, node_names=()) -> int:
        """Ask fp32 of the layers export/fp16.py keeps in fp32: normalisation, reductions, softmax,
        the unary Sqrt / Sin / Cos, the elementwise Pow, and the layers the ONNX parser made from the
        nodes `node_names` (the timestep path: named after its node, or the node's name + "_" + a
        suffix where one node became several layers). Returns how many."""
        trt = self.trt
        keep = {trt.LayerType.NORMALIZATION, trt.LayerType.REDUCE, trt.LayerType.SOFTMAX}
        unary = {trt.UnaryOperation.SQRT, trt.UnaryOperation.SIN, trt.UnaryOperation.COS}
        names = set(node_names)
        count = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            fp32 = layer.type in keep or layer.name in names or any(layer.name.startswith(n + "_") for n in names)
            if not fp32 and layer.type == trt.LayerType.UNARY:
                layer.__class__ = trt.IUnaryLayer  # the Python API's way to reach a layer's own fields
                fp32 = layer.op in unary
            elif not fp32 and layer.type == trt.LayerType.ELEMENTWISE:
                layer.__class__ = trt.IElementWiseLayer
                fp32 = layer.op == trt.ElementWiseOperation.POW
            if fp32:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                count += 1
        return count

    def _timing_cache(self, config):
        """The shared timing cache attached to `config`: the bytes read or built so far, or (where
        TensorRT refuses them: another GPU or version) a new empty one."""
        cache = config.create_timing_cache(self._cache_bytes)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        if self._cache_bytes:
            self.log("  the timing cache was made on another GPU or TensorRT version: starting a new one")
        self._cache_bytes = b""
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise UserError("TensorRT refused an empty timing cache")

    def build(self, onnx_path: Path, spec: NetworkSpec, plan_path: Path, fp16: bool = True) -> dict:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UserError(f"TensorRT could not parse {Path(onnx_path).name}: {errors}")
        config = builder.create_builder_config()
        if self.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        fp32_layers = 0
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
            fp32_layers = self._fp32_layers(network, _timestep_nodes(onnx_path))
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        profile = builder.create_optimization_profile()
        for name, (lo, mid, hi) in spec.profile().items():
            profile.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(profile)
        self._timing_cache(config)
        self.log(f"  building {Path(plan_path).name} (TensorRT {trt.__version__}, {self.gpu['gpu']})")
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise UserError(f"TensorRT failed to build {Path(plan_path).name} (see the messages above)")
        Path(plan_path).write_bytes(bytes(plan))  # (into the export's temporary bundle folder)
        cache = config.get_timing_cache()
        if cache is not None:
            self._cache_bytes = bytes(cache.serialize())
            if self.timing_cache_path:
                atomic_write_bytes(self._cache_bytes, self.timing_cache_path)
        return {"tensorrt_version": trt.__version__, **self.gpu, "fp16": fp16, "fp32_layers": fp32_layers,
                "profile": {n: [list(s) for s in shapes] for n, shapes in spec.profile().items()}}
