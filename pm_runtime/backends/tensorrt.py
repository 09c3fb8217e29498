"""TensorRT backend: the bundle's `.plan` components (pm-export --target tensorrt|all). No torch.

NOT RUN: TensorRT and cuda-python cannot be installed on the machines that build this project.
This file is written against TensorRT 10's documented Python API (Runtime,
deserialize_cuda_engine, named I/O tensors, set_input_shape / set_tensor_address /
execute_async_v3) and cuda-python's runtime bindings (cudaMalloc, cudaMemcpyAsync, streams);
its tests skip where `tensorrt` does not import. Tested here without TensorRT: `check_plan` (the
refusal of a plan built by another TensorRT version or for another GPU, a pure function), and
against stand-in modules (tests/test_tensorrt_logic.py) the version refusal, the per-thread device
and the shared activation memory's bookkeeping.

A plan runs only on the TensorRT version and GPU architecture that built it, so both are read
from the manifest (the exporter records them) and compared before deserialising.

The denoising loop stays on the GPU when the bundle has `step.plan` (pm-export builds it with the
other plans from export/step_graph.py): device_loop.denoise_on_device with TrtOps, i.e. one
upload before the loop, UNet and step plans bound to device buffers by address, one copy of the
final latents back. The loop's buffer flow is tested on the CPU with device_loop.HostOps (numpy
buffers, onnxruntime engines, == the host loop for every scheduler); TrtOps / TrtNetwork.enqueue
(cudaMalloc, cudaMemcpy, rows padded to 256 bytes, set_tensor_address, execute_async_v3) are
not run. Bundles without step.plan use the host loop (a host round trip per step). The text
encoder, VAE (decoder; encoder for img2img) and safety checker calls copy their inputs and outputs
(once per stage).

Activation memory: by default TensorRT gives every execution context its own block, sized for its
engine's largest shapes, for as long as the context lives; with every network resident that is one
block per network (text encoder, UNet, step, VAE decoder and encoder, safety checker) although they never run at
the same time. Here the resident contexts are made with ExecutionContextAllocationStrategy.USER_MANAGED
and share ONE block (SharedScratch), as large as the largest engine needs (grown, and every context
re-pointed, when a larger engine loads): the sum of the blocks becomes their maximum. Safe because the
networks run one after another: Pipeline calls are serialised, every stage ends with a stream
synchronisation, and the UNet and step plans of the device loop share the UNet's stream. In low-memory
mode (one network loaded at a time) each context keeps its own block, freed with it. NOT RUN either:
the sharing logic is tested against stand-in engines (tests/test_tensorrt_logic.py).
"""

from __future__ import annotations

import numpy as np

from .. import formats as F
from ..bundle import Bundle
from ..errors import UserError
from ..specs import NETWORKS, OPTIONAL_NETWORKS, STEP
from .base import DTYPE_NOTE, Backend, DenoiseJob
from .device_loop import DeviceBuf, denoise_on_device, padded_rows

INSTALL_HINT = ("TensorRT is not installed: on a machine with an NVIDIA GPU run "
                "pip install 'personamagic-runtime[tensorrt]' (tensorrt 10.x, cuda-python)")


def require_tensorrt(alternative: str = ""):
    """The tensorrt module (10.x), or a one-line UserError with the install hint (+ `alternative`,
    e.g. pm-export's ", or use --target onnx"). TensorRT 11 removed the weakly typed builder API the
    plans are built with (BuilderFlag.FP16, per-layer precision: export/tensorrt_build.py), so 11+ is
    refused with what to install instead of failing half-way through an export."""
    from ..interrupts import import_optional

    try:
        trt = import_optional("tensorrt")  # a Ctrl-C during the import is not "not installed"
    except ImportError:
        raise UserError(INSTALL_HINT + alternative) from None
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise UserError(f"TensorRT {trt.__version__} is too old; the plans need TensorRT 10")
    if major > 10:
        raise UserError(f"TensorRT {trt.__version__} is not supported yet: the plans are built with TensorRT 10's "
                        f"fp16 builder flag and per-layer precision, which TensorRT 11 removed; "
                        f"pip install 'tensorrt>=10,<11'" + alternative)
    return trt


def require_cudart():
    from ..interrupts import import_optional

    try:
        cudart = import_optional("cuda.bindings.runtime")  # cuda-python >= 12.6
    except ImportError:
        try:
            cudart = import_optional("cuda.cudart")  # older cuda-python
        except ImportError:
            raise UserError("cuda-python is not installed (the TensorRT backend's buffer library): "
                            "pip install 'personamagic-runtime[tensorrt]'") from None
    return cudart


def _call(result):
    """cuda-python returns (error, *values): raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


def check_plan(name: str, details: dict, trt_version: str, compute_capability: str) -> None:
    """Refuse a plan built by another TensorRT version or for another GPU architecture."""
    built_trt, built_cc = details.get("tensorrt_version"), details.get("compute_capability")
    if not built_trt or not built_cc:
        raise UserError(f"plan {name}: the manifest does not record the TensorRT version and GPU it was built "
                        "for; rebuild it with pm-export --target tensorrt")
    if built_trt != trt_version:
        raise UserError(f"plan {name} was built with TensorRT {built_trt}; this is TensorRT {trt_version}. "
                        "Plans only run on the version that built them: rebuild with pm-export --target tensorrt "
                        "here, or use --backend onnxruntime")
    if built_cc != compute_capability:
        gpu = details.get("gpu", "another GPU")
        raise UserError(f"plan {name} was built for {gpu} (compute capability {built_cc}); this GPU is "
                        f"compute capability {compute_capability}. Rebuild the plans on this GPU")


def device_index(device: str | None) -> int:
    kind, _, index = (device or "cuda").lower().partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"--device {device!r} is not a TensorRT device; use cuda or cuda:N")
    return int(index or 0)


class TrtOps:
    """device_loop.DeviceOps on one CUDA stream with cuda-python's runtime API (NOT RUN: see the
    module docstring). put/zeros/put_rows allocate with cudaMalloc; put_rows pads each row to
    ALIGN bytes so that every row's address can be bound to an engine input."""

    def __init__(self, cudart, stream):
        self.cudart, self.stream, self.owned = cudart, stream, []

    def _alloc(self, nbytes: int) -> int:
        ptr = int(_call(self.cudart.cudaMalloc(max(int(nbytes), 1))))
        self.owned.append(ptr)
        return ptr

    def _upload(self, host: np.ndarray) -> int:
        """A new device buffer holding `host` (float32, contiguous): its address."""
        ptr = self._alloc(host.nbytes)
        _call(self.cudart.cudaMemcpy(ptr, host.ctypes.data, host.nbytes,
                                     self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return ptr

    def put(self, array):
        a = np.ascontiguousarray(array, np.float32)
        return DeviceBuf.whole(self._upload(a), a.shape)

    def put_rows(self, array):
        host, pitch = padded_rows(array)
        return DeviceBuf(self._upload(host), tuple(array.shape), pitch)

    def zeros(self, shape):
        buf = DeviceBuf.whole(0, shape)
        ptr = self._alloc(buf.nbytes)
        _call(self.cudart.cudaMemset(ptr, 0, buf.nbytes))
        return DeviceBuf.whole(ptr, buf.shape)

    def row(self, buf, i):
        return buf.row(i)

    def run(self, net, inputs, outputs):
        net.engine.enqueue(inputs, outputs, self.stream)

    def sync(self):
        _call(self.cudart.cudaStreamSynchronize(self.stream))

    def get(self, buf):
        self.sync()
        out = np.empty(buf.shape, np.float32)
        _call(self.cudart.cudaMemcpy(out.ctypes.data, buf.ptr, out.nbytes,
                                     self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return out

    def release(self):
        try:
            self.cudart.cudaStreamSynchronize(self.stream)  # nothing may still use the buffers
        finally:
            for ptr in self.owned:
                self.cudart.cudaFree(ptr)
            self.owned.clear()


def engine_scratch_bytes(engine) -> int:
    """The activation memory an execution context of `engine` needs (its largest profile):
    device_memory_size_v2 (TensorRT 10.1+), else device_memory_size (10.0)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


class SharedScratch:
    """One device block used as the activation memory of several execution contexts that never run at
    the same time (module docstring). `attach` grows the block when the attached contexts need more than
    it holds and re-points every attached context at the new block; the old block is freed first
    (nothing runs while a network loads), so a growth never holds both. If the new allocation fails, the
    block is empty and the earlier contexts keep a stale address until the next `attach` (the failed load,
    retried by the next call) grows it again to what all of them need and re-points them."""

    def __init__(self, cudart, index: int = 0):
        self.cudart, self.index = cudart, index
        self.ptr, self.size = 0, 0
        self.contexts: list[tuple[object, int]] = []  # (context, bytes it needs)

    def attach(self, context, nbytes: int) -> None:
        need = max([int(nbytes), *(n for _, n in self.contexts)])
        if need > self.size:
            self._grow(need)
        context.device_memory = self.ptr
        self.contexts.append((context, int(nbytes)))

    def _grow(self, nbytes: int) -> None:
        _call(self.cudart.cudaSetDevice(self.index))
        if self.ptr:
            _call(self.cudart.cudaFree(self.ptr))  # no engine runs while a network loads (module docstring)
            self.ptr, self.size = 0, 0
        self.ptr = int(_call(self.cudart.cudaMalloc(nbytes)))
        self.size = nbytes
        for ctx, _ in self.contexts:
            ctx.device_memory = self.ptr

    def detach(self, context) -> None:
        self.contexts = [(c, n) for c, n in self.contexts if c is not context]

    def release(self) -> None:
        """Free the block (the attached contexts must be gone: Backend.close frees them first)."""
        if self.ptr:
            self.cudart.cudaSetDevice(self.index)
            self.cudart.cudaFree(self.ptr)
        self.ptr, self.size, self.contexts = 0, 0, []


class TrtNetwork:
    """One engine + execution context + stream; device buffers grow as shapes need. Every call first
    makes its GPU (`index`) the calling thread's current device: CUDA's current device is per host
    thread, and a Pipeline may be called from threads other than the one that loaded it. With `scratch`
    (a SharedScratch) the context's activation memory is that shared block instead of its own."""

    def __init__(self, trt, cudart, engine, index: int = 0, scratch: SharedScratch | None = None):
        self.trt, self.cudart, self.engine, self.index, self.scratch = trt, cudart, engine, index, scratch
        _call(cudart.cudaSetDevice(index))
        if scratch is None:
            self.context = engine.create_execution_context()
        else:
            self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            scratch.attach(self.context, engine_scratch_bytes(engine))
        self.stream = _call(cudart.cudaStreamCreate())
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _call(self.cudart.cudaFree(ptr))
            ptr = int(_call(self.cudart.cudaMalloc(max(nbytes, 1))))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, inputs):
        cudart, ctx, stream = self.cudart, self.context, self.stream
        _call(cudart.cudaSetDevice(self.index))
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        held = []  # keep host arrays alive until the stream is synchronised
        for name in self.inputs:
            a = np.ascontiguousarray(inputs[name], dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))
            held.append(a)
            ptr = self._buffer(name, a.nbytes)
            ctx.set_input_shape(name, a.shape)
            ctx.set_tensor_address(name, ptr)
            _call(cudart.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes, h2d, stream))
        outs = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            out = np.empty(shape, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))
            ctx.set_tensor_address(name, self._buffer(name, out.nbytes))
            outs[name] = out
        if not ctx.execute_async_v3(int(stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        for name, out in outs.items():
            _call(cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[name][0], out.nbytes, d2h, stream))
        _call(cudart.cudaStreamSynchronize(stream))
        return {n: o.astype(np.float32, copy=False) for n, o in outs.items()}

    def enqueue(self, inputs: dict, outputs: dict, stream) -> None:
        """Bind device buffers (DeviceBuf) to every I/O tensor and enqueue on `stream`: no copy."""
        ctx = self.context
        if set(inputs) != set(self.inputs) or set(outputs) != set(self.outputs):
            raise RuntimeError(f"engine I/O {self.inputs} -> {self.outputs}, bound {sorted(inputs)} -> {sorted(outputs)}")
        for name, buf in inputs.items():
            ctx.set_input_shape(name, buf.shape)
            ctx.set_tensor_address(name, buf.ptr)
        for name, buf in outputs.items():
            if tuple(ctx.get_tensor_shape(name)) != tuple(buf.shape):
                raise RuntimeError(f"{name}: engine output {tuple(ctx.get_tensor_shape(name))} != buffer {buf.shape}")
            ctx.set_tensor_address(name, buf.ptr)
        if not ctx.execute_async_v3(int(stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def free(self) -> None:
        self.cudart.cudaSetDevice(self.index)
        for ptr, _ in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.buffers.clear()
        self.cudart.cudaStreamDestroy(self.stream)
        if self.scratch is not None:
            self.scratch.detach(self.context)
        self.context = self.engine = None


class TensorRTBackend(Backend):
    name = "tensorrt"
    component_format = "tensorrt"

    def __init__(self, bundle: Bundle, *, device: str | None = None, low_memory: bool = False, **_):
        super().__init__(bundle, device=device, low_memory=low_memory)
        self.trt, self.cudart = require_tensorrt(), require_cudart()
        self.index = device_index(device)
        _call(self.cudart.cudaSetDevice(self.index))
        prop = _call(self.cudart.cudaGetDeviceProperties(self.index))
        self.gpu = prop.name.decode(errors="replace").rstrip("\0") if isinstance(prop.name, bytes) else str(prop.name)
        self.compute_capability = f"{prop.major}.{prop.minor}"
        optional = [n for n in (*OPTIONAL_NETWORKS, STEP) if self.provides(n)]
        for net in [*NETWORKS, *optional]:  # refuse before any deserialisation
            comp = bundle.component(net, "tensorrt")
            check_plan(comp[F.CK_NAME], comp.get(F.CK_DETAILS, {}), self.trt.__version__, self.compute_capability)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        # the resident networks' one activation block (module docstring); none in low-memory mode
        self.scratch = None if self.low_memory else SharedScratch(self.cudart, self.index)

    @classmethod
    def unavailable(cls, bundle: Bundle, device: str | None = None, dtype: str | None = None, **_) -> str | None:
        if dtype is not None:
            return DTYPE_NOTE.format("tensorrt")
        missing = cls.missing_networks(bundle)
        if missing:
            return f"the bundle has no TensorRT plan for {', '.join(missing)}"
        try:
            require_tensorrt()
            cudart = require_cudart()
            device_index(device)
            if _call(cudart.cudaGetDeviceCount()) < 1:
                return "no CUDA GPU is visible"
        except (UserError, RuntimeError) as e:
            return str(e)
        return None

    def _load(self, network: str) -> TrtNetwork:
        path = self.bundle.component_path(network, "tensorrt")
        _call(self.cudart.cudaSetDevice(self.index))  # this thread's current device (per host thread)
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise UserError(f"TensorRT could not deserialise {path.name} (see the TensorRT log above)")
        shared = self.scratch if self.resident(network) else None
        before = shared.size if shared is not None else 0
        net = TrtNetwork(self.trt, self.cudart, engine, self.index, shared)
        if shared is not None and shared.size > before and self.log is not None:  # said when the block grows
            mib = 2**20
            self.log(f"TensorRT activation memory: {shared.size / mib:.0f} MiB shared by {len(shared.contexts)} "
                     f"plan(s) (their own blocks would be {sum(n for _, n in shared.contexts) / mib:.0f} MiB)")
        return net

    def denoise(self, unet, job: DenoiseJob) -> np.ndarray:
        """The loop on the GPU (device_loop.py) when the bundle has the step plan (pm-export builds
        it with the other plans); older bundles: the host loop."""
        if not self.provides(STEP):
            return super().denoise(unet, job)
        with self.network(STEP) as step:
            _call(self.cudart.cudaSetDevice(self.index))  # the loop's buffers on this GPU, from any thread
            return denoise_on_device(TrtOps(self.cudart, unet.engine.stream), unet, step, job)

    def _free(self, net) -> None:
        if net.engine is not None:
            net.engine.free()
        net.engine = None

    def close(self) -> None:
        super().close()
        if self.scratch is not None:
            self.scratch.release()

    def describe(self) -> str:
        return f"tensorrt {self.trt.__version__} {self.gpu} sm{self.compute_capability} fp16"
