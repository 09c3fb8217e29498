"""The TensorRT export's own logic against a STAND-IN `tensorrt` module (TensorRT cannot be installed on
this project's machines, so nothing here runs TensorRT): which versions are refused, which layers are
asked for fp32, what happens to a timing cache TensorRT refuses, and which ONNX graph a plan is built
from when the UNet ships as int8; and the runtime backend's own bookkeeping: the GPU each call selects,
the activation block the resident plans share. Whether TensorRT accepts these calls is for a machine with it
(tests/test_export.py::test_tensorrt_plans, skipped here)."""

from __future__ import annotations

import sys
import types

import pytest

from pm_runtime.errors import UserError


def _fake_trt(version="10.16.0"):
    trt = types.SimpleNamespace(__version__=version, float32="float32")
    trt.LayerType = types.SimpleNamespace(**{n: n for n in ("NORMALIZATION", "REDUCE", "SOFTMAX", "UNARY",
                                                             "ELEMENTWISE", "CONVOLUTION", "MATRIX_MULTIPLY")})
    trt.UnaryOperation = types.SimpleNamespace(**{n: n for n in ("SQRT", "SIN", "COS", "EXP", "ABS")})
    trt.ElementWiseOperation = types.SimpleNamespace(**{n: n for n in ("POW", "SUM", "PROD")})

    class ILayer:
        def __init__(self, type, name, op=None):
            self.type, self.name, self._op, self.precision, self.num_outputs = type, name, op, None, 1
            self.output_types = {}

        def set_output_type(self, j, dtype):
            self.output_types[j] = dtype

    class IUnaryLayer(ILayer):  # a layer's own fields only after the cast, as in TensorRT's Python API
        op = property(lambda self: self._op)

    class IElementWiseLayer(ILayer):
        op = property(lambda self: self._op)

    trt.ILayer, trt.IUnaryLayer, trt.IElementWiseLayer = ILayer, IUnaryLayer, IElementWiseLayer
    return trt


def _builder(trt, cache=b"", log=None):
    from pm_export.tensorrt_build import PlanBuilder

    b = object.__new__(PlanBuilder)  # no __init__: it needs TensorRT and a GPU
    b.trt, b._cache_bytes, b.log = trt, cache, (log or (lambda m: None))
    return b


@pytest.mark.parametrize("version,ok", [("9.3.0", False), ("10.0.1", True), ("10.16.0", True), ("11.4.0", False)])
def test_tensorrt_versions(monkeypatch, version, ok):
    from pm_runtime.backends.tensorrt import require_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt(version))
    if ok:
        assert require_tensorrt().__version__ == version
    else:
        with pytest.raises(UserError, match="too old" if version.startswith("9.") else "tensorrt>=10,<11"):
            require_tensorrt(alternative=", or use --target onnx")


def test_fp16_plans_keep_export_fp16s_fp32_layers():
    """The layers export/fp16.py keeps in fp32 are asked for fp32 (precision and every output): the
    normalisations, reductions, softmax, unary Sqrt/Sin/Cos, elementwise Pow, and the layers made
    from the timestep path's nodes (named after the node, or node + "_" + suffix); nothing else."""
    trt = _fake_trt()
    L = trt.ILayer
    layers = [L("NORMALIZATION", "/norm/LayerNorm"), L("REDUCE", "/ReduceMean"), L("SOFTMAX", "/attn/Softmax"),
              L("UNARY", "/Sqrt", "SQRT"), L("UNARY", "/time_proj/Sin", "SIN"), L("UNARY", "/time_proj/Cos", "COS"),
              L("ELEMENTWISE", "/Pow", "POW"), L("ELEMENTWISE", "/time_proj/Mul", "PROD"),
              L("ELEMENTWISE", "/time_proj/Mul_1", "PROD"),  # the parser's second layer of that node
              L("UNARY", "/act/Exp", "EXP"), L("ELEMENTWISE", "/Add", "SUM"), L("CONVOLUTION", "/conv_in/Conv"),
              L("MATRIX_MULTIPLY", "/time_proj/MulX")]  # another node whose name starts like a kept one
    network = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    n = _builder(trt)._fp32_layers(network, ["/time_proj/Mul", "/time_proj/Sin"])
    kept = [x.name for x in layers if x.precision == "float32"]
    assert kept == ["/norm/LayerNorm", "/ReduceMean", "/attn/Softmax", "/Sqrt", "/time_proj/Sin", "/time_proj/Cos",
                    "/Pow", "/time_proj/Mul", "/time_proj/Mul_1"] and n == len(kept)
    assert all(x.output_types == {0: "float32"} for x in layers if x.precision == "float32")
    assert all(x.output_types == {} for x in layers if x.precision is None)


def test_a_refused_timing_cache_is_replaced_not_fatal():
    """A timing cache file from another GPU or TensorRT version (set_timing_cache returns False) is
    left aside with a note and the build goes on with an empty cache; a cache it accepts is used."""
    trt = _fake_trt()
    attached = []

    def config(accept):
        return types.SimpleNamespace(
            create_timing_cache=lambda data: ("cache", data),
            set_timing_cache=lambda cache, ignore_mismatch: attached.append(cache) or accept(cache))

    notes = []
    b = _builder(trt, cache=b"old-gpu", log=notes.append)
    b._timing_cache(config(lambda cache: cache[1] == b""))  # only the empty one is accepted
    assert attached == [("cache", b"old-gpu"), ("cache", b"")] and b._cache_bytes == b""
    assert notes and "another GPU or TensorRT version" in notes[0]
    attached.clear()
    b = _builder(trt, cache=b"this-gpu", log=notes.append)
    b._timing_cache(config(lambda cache: True))
    assert attached == [("cache", b"this-gpu")] and b._cache_bytes == b"this-gpu"
    with pytest.raises(UserError, match="refused an empty timing cache"):
        _builder(trt)._timing_cache(config(lambda cache: False))


def test_plans_are_built_from_the_fp32_graph_when_the_unet_ships_int8(tiny_model, trained_concept, tmp_path,
                                                                       monkeypatch):
    """--target onnx,tensorrt --int8 dynamic-matmul --optimize none: the shipped unet.onnx becomes the
    int8 graph (MatMulInteger, which TensorRT's ONNX parser does not take) in the file the plan was to
    be built from; the plan is built first, from the fp32 graph. A stand-in builder records what each
    network's graph held when its plan was built."""
    import onnx

    from pm_export import tensorrt_build
    from pm_export.build import ExportConfig, export_bundle

    built = {}

    class StandInBuilder:
        def __init__(self, timing_cache=None, log=None):
            pass

        def build(self, onnx_path, spec, plan_path, fp16=True):
            model = onnx.load(str(onnx_path), load_external_data=False)
            built[spec.name] = {n.op_type for n in model.graph.node}
            plan_path.write_bytes(b"stand-in plan")
            return {"tensorrt_version": "stand-in", "gpu": "none", "compute_capability": "0.0", "fp16": fp16}

    monkeypatch.setattr(tensorrt_build, "PlanBuilder", StandInBuilder)
    out = export_bundle(ExportConfig(concept=trained_concept, model=tiny_model, out=tmp_path / "b", name="alice",
                                     int8="dynamic-matmul", target="onnx,tensorrt", optimize="none"),
                        log=lambda m: None)
    shipped = onnx.load(str(out / "unet.onnx"), load_external_data=False)
    assert "MatMulInteger" in {n.op_type for n in shipped.graph.node}  # the int8 graph ships as ONNX
    assert "MatMul" in built["unet"] and "MatMulInteger" not in built["unet"]  # the plan: from the fp32 one
    assert {"text_encoder", "unet", "vae_decoder"} <= set(built)


def test_each_engine_call_selects_its_gpu_in_the_calling_thread():
    """CUDA's current device is per host thread: a TrtNetwork made for GPU 1 and run from another
    thread makes GPU 1 current in that thread before its first CUDA call (stand-in cudart and engine,
    which record the calls; no CUDA runs)."""
    import threading

    import numpy as np

    from pm_runtime.backends.tensorrt import TrtNetwork

    calls = []  # (thread, call, args)

    def rec(name, ret=0):
        return lambda *a: calls.append((threading.get_ident(), name, a)) or (0, ret)

    cudart = types.SimpleNamespace(
        cudaSetDevice=lambda i: calls.append((threading.get_ident(), "cudaSetDevice", (i,))) or (0,),
        cudaStreamCreate=rec("cudaStreamCreate", 7), cudaMalloc=rec("cudaMalloc", 4096),
        cudaMemcpyAsync=lambda *a: calls.append((threading.get_ident(), "cudaMemcpyAsync", ())) or (0,),
        cudaStreamSynchronize=lambda *a: calls.append((threading.get_ident(), "sync", ())) or (0,),
        cudaFree=lambda *a: (0,), cudaStreamDestroy=lambda *a: (0,),
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2))
    trt = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
                                nptype=lambda dtype: np.float32)
    context = types.SimpleNamespace(set_input_shape=lambda *a: True, set_tensor_address=lambda *a: True,
                                    get_tensor_shape=lambda name: (2, 3), execute_async_v3=lambda stream: True)
    engine = types.SimpleNamespace(num_io_tensors=2, get_tensor_name=["x", "y"].__getitem__,
                                   get_tensor_mode=lambda n: "in" if n == "x" else "out",
                                   get_tensor_dtype=lambda n: "float32", create_execution_context=lambda: context)
    net = TrtNetwork(trt, cudart, engine, index=1)
    assert calls[0][1:] == ("cudaSetDevice", (1,)) and calls[1][1] == "cudaStreamCreate"
    out = {}
    worker = threading.Thread(target=lambda: out.update(net.run({"x": np.ones((2, 3), np.float32)})))
    worker.start()
    worker.join()
    theirs = [c[1:] for c in calls if c[0] == worker.ident]
    assert theirs[0] == ("cudaSetDevice", (1,)) and ("cudaMalloc", (24,)) in theirs
    assert out["y"].shape == (2, 3)


def _stand_in_backend(tmp_path, sizes: dict, low_memory=False, v2=True, fail_malloc=None):
    """A TensorRTBackend without __init__ (it needs TensorRT and a GPU) over stand-in engines whose
    contexts record the device memory they are given, and a stand-in cudart that records mallocs and frees."""
    import itertools
    import threading

    from pm_runtime.backends.tensorrt import SharedScratch, TensorRTBackend

    log = []  # ("malloc", ptr, bytes) / ("free", ptr)
    addresses = itertools.count(0x1000, 0x1000)

    def malloc(n):
        if fail_malloc is not None and fail_malloc(n):
            return (2,)  # cudaErrorMemoryAllocation
        ptr = next(addresses)
        log.append(("malloc", ptr, n))
        return (0, ptr)

    cudart = types.SimpleNamespace(cudaSetDevice=lambda i: (0,), cudaMalloc=malloc, cudaStreamCreate=lambda: (0, 7),
                                   cudaFree=lambda ptr: log.append(("free", ptr)) or (0,),
                                   cudaStreamDestroy=lambda s: (0,))
    trt = types.SimpleNamespace(ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="user"))

    def context(strategy="static"):
        return types.SimpleNamespace(strategy=strategy, device_memory=None)

    def engine(name):  # no I/O tensors: only the context's memory is looked at
        e = types.SimpleNamespace(num_io_tensors=0, create_execution_context=context)
        if v2:
            e.device_memory_size_v2 = sizes[name]
            e.device_memory_size = 10**12  # the deprecated figure must not be the one used
        else:
            e.device_memory_size = sizes[name]
        return e

    for name in sizes:
        (tmp_path / f"{name}.plan").write_bytes(name.encode())
    b = object.__new__(TensorRTBackend)
    b.trt, b.cudart, b.index, b.low_memory = trt, cudart, 0, low_memory
    b.bundle = types.SimpleNamespace(component_path=lambda net, fmt: tmp_path / f"{net}.plan")
    b.runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda data: engine(data.decode()))
    b.scratch = None if low_memory else SharedScratch(cudart, 0)
    b._cache, b._lock, b.log = {}, threading.Lock(), None
    return b, log


def test_resident_plans_share_one_activation_block_sized_to_the_largest(tmp_path):
    """Every resident network's execution context runs in one shared block (USER_MANAGED), grown and re-pointed
    when a larger engine loads, freed at close: the networks never run at once, so the block is their maximum,
    not their sum (stand-in TensorRT and cudart: what is checked is the backend's bookkeeping, not TensorRT)."""
    sizes = {"text_encoder": 100 * 2**20, "unet": 300 * 2**20, "step": 10 * 2**20, "vae_decoder": 700 * 2**20}
    b, log = _stand_in_backend(tmp_path, sizes)
    said = []
    b.log = said.append
    nets = {}
    for name in sizes:
        nets[name] = b._load(name)
        b._cache[name] = types.SimpleNamespace(engine=nets[name])
    contexts = [n.context for n in nets.values()]
    assert {c.strategy for c in contexts} == {"user"}
    mallocs = [e for e in log if e[0] == "malloc"]
    assert [m[2] / 2**20 for m in mallocs] == [100, 300, 700]  # grown twice; the step fitted in the UNet's block
    assert said == ["TensorRT activation memory: 100 MiB shared by 1 plan(s) (their own blocks would be 100 MiB)",
                    "TensorRT activation memory: 300 MiB shared by 2 plan(s) (their own blocks would be 400 MiB)",
                    "TensorRT activation memory: 700 MiB shared by 4 plan(s) (their own blocks would be 1110 MiB)"]
    final = mallocs[-1][1]
    assert all(c.device_memory == final for c in contexts)  # the earlier contexts were re-pointed
    assert [e[1] for e in log if e[0] == "free"] == [m[1] for m in mallocs[:-1]]  # each old block freed
    # each old block was freed before the next one was allocated: a growth never holds both
    assert [e[0] for e in log] == ["malloc", "free", "malloc", "free", "malloc"]
    assert b.scratch.size == 700 * 2**20
    log.clear()
    b.close()
    assert log == [("free", final)] and b.scratch.ptr == 0 and b.scratch.contexts == []


def test_low_memory_plans_keep_their_own_activation_memory(tmp_path):
    """In low-memory mode one network is loaded at a time: each context gets TensorRT's own block (freed with
    it), no shared block that would keep the largest network's activations beside the next one's weights."""
    b, log = _stand_in_backend(tmp_path, {"unet": 300, "vae_decoder": 700}, low_memory=True)
    net = b._load("unet")
    assert net.context.strategy == "static" and net.context.device_memory is None and net.scratch is None
    assert b.scratch is None and log == []


def test_tensorrt_10_0_engines_report_device_memory_size(tmp_path):
    """device_memory_size_v2 is TensorRT 10.1+; a 10.0 engine's device_memory_size is used instead."""
    from pm_runtime.backends.tensorrt import engine_scratch_bytes

    b, log = _stand_in_backend(tmp_path, {"unet": 300}, v2=False)
    assert engine_scratch_bytes(b._load("unet").engine) == 300 and log[0][2] == 300
    b2, _ = _stand_in_backend(tmp_path, {"unet": 300})
    assert engine_scratch_bytes(b2._load("unet").engine) == 300


def test_a_failed_growth_is_repaired_by_the_next_load(tmp_path):
    """If the larger block cannot be allocated, the load fails with the old block already freed; the next
    load allocates what every attached context needs and re-points them all (none keeps a dead address)."""
    fail = {"on": False}
    b, log = _stand_in_backend(tmp_path, {"unet": 300, "vae_decoder": 700, "text_encoder": 100},
                               fail_malloc=lambda n: fail["on"])
    unet = b._load("unet")
    fail["on"] = True
    with pytest.raises(RuntimeError, match="CUDA error"):
        b._load("vae_decoder")
    assert b.scratch.ptr == 0 and b.scratch.size == 0  # freed, not re-allocated
    fail["on"] = False
    text = b._load("text_encoder")  # smaller than the UNet's need: the block is sized for both
    assert b.scratch.size == 300 and unet.context.device_memory == text.context.device_memory == b.scratch.ptr
    vae = b._load("vae_decoder")
    assert b.scratch.size == 700 and {unet.context.device_memory, vae.context.device_memory} == {b.scratch.ptr}
