"""Offline graph optimisation of the exported fp32 graphs with onnxruntime's transformer optimizer.

What is applied is chosen per execution provider from a fixed table (PASSES), by what was
measured on that provider: a fusion whose fused op has no kernel on the provider, or that was
measured slower, is not in its row. Only the CPU provider can be run on this project's machines,
so only the CPU row is measured (benchmarks/bench_ort_opt.py); `--optimize auto` means "for the
CPU provider".

The passes (names are this project's; each maps to one onnxruntime.transformers fusion):
  layer_norm             decomposed LayerNorm -> LayerNormalization (opset-17 exports are
                         already native: usually nothing to do; kept because the attention
                         matcher starts from LayerNormalization nodes)
  skip_layer_norm        Add + LayerNormalization -> com.microsoft SkipLayerNormalization
  gelu                   Erf-based Gelu -> com.microsoft Gelu; CLIP's x*sigmoid(1.702x) -> QuickGelu
  self_attention         UNet self-attention -> com.microsoft MultiHeadAttention(q, k, v), Q/K/V
                         NOT packed: the CPU kernel refuses packed QKV ("not implemented for
                         CPU"), and unpacked float MHA takes MLAS's flash-attention path (no
                         S x S probability matrix in memory).
  cross_attention_split_kv
                         UNet cross-attention with SPLIT contexts (K from c_k, V from c_v) ->
                         MultiHeadAttention(q, k, v). onnxruntime's own UNet fusion requires K
                         and V to come from one input and never fuses these; this pass relaxes
                         exactly that check (FusionAttentionUnet subclass below).
Not applicable on CPU (no CPU kernel; onnxruntime's SD tooling uses them on CUDA): GroupNorm,
SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd, packed QKV / packed KV attention.

fp16 graphs are converted from the optimised fp32 graph (export/fp16.py). Its fixed fp32 block
list names LayerNormalization and Softmax, not the fused ops that contain them: fusing them
would silently move a LayerNorm (SkipLayerNormalization) or a softmax (MultiHeadAttention) into
fp16, so for fp16 bundles the table leaves out every pass that swallows a blocked op.

Memory (the issue: a naive optimize_model of an fp32 SD1.5 UNet was killed at 24 GB): the graph
is loaded WITHOUT its external weights (onnx.load(load_external_data=False)); the fusions read
the few initializers they look at lazily from the source data file (the working directory is
the source folder while they run); none of the passes above creates weights; the result is
written by streaming each tensor from the source data file into the destination's, one tensor
at a time. Peak RAM is the graph plus the largest tensor, not the model.

Measured (benchmarks/results/ort-opt-cpu.jsonl; 2-core AMD EPYC VM, onnxruntime 1.32, fp32, SD-1.5-
shaped random UNet, batch 2; "ab" = both graphs in one process, calls alternating):
  256 px   plain 934 ms, optimised 941 ms (ab: 948 / 943): neutral; peak RSS 3.62 -> 3.41 GiB
  512 px   ab p50 4289 -> 4247 ms, p80 5409 -> 4268 ms; peak RSS 7.71 -> 3.75 GiB (flash attention:
           no (N, heads, 4096, 4096) probability tensors)
  tiny     33.3 -> 25.1 ms (fewer, larger kernels dominate at toy sizes)
  the optimiser itself on the SD-1.5 UNet: 22 s, 0.44 GiB peak RSS (the export before it: 7.1 GiB)
So on CPU the passes are kept for memory and are neutral-to-faster in time.

Session-level optimisation (ORT_ENABLE_ALL: constant folding, onnxruntime's own fusions and, on
CPU, the NCHWc layout transforms) is left to the session that loads the bundle: a graph saved
after ORT_ENABLE_ALL is specific to the CPU it was made on (NCHWc block size follows the SIMD
width), so it does not belong in a portable bundle. SESSION_LEVEL records that choice. Measured
(same machine, SD-1.5 UNet, 256 px): ORT_ENABLE_ALL vs ORT_DISABLE_ALL 934 vs 1001 ms per call;
the ORT_ENABLE_ALL graph saved offline and reloaded with optimisation off runs as fast (927 ms)
and loads in 1.1 s instead of 5.0 s: worth a per-machine cache in the runtime, not a bundle file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from pm_runtime.specs import TEXT_ENCODER, UNET, VAE_DECODER

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider"}
ALL_PASSES = ("layer_norm", "skip_layer_norm", "gelu", "self_attention", "cross_attention_split_kv")
# Passes whose fused op contains an op of fp16.FP32_OPS (LayerNormalization, Softmax): not for fp16.
_SWALLOWS_FP32_OPS = {"skip_layer_norm", "self_attention", "cross_attention_split_kv"}

# provider -> network -> passes (fp32 graphs). Measured on CPU: benchmarks/results/ort-opt-cpu.jsonl.
PASSES: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {
        UNET: ("layer_norm", "skip_layer_norm", "gelu", "self_attention", "cross_attention_split_kv"),
        # No skip_layer_norm: c_k's final LayerNorm would become a SkipLayerNormalization and c_v's
        # (after the bypass Where) would not, and the two kernels round differently: C_v == C_k
        # EXACTLY where no concept token is (pm_runtime.modeling.text_encoder) would no longer hold.
        # CLIP attention: onnxruntime's CLIP matcher finds none in this export. The text encoder runs
        # once per image, so what it could gain is small anyway.
        TEXT_ENCODER: ("layer_norm", "gelu"),
        VAE_DECODER: (),  # GroupNorm (no CPU kernel) and the VAE attention matcher (finds none): nothing applies
    },
}
# Why a network has no pass in a row (recorded in the manifest).
NOTES = {
    ("cpu", VAE_DECODER): "GroupNorm/SkipGroupNorm/NhwcConv fusions have no CPU kernel; onnxruntime's VAE attention "
                          "matcher finds no match in this export",
}
SESSION_LEVEL = {"cpu": "ORT_ENABLE_ALL at load time (runtime session option), not baked into the file"}
# onnxruntime's transformer optimizer model type per network
_MODEL_TYPES = {UNET: "unet", TEXT_ENCODER: "clip", VAE_DECODER: "vae"}
_FUSED_OPS = ("MultiHeadAttention", "Attention", "SkipLayerNormalization", "LayerNormalization", "Gelu", "FastGelu",
              "QuickGelu", "BiasGelu", "GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd")
_ALIGN = 4096  # external tensors page-aligned: onnxruntime can map them instead of copying


def passes_for(network: str, provider: str = "cpu", precision: str = "fp32") -> tuple[str, ...]:
    if provider not in PASSES:
        raise ValueError(f"no optimisation table for provider {provider!r} (have: {', '.join(PASSES)})")
    passes = PASSES[provider].get(network, ())
    if precision == "fp16":
        passes = tuple(p for p in passes if p not in _SWALLOWS_FP32_OPS)
    return passes


@dataclass
class OptimizeResult:
    network: str
    provider: str
    passes: tuple[str, ...]
    files: list[Path]
    op_counts_before: dict[str, int]
    op_counts_after: dict[str, int]
    fused: dict[str, int] = field(default_factory=dict)  # fusion -> how many it made
    seconds: float = 0.0

    @property
    def nodes_before(self) -> int:
        return sum(self.op_counts_before.values())

    @property
    def nodes_after(self) -> int:
        return sum(self.op_counts_after.values())

    def changed_ops(self) -> dict[str, list[int]]:
        keys = sorted(set(self.op_counts_before) | set(self.op_counts_after))
        return {k: [self.op_counts_before.get(k, 0), self.op_counts_after.get(k, 0)] for k in keys
                if self.op_counts_before.get(k, 0) != self.op_counts_after.get(k, 0)}

    def to_dict(self) -> dict:
        """What bundle.json records (component details["graph_optimization"])."""
        import onnxruntime

        return {"tool": f"onnxruntime.transformers {onnxruntime.__version__}",
                "provider": PROVIDER_NAMES.get(self.provider, self.provider), "passes": list(self.passes),
                "fused": dict(self.fused), "nodes": [self.nodes_before, self.nodes_after],
                "op_counts_changed": self.changed_ops(), "session_level": SESSION_LEVEL.get(self.provider),
                "seconds": round(self.seconds, 2)}


def not_optimized(network: str, provider: str, precision: str, mode: str, ship_onnx: bool = True) -> dict:
    """The manifest record of a graph left as exported, and why."""
    if mode == "none":
        reason = "--optimize none"
    elif not ship_onnx:
        reason = "no ONNX graph ships (TensorRT plans are built from the plain graph)"
    else:
        reason = NOTES.get((provider, network), f"no pass of the {provider} table applies to {network} ({precision})")
    return {"provider": PROVIDER_NAMES.get(provider, provider), "passes": [], "fused": {}, "reason": reason,
            "session_level": SESSION_LEVEL.get(provider)}


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type ('domain:Op' outside the default domain)."""
    c = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in model.graph.node)
    return dict(sorted(c.items()))


def _ort_transformers():
    """onnxruntime.transformers' modules import each other by bare names (fusion_options, ...)."""
    import onnxruntime.transformers.optimizer  # noqa: F401  (puts its folder on sys.path)

    return {name: sys.modules[name] for name in
            ("fusion_options", "fusion_attention_unet", "onnx_model_unet", "onnx_model_clip", "onnx_model_vae")}


@contextlib.contextmanager
def _in_folder(folder: Path):
    """The fusions read external initializers relative to the working directory."""
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _quiet_ort():
    names = ("onnxruntime", "fusion_base", "onnx_model", "onnx_model_unet", "onnx_model_bert", "onnx_model_clip",
             "fusion_attention_unet", "fusion_skiplayernorm", "fusion_layernorm", "shape_infer_helper",
             "onnx_model_vae", "fusion_utils", "fusion_shape", "fusion_reshape")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _attention_fusion_class(mods):
    import numpy as np
    from onnx import helper

    base = mods["fusion_attention_unet"].FusionAttentionUnet

    class SplitKVMultiHeadAttention(base):
        """UNet attention -> MultiHeadAttention(q, k, v) with Q/K/V projections kept (unpacked).

        Self-attention: q, k, v projections of one normalised input. Cross-attention: K and V
        may come from DIFFERENT inputs (split contexts); only the query must be the block's own
        normalised hidden state. The SDPA scale (split as sqrt(scale) on q and on k by the
        exporter) is matched by the base class and equals MHA's default 1/sqrt(head_size)."""

        def __init__(self, model, cross: bool):
            super().__init__(model, 0, 0, is_cross_attention=cross, enable_packed_qkv=False, enable_packed_kv=False)
            self.made = 0

        def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
            # The base class does int() of a 1-element array: a TypeError since numpy 2.4, which
            # makes onnxruntime 1.32's own UNet fusion crash on every torch-2 export.
            value = None
            if is_torch2:
                parent = self.model.get_parent(reshape_q, 1)
                if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                    value = self.model.get_constant_value(parent.input[2])
            else:
                shape = self.model.get_constant_value(reshape_q.input[1])
                if isinstance(shape, np.ndarray) and shape.shape == (4,):
                    value = shape[2]
            if value is None:
                return 0
            value = np.asarray(value).reshape(-1)
            return int(value[0]) if value.size == 1 and value[0] > 0 else 0

        def create_attention_node(self, q_matmul, k_matmul, v_matmul, num_heads, hidden_size, input, output):
            if q_matmul.input[0] != input or num_heads <= 0:
                return None
            if hidden_size > 0 and hidden_size % num_heads:
                return None
            if self.is_cross_attention:
                if input in (k_matmul.input[0], v_matmul.input[0]):
                    return None
            elif not (k_matmul.input[0] == v_matmul.input[0] == input):
                return None
            node = helper.make_node("MultiHeadAttention", [q_matmul.output[0], k_matmul.output[0], v_matmul.output[0]],
                                    [output], name=self.model.create_node_name("MultiHeadAttention"),
                                    domain="com.microsoft", num_heads=int(num_heads))
            self.made += 1
            return node

    return SplitKVMultiHeadAttention


def _fuse(model: onnx.ModelProto, network: str, passes: tuple[str, ...]) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Run onnxruntime's optimizer class for `network` with only `passes` enabled. Returns (model, fused)."""
    mods = _ort_transformers()
    model_type = _MODEL_TYPES[network]
    options = mods["fusion_options"].FusionOptions(model_type)
    options.enable_layer_norm = "layer_norm" in passes
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = "skip_layer_norm" in passes
    options.enable_gelu = options.enable_bias_gelu = "gelu" in passes
    options.enable_gelu_approximation = False  # changes numerics
    options.enable_embed_layer_norm = False
    options.enable_qordered_matmul = False
    options.enable_rotary_embeddings = False
    for name in ("enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
                 "enable_packed_qkv", "enable_packed_kv", "enable_bias_add"):
        if hasattr(options, name):
            setattr(options, name, False)  # CUDA-only fused ops (no CPU kernel)
    attention = tuple(p for p in passes if p in ("self_attention", "cross_attention_split_kv"))
    options.enable_attention = bool(attention)
    made: dict[str, int] = {}

    if network == UNET:
        fusion_cls = _attention_fusion_class(mods)

        class Unet(mods["onnx_model_unet"].UnetOnnxModel):
            def fuse_multi_head_attention(self, options=None):
                for cross, name in ((False, "self_attention"), (True, "cross_attention_split_kv")):
                    if name in attention:
                        fusion = fusion_cls(self, cross)
                        fusion.apply()
                        made[name] = fusion.made

        opt = Unet(model)
        opt._optimize(options, None) if hasattr(opt, "_optimize") else opt.optimize(options)  # no tqdm bar
    elif network == TEXT_ENCODER:
        opt = mods["onnx_model_clip"].ClipOnnxModel(model)
        opt.optimize(options)
    else:
        opt = mods["onnx_model_vae"].VaeOnnxModel(model)
        opt._optimize(options, None) if hasattr(opt, "_optimize") else opt.optimize(options)
    opt.topological_sort()
    return opt.model, made


def fused_counts(before: dict[str, int], after: dict[str, int], made: dict[str, int] | None = None) -> dict[str, int]:
    """New fused-op nodes by type (after minus before), plus the attention fusions by kind."""
    out = dict(made or {})
    for op in _FUSED_OPS:
        key = f"com.microsoft:{op}" if op != "LayerNormalization" else op
        n = after.get(key, 0) - before.get(key, 0)
        if n > 0:
            out[op] = n
    return out


def _initializers(model: onnx.ModelProto):
    yield from model.graph.initializer  # the exported graphs have no subgraphs


def _external_files(model: onnx.ModelProto, base: Path) -> set[Path]:
    return {(base / ExternalDataInfo(t).location).resolve() for t in _initializers(model) if uses_external_data(t)}


def _save_streaming(model: onnx.ModelProto, src_dir: Path, dst: Path) -> list[Path]:
    """Write `model` (initializers external in `src_dir`'s files, or inline) as dst + dst.data,
    copying one tensor at a time: never holds the weights in memory."""
    data = dst.with_name(dst.name + ".data")
    if data.resolve() in _external_files(model, src_dir):
        raise ValueError(f"{dst} would overwrite its own source weights {data}")
    data.unlink(missing_ok=True)
    sources: dict[str, object] = {}
    try:
        with open(data, "wb") as out:
            for t in _initializers(model):
                if uses_external_data(t):
                    info = ExternalDataInfo(t)
                    f = sources.get(info.location)
                    if f is None:
                        f = sources[info.location] = open(src_dir / info.location, "rb")
                    f.seek(info.offset or 0)
                    raw = f.read(info.length) if info.length else f.read()
                elif t.HasField("raw_data") and len(t.raw_data) >= 1024:
                    raw = t.raw_data
                else:
                    continue
                pad = (-out.tell()) % _ALIGN
                out.write(b"\0" * pad)
                offset = out.tell()
                out.write(raw)
                t.ClearField("raw_data")
                del t.external_data[:]
                for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                t.data_location = onnx.TensorProto.EXTERNAL
                del raw
    finally:
        for f in sources.values():
            f.close()
    onnx.save_model(model, str(dst))
    return [dst, data]


def optimize_graph(src: Path, dst: Path, network: str, *, provider: str = "cpu", precision: str = "fp32",
                   external_data: str = "auto", passes: tuple[str, ...] | None = None) -> OptimizeResult:
    """Optimise the ONNX file `src` for `provider` into `dst` (+ `dst.data` when src has external data
    or external_data == "always"). `src` is not modified; dst must be another path. `passes`
    overrides the table (() = copy the graph as it is, with the same memory-safe writer)."""
    from .onnx_export import save_onnx

    src, dst = Path(src).absolute(), Path(dst).absolute()
    if src == dst:
        raise ValueError("optimize_graph writes a new file: dst must differ from src")
    t0 = time.perf_counter()
    passes = passes_for(network, provider, precision) if passes is None else tuple(passes)
    unknown = set(passes) - set(ALL_PASSES)
    if unknown:
        raise ValueError(f"unknown optimisation passes {sorted(unknown)}")
    model = onnx.load(str(src), load_external_data=False)  # graph + inline tensors; external weights stay on disk
    external = any(uses_external_data(t) for t in _initializers(model))
    before = op_counts(model)
    made: dict[str, int] = {}
    if passes:
        with _in_folder(src.parent), _quiet_ort():
            model, made = _fuse(model, network, passes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # the fused contrib ops
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                            "pm_export.graph_optimization": f"{provider}: {', '.join(passes)}"})
    after = op_counts(model)
    if external:
        files = _save_streaming(model, src.parent, dst)
    else:
        files = save_onnx(model, dst, external_data)
    return OptimizeResult(network, provider, passes, files, before, after, fused_counts(before, after, made),
                          time.perf_counter() - t0)
