"""int8 UNet and VAE decoder graphs for onnxruntime's CPU provider (pm-export --int8, --int8-vae).

    facts = quantize_unet_int8(Path("bundle/unet.onnx"), Path("out/unet.onnx"), mode="dynamic-matmul")
    facts = quantize_vae_int8(Path("bundle/vae_decoder.onnx"), Path("out/vae_decoder.onnx"), calibration=latents)

quantize_vae_int8 is static-qdq-conv on the decoder (below), calibrated on finished latents of fp32
runs (record_calibration(..., vae_feeds=...)), its first and last convolutions in fp32 (VAE_KEEP_FP32).

The result has the same inputs and outputs as the fp32 graph (float32 IO), so the runtime loads
it like any unet.onnx: no session option is needed (onnxruntime's default graph optimisation
fuses the quantize/MatMulInteger/scale chains into DynamicQuantizeMatMul).

Modes (what each writes; which one pays on a given CPU is measured by benchmarks/bench_int8.py):
  dynamic-matmul      onnxruntime.quantization.quantize_dynamic on MatMul nodes with a constant
                      weight: int8 weights (per output column with per_channel=True), uint8
                      activations quantized at run time (DynamicQuantizeLinear) -> MatMulInteger,
                      fused to com.microsoft DynamicQuantizeMatMul by the session.
  dynamic-matmul-conv the same on MatMul and Conv (Conv -> ConvInteger).
  nbits8              MatMul with a constant weight -> com.microsoft MatMulNBits, 8 bits, blocks
                      of `block_size` along K, accuracy_level 4 (activations quantized to int8
                      per block at run time, int8 dot products).
  nbits8-fp32         the same with accuracy_level 0: the weight is dequantised inside the
                      kernel, compute stays fp32 (memory, not speed).
  weight-only-qdq     every Conv and MatMul weight stored as int8 (symmetric, per output channel)
                      behind a standard DequantizeLinear: the file is ~4x smaller, compute stays
                      fp32 (onnxruntime keeps DequantizeLinear unfolded, so it runs every call).
  static-qdq          onnxruntime.quantization.quantize_static, QDQ format, Conv and MatMul:
                      int8 weights (per channel with per_channel=True), uint8 activations with
                      FIXED ranges (min..max, or a percentile with calibrate="percentile", over
                      `calibration`, a list of UNet feeds recorded from fp32 denoising steps);
                      the session fuses DQ -> Conv -> Q into QLinearConv (and QLinearMatMul).
  static-qdq-conv     the same on Conv only.
                      Both leave `keep_fp32` (default STATIC_KEEP_FP32) in fp32.

Weights are quantized to 7 bits (onnxruntime's reduce_range, default on since pm-export 0.5) in the
uint8 x int8 modes (dynamic-*, static-*): onnxruntime's x86 kernels for CPUs without AVX-512 VNNI / AVX-VNNI
multiply uint8 by int8 pairwise into int16 (vpmaddubsw), which saturates on full 8-bit weights, and a
bundle is run on other CPUs than the one that exported it. On a 2-core AMD EPYC with AVX2 only (no
VNNI), tiny UNet, relative L2 error against fp32: dynamic-matmul 0.060 -> 0.0068, static-qdq 0.153 ->
0.040 with 7-bit weights; the VAE decoder's int8 image (its test's held-out latent) 25.5 -> 42.8 dB. The rows
below were measured with 8-bit weights on a VNNI CPU (not re-measured with 7).

Quantize AFTER export/optimize.py's fp32 pass, never before: the attention fusion
(MultiHeadAttention) matches MatMul nodes and finds none in an already-quantized graph (tiny model,
dynamic-matmul: optimise -> quantize keeps 14/14 MultiHeadAttention; quantize -> optimise fuses 0).

Measured (benchmarks/results/int8-cpu.jsonl, benchmarks/bench_int8.py; 2-core AMD EPYC with
AVX-512 VNNI, onnxruntime 1.32, SD-1.5-shaped random UNet, 256 px, batch 2; speed from the A/B
child, fp32 and int8 sessions alternating, other processes idle; drift: decoded uint8 image after
10 DPM-Solver++ steps vs the fp32 UNet):
  variant                       fp32 -> int8 ms   speed   peak RSS GiB   file GB   image PSNR
  static-qdq calibrate=pct      977 -> 496       1.97x   3.42 -> 1.22   1.02      37.9 dB (max 19/255)
  static-qdq (minmax)           1023 -> 525      1.95x   3.42 -> 1.22   1.02      35.4 dB (max 24)
  static-qdq-conv               999 -> 636       1.57x   3.42 -> 1.82   1.74      36.0 dB (max 22)
  dynamic-matmul per_channel    965 -> 748       1.29x   3.42 -> 2.67   2.63      51.5 dB (max 3)
  dynamic-matmul                1019 -> 820      1.24x   3.42 -> 2.67   2.63      51.5 dB (max 3)
  nbits8 (block 64)             992 -> 931       1.07x   3.42 -> 2.78   2.73      55.0 dB (max 2)
  weight-only-qdq               982 -> 1088      0.90x   3.42 -> 1.66   0.95      54.1 dB (max 2)
  dynamic-matmul-conv           980 -> 2752      0.36x   3.42 -> 1.01   0.86      42.7 dB (max 10)
  nbits8-fp32                   slower than fp32 (0.73x, measured under load)
(These rows predate the typing of the fused ops' outputs (_type_contrib_outputs): static-qdq then left
64 MatMuls with fp32 activations. Since then, on a 2-core Xeon without bfloat16 units, same A/B:
static-qdq calibrate=pct 1414 -> 680 ms, 2.08x, 1.16 GiB, 37.5 dB (max 21); the older graph ran at 1.52x
there.)
Quantizer peak RSS on that UNet: dynamic/static ~10-15 GiB (onnxruntime loads the whole model and
copies it), nbits8 3.7 GiB, weight-only-qdq 4.8 GiB; 10-70 s. pm-export --int8 static-qdq
(per-channel, percentile, 10 feeds calibrated in windows of CALIBRATION_STRIDE): whole export
peak 19.6 GB in one call, 15.5 GB with windows of 2 (/usr/bin/time, pm-bench --prepare-only), 12.4 GB
(11.55 GiB VmHWM, bench_export.py --int8 static-qdq) once the PyTorch UNet for the validation is
loaded after the quantization and the fp32 export's freed heap is returned first.
End to end (pm-bench CPU run, benchmarks/results/run-cpu.jsonl): 3.2-3.9x diffusers' speed at
0.22-0.44x its memory, image 38.2-38.3 dB from the fp32 bundle's. Drift is of a RANDOM-weight model:
a trained SD-1.5 UNet's activation ranges differ, so the static modes' drift must be re-measured
on real weights before they are offered as more than an opt-in.

Writing is atomic: the graph (and `<dst>.data` when the weights are external) is written into a
temporary folder beside `dst`, then renamed into place, the data file first and the graph last;
a failure removes the temporary folder and leaves no `dst`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from pm_runtime.errors import UserError

MODES = ("dynamic-matmul", "dynamic-matmul-conv", "nbits8", "nbits8-fp32", "weight-only-qdq", "static-qdq",
         "static-qdq-conv")
CALIBRATED = ("static-qdq", "static-qdq-conv")  # need `calibration`: UNet feeds from fp32 denoising steps
# Conv nodes the static modes leave in fp32 (by module name in the exported node name): the UNet's
# first and last conv and the resnets' 1x1 shortcut convs (the residual path). Measured on the tiny
# model (relative L2 of one UNet call, static Conv int8): all quantized 0.078; conv_in/conv_out
# fp32 0.067; shortcuts fp32 0.056; both 0.023. They are ~2% of the UNet's conv FLOPs.
STATIC_KEEP_FP32 = ("conv_in", "conv_out", "conv_shortcut")
# calibrate="percentile": activation ranges cover this percentile of |values| instead of min..max.
# SD-1.5-shaped UNet, static Conv int8, mean relative L2 over 10 steps of another trajectory: MinMax
# 0.018, percentile 99.99 0.0147 (same speed).
PERCENTILE = 99.99
# Feeds per calibrator call (activation ranges / histograms are merged across calls): bounds the
# calibration's memory. The histogram merge keeps the first window's bin width, so windows of a few
# feeds give slightly different percentile ranges than one call over all feeds.
CALIBRATION_STRIDE = 2
CALIBRATE = ("minmax", "percentile")
DEFAULT_MODE = "dynamic-matmul"
UNET_INPUTS = ("sample", "timestep", "c_k", "c_v")
UNET_OUTPUTS = ("noise_pred",)
VAE_INPUTS = ("latent",)
VAE_OUTPUTS = ("image",)
# The VAE decoder (quantize_vae_int8): static-qdq-conv with these convolutions left in fp32 (the
# decoder's first and last: conv_out writes the pixels). SD-1.5-shaped random decoder, 256 px, 2-core
# Xeon (AVX-512 VNNI), one-off A/B (not a record): decode 2.04 -> 0.86 s, image 41.8-42.7 dB on held-out
# latents from fp32 runs, 42-43 dB with conv_in/conv_out quantized too (same speed); MatMul (the mid
# block's attention) quantized as well: no faster. Two calibration latents gave the same drift as four.
VAE_KEEP_FP32 = ("conv_in", "conv_out")
_QUANT_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits",
              "DequantizeLinear", "QuantizeLinear")


def _op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _const_weight_nodes(model: onnx.ModelProto, op_types: tuple[str, ...]) -> list[onnx.NodeProto]:
    """Nodes of `op_types` whose weight (input 1) is a float32 initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in op_types and len(n.input) > 1
            and n.input[1] in inits and inits[n.input[1]].data_type == TensorProto.FLOAT]


def _files_size(files) -> int:
    return sum(Path(f).stat().st_size for f in files if Path(f).is_file())


def _check_source(src: Path, mode: str, io: tuple[tuple[str, ...], tuple[str, ...]] = (UNET_INPUTS, UNET_OUTPUTS),
                  what: str = "UNet") -> onnx.ModelProto:
    if mode not in MODES:
        raise UserError(f"unknown int8 mode {mode!r}; choose one of {', '.join(MODES)}")
    if not src.is_file():
        raise UserError(f"{src} does not exist")
    try:
        graph = onnx.load(str(src), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"{src} is not an ONNX graph ({type(e).__name__})") from None
    ins = [i.name for i in graph.graph.input]
    outs = [o.name for o in graph.graph.output]
    if (tuple(ins), tuple(outs)) != io:
        raise UserError(f"{src.name} is not a {what} graph (inputs {ins}, outputs {outs}; expected "
                        f"{list(io[0])} -> {list(io[1])})")
    ops = {"static-qdq-conv": ("Conv",), "dynamic-matmul": ("MatMul",), "nbits8": ("MatMul",),
           "nbits8-fp32": ("MatMul",)}.get(mode, ("MatMul", "Conv"))
    if not _const_weight_nodes(graph, ops):
        raise UserError(f"{src.name} has no {' or '.join(ops)} node with a float32 constant weight: "
                        f"nothing to quantize (is it already quantized, or fp16?)")
    if any(o.op_type in ("MatMulInteger", "ConvInteger", "MatMulNBits", "DynamicQuantizeLinear")
           for o in graph.graph.node):
        raise UserError(f"{src.name} is already quantized")
    return graph


# ------------------------------------------------------------------ the modes
def _dynamic(src: Path, out: Path, external: bool, op_types: list[str], per_channel: bool,
             reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), op_types_to_quantize=op_types, per_channel=per_channel,
                     reduce_range=reduce_range, weight_type=QuantType.QInt8, use_external_data_format=external,
                     extra_options={"MatMulConstBOnly": True,
                                    "DefaultTensorType": onnx.TensorProto.FLOAT})  # contrib ops defeat shape inference


def _nbits(src: Path, out: Path, external: bool, accuracy_level: int, block_size: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))  # weights included (the quantizer reads them)
    q = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                             op_types_to_quantize=("MatMul",))
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=external)


def _weight_only_qdq(src: Path, out: Path, external: bool) -> None:
    """Conv (axis 0) and MatMul (axis 1) float weights -> int8 + per-channel scale -> DequantizeLinear."""
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    targets = _const_weight_nodes(model, ("Conv", "MatMul"))
    done: dict[str, str] = {}
    new_inits, dq_nodes = [], []
    for node in targets:
        name = node.input[1]
        if name in done:
            node.input[1] = done[name]
            continue
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        if node.op_type == "MatMul" and w.ndim != 2:
            continue
        axis = 0 if node.op_type == "Conv" else 1
        red = tuple(d for d in range(w.ndim) if d != axis)
        amax = np.abs(w).max(axis=red)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        qn, sn, zn, dn = f"{name}_int8", f"{name}_scale", f"{name}_zero", f"{name}_dq"
        new_inits += [numpy_helper.from_array(q, qn), numpy_helper.from_array(scale, sn),
                      numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), zn)]
        dq_nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [dn], name=f"{name}_DequantizeLinear",
                                         axis=axis))
        done[name] = dn
        node.input[1] = dn
    used = {i for n in model.graph.node for i in n.input}
    for name in done:
        if name not in used:
            model.graph.initializer.remove(inits[name])
    model.graph.initializer.extend(new_inits)
    nodes = list(dq_nodes) + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _save(model, out, external)


def _save(model: onnx.ModelProto, out: Path, external: bool) -> None:
    if external:
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(out))


def _static(src: Path, out: Path, external: bool, op_types: list[str], per_channel: bool, reduce_range: bool,
            calibration, keep_fp32: tuple[str, ...], calibrate: str) -> list[str]:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Feeds(CalibrationDataReader):
        """The feeds in windows of CALIBRATION_STRIDE (onnxruntime's CalibStridedMinMax option calls
        the calibrator once per window; the histogram calibrator otherwise keeps every feed's
        intermediate tensors at once: ~0.8 GiB per feed of the SD-1.5-shaped UNet at 256 px)."""

        def __init__(self, feeds):
            self.all = list(feeds)
            self.it = iter(self.all)

        def __len__(self):
            return len(self.all)

        def set_range(self, start_index: int, end_index: int):
            self.it = iter(self.all[start_index:end_index])

        def get_next(self):
            return next(self.it, None)

    graph = onnx.load(str(src), load_external_data=False)
    exclude = [n.name for n in graph.graph.node if n.op_type in op_types and n.name
               and any(f"/{k}/" in n.name for k in keep_fp32)]
    typed = None
    if _type_contrib_outputs(graph):
        # the typed graph beside the source, so that its external weights' relative paths resolve (onnxruntime
        # writes its own "-inferred" copy there too); removed below
        typed = src.with_name(f".{src.stem}.typed-{os.getpid()}.onnx")
        onnx.save_model(graph, str(typed))
    del graph
    method = CalibrationMethod.Percentile if calibrate == "percentile" else CalibrationMethod.MinMax
    n = len(calibration)
    stride = next((k for k in range(min(CALIBRATION_STRIDE, n), 0, -1) if n % k == 0), 0)  # must divide n
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrator print()s its progress
            quantize_static(str(typed or src), str(out), Feeds(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=op_types, per_channel=per_channel, reduce_range=reduce_range,
                            nodes_to_exclude=exclude,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            use_external_data_format=external,
                            calibrate_method=method,
                            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT,
                                           "CalibPercentile": PERCENTILE,
                                           **({"CalibStridedMinMax": stride} if stride else {})})
    finally:
        if typed is not None:
            typed.unlink(missing_ok=True)
    return exclude


class _Recorder:
    """A network that keeps a copy of every feed."""

    def __init__(self, net, feeds: list):
        self.net, self.feeds = net, feeds

    def run(self, inputs):
        self.feeds.append({k: np.array(v, copy=True) for k, v in inputs.items()})
        return self.net.run(inputs)


CALIBRATION_PROMPTS = ("a portrait photo of a person in a park", "a close-up photo of a face, studio light")


def record_calibration(bundle_dir: Path, *, prompts=CALIBRATION_PROMPTS, steps: int = 10, resolution: int = 256,
                       seed: int = 1, unet: Path | None = None, vae_feeds: list | None = None,
                       callback=None) -> list[dict]:
    """UNet feeds for the static modes: one fp32 image per prompt through the bundle's own
    pipeline (onnxruntime, CPU; `unet` overrides the bundle's UNet file), every UNet call's
    inputs recorded: len(prompts) * steps feeds of batch 2 (guidance). Needs a complete bundle
    (bundle.json): quantize after the fp32 export, e.g. into the finished bundle. `vae_feeds`: a list
    that receives the VAE decoder's feeds too ({latent}: one per prompt, the finished latents).
    `callback(done, total)` after every UNet step of all the prompts (a progress bar)."""
    from pm_runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtNetwork
    from pm_runtime.bundle import open_bundle
    from pm_runtime.pipeline import Pipeline
    from pm_runtime.specs import UNET, VAE_DECODER

    feeds: list[dict] = []

    class Recording(OnnxRuntimeBackend):
        def _load(self, network):
            if network == VAE_DECODER and vae_feeds is not None:
                return _Recorder(super()._load(network), vae_feeds)
            if network != UNET or unet is None:
                return super()._load(network)
            sess = self._session(Path(unet), self.session_options())
            return OrtNetwork(sess, [o.name for o in sess.get_outputs()])

        def denoise(self, net, job):
            return super().denoise(_Recorder(net, feeds), job)

    bundle = open_bundle(Path(bundle_dir), verify=False)
    pipe = Pipeline(bundle, Recording(bundle), safety_checker=False)
    try:
        for i, prompt in enumerate(prompts):
            step = None if callback is None else (lambda k, n, i=i: callback(i * n + k, len(prompts) * n))
            pipe.generate(prompt, seed=seed + i, height=resolution, width=resolution, steps=steps, guidance=8.0,
                          allow_no_concept=True, callback=step)
    finally:
        pipe.close()
    return feeds


def _dq_fed(model: onnx.ModelProto, op_types: tuple[str, ...], weight_only: bool = False) -> int:
    """Nodes of op_types whose weight comes from a DequantizeLinear (QDQ formats); weight_only: of those, the
    ones whose activation (input 0) does not: in a static QDQ graph these run with fp32 activations
    (onnxruntime turns such a MatMul into a weight-only MatMulNBits)."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type in op_types and len(n.input) > 1 and n.input[1] in dq
               and not (weight_only and n.input[0] in dq))


# onnxruntime contrib ops of the optimised fp32 UNet whose outputs have the type of their inputs (float32)
# but which ONNX's shape inference cannot type (it does not know com.microsoft ops)
_FLOAT_CONTRIB_OPS = ("MultiHeadAttention", "SkipLayerNormalization", "Gelu", "BiasGelu", "FastGelu", "QuickGelu",
                      "SkipSimplifiedLayerNormalization")


def _type_contrib_outputs(model: onnx.ModelProto) -> int:
    """Give the untyped outputs of _FLOAT_CONTRIB_OPS nodes a float32 value_info (no shape); how many.

    quantize_static quantizes a tensor only where shape inference typed it ("failed to infer the type of
    tensor ... Skip to quantize it"): without this the activations that come out of the fused attention
    and SkipLayerNormalization nodes (and what reads them) stay fp32 — on the SD-1.5-shaped UNet 64 of its
    160 MatMuls (attention outputs, cross-attention queries, the feed-forward's first projection), which
    onnxruntime then runs as weight-only MatMulNBits: 36% of an int8 step on a 2-core Xeon (one-off
    onnxruntime profile)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    typed = {v.name for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    added = 0
    for n in model.graph.node:
        if n.domain == "com.microsoft" and n.op_type in _FLOAT_CONTRIB_OPS:
            for o in n.output:
                if o and o not in typed:
                    model.graph.value_info.append(onnx.helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
                    typed.add(o)
                    added += 1
    return added


# ------------------------------------------------------------------ entry point
def quantize_unet_int8(src_onnx: Path, dst_onnx: Path, *, mode: str = DEFAULT_MODE, per_channel: bool = False,
                       reduce_range: bool = True, block_size: int = 64, external_data: str = "auto",
                       calibration=None, keep_fp32: tuple[str, ...] = STATIC_KEEP_FP32, calibrate: str = "minmax",
                       log: Callable[[str], None] | None = None) -> dict:
    """Write an int8 version of the fp32 UNet graph `src_onnx` to `dst_onnx` (+ `dst_onnx.data`).

    `src_onnx` is not modified; `dst_onnx` must be another path. external_data: "auto" (external
    when the source's weights are), "always" or "never". Returns facts for the manifest:
    mode, options, quantized node count, op counts changed, sizes before/after (bytes), seconds.
    `calibration` (static-qdq modes only): a sequence of UNet feeds {sample, timestep, c_k, c_v}
    (numpy float32), e.g. record_calibration(bundle) (fp32 denoising steps of a few prompts); `keep_fp32`: module names
    whose nodes the static modes leave in fp32; `calibrate`: minmax | percentile (activation ranges).
    Raises UserError for a graph that is not a float UNet with something to quantize."""
    return _quantize(src_onnx, dst_onnx, (UNET_INPUTS, UNET_OUTPUTS), "UNet", mode=mode, per_channel=per_channel,
                     reduce_range=reduce_range, block_size=block_size, external_data=external_data,
                     calibration=calibration, keep_fp32=keep_fp32, calibrate=calibrate, log=log)


def quantize_vae_int8(src_onnx: Path, dst_onnx: Path, *, calibration, external_data: str = "auto",
                      keep_fp32: tuple[str, ...] = VAE_KEEP_FP32, calibrate: str = "percentile",
                      log: Callable[[str], None] | None = None) -> dict:
    """Write an int8 version of the fp32 VAE decoder graph `src_onnx` to `dst_onnx`: static-qdq-conv
    (int8 convolutions with per-output-channel weights and fixed activation ranges), `keep_fp32`
    left in fp32. `calibration`: decoder feeds {latent} (numpy float32), e.g. the final latents of
    fp32 runs (record_calibration(..., vae_feeds=...)). Same contract and facts as quantize_unet_int8."""
    return _quantize(src_onnx, dst_onnx, (VAE_INPUTS, VAE_OUTPUTS), "VAE decoder", mode="static-qdq-conv",
                     per_channel=True, reduce_range=True, block_size=64, external_data=external_data,
                     calibration=calibration, keep_fp32=keep_fp32, calibrate=calibrate, log=log)


def _quantize(src_onnx: Path, dst_onnx: Path, io: tuple[tuple[str, ...], tuple[str, ...]], what: str, *, mode: str,
              per_channel: bool, reduce_range: bool, block_size: int, external_data: str, calibration,
              keep_fp32: tuple[str, ...], calibrate: str, log: Callable[[str], None] | None) -> dict:
    src, dst = Path(src_onnx).absolute(), Path(dst_onnx).absolute()
    if src == dst:
        raise UserError(f"int8 quantization writes a new file: dst must differ from src ({src.name})")
    if external_data not in ("auto", "always", "never"):
        raise UserError("external_data must be auto, always or never")
    t0 = time.perf_counter()
    graph = _check_source(src, mode, io, what)
    if calibrate not in CALIBRATE:
        raise UserError(f"calibrate must be one of {', '.join(CALIBRATE)}")
    if mode in CALIBRATED:
        calibration = list(calibration or [])
        if not calibration:
            raise UserError(f"int8 mode {mode} needs calibration feeds ({what} inputs from fp32 runs)")
    elif calibration is not None:
        raise UserError(f"int8 mode {mode} takes no calibration feeds")
    src_external = any(uses_external_data(t) for t in graph.graph.initializer)
    external = external_data == "always" or (external_data == "auto" and src_external)
    src_files = [src, *({src.parent / e.value for t in graph.graph.initializer if uses_external_data(t)
                         for e in t.external_data if e.key == "location"})]
    before = _op_counts(graph)
    del graph
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        out = tmp / dst.name
        quiet = logging.getLogger("root").level
        logging.getLogger().setLevel(max(quiet, logging.ERROR))  # the quantizers log every node at INFO
        try:
            if mode == "dynamic-matmul":
                _dynamic(src, out, external, ["MatMul"], per_channel, reduce_range)
            elif mode == "dynamic-matmul-conv":
                _dynamic(src, out, external, ["MatMul", "Conv"], per_channel, reduce_range)
            elif mode in CALIBRATED:
                kept = _static(src, out, external, ["Conv", "MatMul"] if mode == "static-qdq" else ["Conv"],
                               per_channel, reduce_range, calibration, tuple(keep_fp32), calibrate)
            elif mode in ("nbits8", "nbits8-fp32"):
                _nbits(src, out, external, 4 if mode == "nbits8" else 0, block_size)
            else:
                _weight_only_qdq(src, out, external)
        finally:
            logging.getLogger().setLevel(quiet)
        result = onnx.load(str(out), load_external_data=False)
        after = _op_counts(result)
        ins = [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in result.graph.input]
        outs = [o.name for o in result.graph.output]
        if (tuple(n for n, _ in ins), tuple(outs)) != io:
            raise RuntimeError(f"quantization changed the graph's IO: {ins} -> {outs}")
        written = [p for p in (out, tmp / (dst.name + ".data")) if p.is_file()]
        if mode == "weight-only-qdq" or mode in CALIBRATED:  # QDQ: the float ops stay, fed by DequantizeLinear
            quantized = _dq_fed(result, ("Conv", "MatMul", "Gemm"))
        else:
            quantized = sum(after.get(op, 0) - before.get(op, 0) for op in ("MatMulInteger", "ConvInteger",
                                                                             "MatMulNBits"))
        # int8 weights but fp32 activations (calibration found no range for them): should be 0
        weight_only = _dq_fed(result, ("Conv", "MatMul", "Gemm"), weight_only=True) if mode in CALIBRATED else None
        del result
        facts = {
            "mode": mode, "per_channel": per_channel, "reduce_range": reduce_range,
            "block_size": block_size if mode.startswith("nbits") else None,
            "external_data": external, "quantized_nodes": quantized,
            **({"kept_fp32": list(keep_fp32), "kept_fp32_nodes": len(kept), "calibrate": calibrate,
                "calibration_feeds": len(calibration), "weight_only_nodes": weight_only}
               if mode in CALIBRATED else {}),
            "op_counts_changed": {k: [before.get(k, 0), after.get(k, 0)]
                                  for k in sorted(set(before) | set(after))
                                  if before.get(k, 0) != after.get(k, 0)},
            "bytes_before": _files_size(src_files), "bytes_after": _files_size(written),
            "files": [dst.name, *([dst.name + ".data"] if len(written) > 1 else [])],
        }
        import onnxruntime

        facts["tool"] = f"onnxruntime.quantization {onnxruntime.__version__}"
        if quantized == 0:
            raise UserError(f"{src.name}: onnxruntime quantized no node in mode {mode}")
        # Into place: data first, graph last (a dst graph only ever points at complete data).
        stale = dst.with_name(dst.name + ".data")
        if len(written) == 1 and stale.exists():
            stale.unlink()  # an older external-data result beside an inline one
        for p in reversed(written):
            os.replace(p, dst.parent / p.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    facts["seconds"] = round(time.perf_counter() - t0, 2)
    if log:
        log(f"  int8 ({mode}): {quantized} nodes quantized, {facts['bytes_before'] / 2**20:.1f} -> "
            f"{facts['bytes_after'] / 2**20:.1f} MiB in {facts['seconds']:.1f} s")
    return facts
