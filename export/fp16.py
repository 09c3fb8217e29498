"""fp16 ONNX graphs with a fixed list of overflow-prone ops kept in fp32 (DESIGN §4).

Conversion: onnxruntime.transformers.float16.convert_float_to_float16 (the tool onnxruntime's
own Stable Diffusion scripts use), keep_io_types=True so graph inputs/outputs stay float32 and
the specs do not change with precision. The block list is FIXED, the same for every model (random
weights cannot reveal real overflow sites, so it is chosen by what each op computes):

  onnxruntime's DEFAULT_OP_BLOCK_LIST   ops without fp16 kernels or with index/range semantics
                                        (Range, CumSum, Min, Max, TopK, Upsample, ...)
  LayerNormalization                    variance of the residual stream: any value above ~256
                                        squares past fp16's 65504 (onnxruntime's SD engine
                                        builder documents exactly this use of its fp32 list)
  InstanceNormalization,                GroupNorm as exported at opset 17 (InstanceNorm on a
  GroupNormalization                    reshape); opset-18 GroupNormalization if present
  ReduceMean, ReduceSum, ReduceSumSquare, Reductions and squares: the equilibrium text encoder's
  ReduceL2, Pow, Sqrt                   |h| and normalize(h + B) square values whose sum
                                        exceeds 65504 in fp16
  Softmax                               attention probabilities (cross- and self-attention):
                                        a sum over up to 16k keys
  Sin, Cos + every node on the path     the sinusoidal timestep embedding: t up to 1000 times a
  from the `timestep` input to the      frequency needs fp32 (fp16 spacing at 1000 is 0.5, and a
  first MatMul/Gemm (node block list)   fractional Euler t would be rounded); diffusers computes
                                        it in fp32 as well

Everything else (Conv, MatMul/Gemm, Add, Mul, activations) runs in fp16. Cast nodes at the block
boundaries are inserted by the converter. onnxruntime's CPU provider runs most fp16 ops by
casting to fp32, so CPU validation shows conversion errors (weight rounding), not GPU overflow:
overflow with real weights stays unverified until someone runs real weights (DESIGN §4).
"""

from __future__ import annotations

from pathlib import Path

import onnx

FP32_OPS = (
    "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Pow", "Sqrt",
    "Softmax", "Sin", "Cos",
)
TIMESTEP_INPUT = "timestep"
_STOP_OPS = {"MatMul", "Gemm", "Conv"}  # the timestep path ends at the first learned layer


def op_block_list() -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))


def timestep_path(model: onnx.ModelProto, input_name: str = TIMESTEP_INPUT) -> list[str]:
    """Names of the nodes downstream of `input_name` up to (not including) the first MatMul/Gemm/Conv."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen: dict[str, onnx.NodeProto] = {}
    frontier = [input_name] if any(i.name == input_name for i in model.graph.input) else []
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.op_type in _STOP_OPS or node.name in seen:
                continue
            seen[node.name] = node
            frontier.extend(node.output)
    # Constant nodes feeding the path (the frequencies) must stay fp32 with it: without shape
    # inference (graphs > 2 GB) the converter would otherwise give them fp16 outputs.
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in list(seen.values()):
        for name in node.input:
            src = producers.get(name)
            if src is not None and src.op_type == "Constant":
                seen.setdefault(src.name, src)
    return list(seen)


def to_fp16(path: Path) -> tuple[onnx.ModelProto, list[str]]:
    """fp32 ONNX file -> (mixed fp16 graph with float32 IO, names of the nodes kept fp32 by name).

    The converter needs every tensor's type (value_info) to place Casts at the block boundaries.
    Its own shape inference serialises the whole model and fails above protobuf's 2 GB, so shapes
    are inferred here on the graph alone (external weights not loaded yet), then weights loaded.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    onnx.load_external_data_for_model(model, str(path.parent))
    nodes = timestep_path(model)
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=op_block_list(),
                                    node_block_list=nodes, disable_shape_infer=True)
    return half, nodes


def block_list_description() -> list[str]:
    """What the manifest records: our op types plus a reference to onnxruntime's default list."""
    return [*FP32_OPS, "onnxruntime.transformers.float16.DEFAULT_OP_BLOCK_LIST", f"timestep path from {TIMESTEP_INPUT!r}"]


def fp32_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each blocked op type the graph holds (recorded in the manifest)."""
    blocked = set(op_block_list())
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in blocked:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
