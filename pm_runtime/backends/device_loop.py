"""The denoising loop with everything on the device (DESIGN §3): the GPU backends' `denoise`.

Before the loop, ONE upload of everything the loop will read: the initial latents and first UNet
input, the context pair [negative x n; concept row x n] of every distinct pair, the timestep row
of every step, the step graph's coefficient row of every step (step_coefficients) and, for
euler-a and the -sde schedulers, the noise of every step. Per step: the UNet runs on device buffers, then the step graph
(pm_runtime.specs STEP: guidance + scheduler update + the next UNet input) reads its output and
writes the next sample, x0 and UNet input into device buffers (double-buffered where a graph
would read and write the same tensor). Each step selects its rows by buffer address, so no data
moves between steps: the host only waits for the step to finish (progress, cancel) and copies
the final latents back once; the pipeline checks them for NaN/inf (one read per stage).

A backend provides the device through `DeviceOps`; `HostOps` is the same interface in host
memory (numpy arrays, engines called with arrays): the tests run the loop's exact buffer flow
with it against denoise_on_host, so only a backend's own few calls (allocate, copy, bind an
address, enqueue) are specific to it. numpy only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol

import numpy as np

from ..schedulers.linear import LinearSteps, linear_steps
from ..specs import STEP_COEF_COLUMNS
from .base import DenoiseJob

Buf = Any  # a backend's device buffer handle
ALIGN = 256  # bytes: row pitch of put_rows buffers (TensorRT wants I/O addresses aligned to 256 bytes)


@dataclasses.dataclass(frozen=True)
class DeviceBuf:
    """float32 device memory by address: `ptr`, logical `shape`, `pitch` = bytes from one row
    (index of the first axis) to the next. The buffers of TrtOps and OrtOps."""

    ptr: int
    shape: tuple
    pitch: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * 4

    @classmethod
    def whole(cls, ptr: int, shape) -> "DeviceBuf":
        """A contiguous buffer: rows follow each other without padding."""
        shape = tuple(int(d) for d in shape)
        return cls(ptr, shape, int(np.prod(shape[1:], dtype=np.int64)) * 4)

    def row(self, i: int) -> "DeviceBuf":
        return DeviceBuf.whole(self.ptr + int(i) * self.pitch, self.shape[1:])


def padded_rows(array: np.ndarray) -> tuple[np.ndarray, int]:
    """(rows, pitch/4) float32 host copy of `array` with every row padded to ALIGN bytes; the pitch."""
    a = np.ascontiguousarray(array, np.float32).reshape(array.shape[0], -1)
    width = a.shape[1]
    pitch = -(-width * 4 // ALIGN) * ALIGN
    out = np.zeros((a.shape[0], pitch // 4), np.float32)
    out[:, :width] = a
    return out, pitch


class DeviceOps(Protocol):
    def put(self, array: np.ndarray) -> Buf: ...  # a new device buffer holding a copy of `array` (float32)

    def put_rows(self, array: np.ndarray) -> Buf: ...  # the same, each row addressable by row()

    def zeros(self, shape: tuple[int, ...]) -> Buf: ...  # a new float32 device buffer of zeros

    def row(self, buf: Buf, i: int) -> Buf: ...  # row i of a put_rows buffer, without copying

    def run(self, net, inputs: Mapping[str, Buf], outputs: Mapping[str, Buf]) -> None: ...  # enqueue

    def sync(self) -> None: ...  # wait for what was enqueued

    def get(self, buf: Buf) -> np.ndarray: ...  # a host copy (waits)

    def release(self) -> None: ...  # free every buffer this object made


def step_coefficients(lin: LinearSteps, guidance: float) -> np.ndarray:
    """(steps, len(STEP_COEF_COLUMNS)) float32: the step graph's `coef` row of every step."""
    n = lin.num_steps
    table = np.zeros((n, len(STEP_COEF_COLUMNS)), np.float64)
    table[:, :lin.coef.shape[1]] = lin.coef
    table[:, STEP_COEF_COLUMNS.index("guidance")] = guidance
    table[:, STEP_COEF_COLUMNS.index("clip")] = lin.clip  # inf: no clamp
    nxt = np.ones(n)
    nxt[:-1] = lin.input_scale[1:]
    table[:, STEP_COEF_COLUMNS.index("next_input_scale")] = nxt
    return table.astype(np.float32)


def denoise_on_device(ops: DeviceOps, unet, step, job: DenoiseJob) -> np.ndarray:
    """Run `job` with UNet and step engines on the device behind `ops`; the final latents (host)."""
    lin = linear_steps(job.tables)
    x_host = np.ascontiguousarray(job.latents, np.float32)
    n, steps = x_host.shape[0], lin.num_steps
    shape = x_host.shape
    try:
        pairs, contexts = job.pairs(), {}  # (negative row, concept row) of each step
        for u, r in sorted(set(pairs)):
            contexts[u, r] = tuple(ops.put(np.concatenate([np.repeat(c[u:u + 1], n, 0), np.repeat(c[r:r + 1], n, 0)]))
                                   for c in (job.c_k, job.c_v))
        timesteps = ops.put_rows(np.repeat(lin.timesteps.astype(np.float32)[:, None], 2 * n, 1))  # (steps, 2n)
        coef = ops.put_rows(step_coefficients(lin, job.guidance))
        if lin.needs_noise:
            noise = ops.put_rows(np.stack([np.asarray(job.noise(i), np.float32) for i in range(steps)]))
            noise_at = lambda i: ops.row(noise, i)  # noqa: E731
        else:
            zero = ops.zeros(shape)
            noise_at = lambda i: zero  # noqa: E731
        first = np.float32(lin.input_scale[0]) * x_host
        unet_in = ops.put(np.concatenate([first, first]))
        x = [ops.put(x_host), ops.zeros(shape)]
        x0 = [ops.zeros(shape), ops.zeros(shape)]  # x0_prev of step 0: zeros
        noise_pred = ops.zeros((2 * n, *shape[1:]))
        for i in range(steps):
            job.before_step(i)
            c_k, c_v = contexts[pairs[i]]
            ops.run(unet, {"sample": unet_in, "timestep": ops.row(timesteps, i), "c_k": c_k, "c_v": c_v},
                    {"noise_pred": noise_pred})
            ops.run(step, {"noise_pred": noise_pred, "sample": x[i % 2], "x0_prev": x0[i % 2],
                           "noise": noise_at(i), "coef": ops.row(coef, i)},
                    {"prev_sample": x[(i + 1) % 2], "x0": x0[(i + 1) % 2], "unet_sample": unet_in})
            ops.sync()  # no copy: the host only waits, for progress and cancel
            job.after_step(i)
        return ops.get(x[steps % 2])
    finally:
        ops.release()


class HostOps:
    """DeviceOps in host memory: buffers are numpy arrays, `run` calls the engine with them and
    writes its outputs into the given buffers. Tests run denoise_on_device with it."""

    def __init__(self):
        self.made = 0

    def put(self, array):
        self.made += 1
        return np.array(array, np.float32, copy=True)

    def zeros(self, shape):
        self.made += 1
        return np.zeros(shape, np.float32)

    put_rows = put

    def row(self, buf, i):
        return buf[i]

    def run(self, net, inputs, outputs):
        res = net.run(dict(inputs))
        for name, buf in outputs.items():
            if res[name].shape != buf.shape:
                raise ValueError(f"{name}: engine output {res[name].shape} does not fit the buffer {buf.shape}")
            buf[...] = res[name]

    def sync(self):
        pass

    def get(self, buf):
        return np.array(buf, copy=True)

    def release(self):
        pass


class OrtOps:
    """DeviceOps with onnxruntime OrtValues on `device` ("cuda" for the CUDA execution provider,
    "cpu" too: that is how it is tested) and IOBinding by address: the engines' sessions read and
    write the buffers in place."""

    def __init__(self, ort, device: str = "cuda", device_id: int = 0):
        self.ort, self.device, self.device_id = ort, device, device_id
        self.values: dict[int, Any] = {}  # base address -> OrtValue (kept alive until release)

    def _value(self, host: np.ndarray) -> Any:
        v = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(host, np.float32), self.device, self.device_id)
        self.values[int(v.data_ptr())] = v
        return v

    def put(self, array):
        a = np.ascontiguousarray(array, np.float32)
        return DeviceBuf.whole(int(self._value(a).data_ptr()), a.shape)

    def put_rows(self, array):
        host, pitch = padded_rows(array)
        return DeviceBuf(int(self._value(host).data_ptr()), tuple(array.shape), pitch)

    def zeros(self, shape):
        return self.put(np.zeros(tuple(int(d) for d in shape), np.float32))

    def row(self, buf, i):
        return buf.row(i)

    def run(self, net, inputs, outputs):
        sess = net.engine.session
        binding = sess.io_binding()
        for name, buf in inputs.items():
            binding.bind_input(name, self.device, self.device_id, np.float32, list(buf.shape), buf.ptr)
        for name, buf in outputs.items():
            binding.bind_output(name, self.device, self.device_id, np.float32, list(buf.shape), buf.ptr)
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    def sync(self):
        pass  # run_with_iobinding + synchronize_outputs have finished the work

    def get(self, buf):
        v = self.values[buf.ptr]  # a whole buffer (the loop reads back only the final latents)
        return np.array(v.numpy(), copy=True).reshape(buf.shape)

    def release(self):
        self.values.clear()
