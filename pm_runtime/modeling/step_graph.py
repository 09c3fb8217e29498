"""One whole denoising step on static device buffers, captured once as a CUDA graph.

    step i:  xin = input_scale[i] * x                         (n, C, h, w)
             out = unet([xin; xin], t[i], [C_k row 0; C_k row rows[i]], [C_v ...])   (2n, C, h, w)
                   (sequential=True: the two halves in two UNet calls of n, one after the other:
                   the captured graph's pool then holds the activations of n samples, not 2n)
             o   = out_uncond + guidance * (out_cond - out_uncond)
             x, x0_prev = the scheduler's affine update (pm_runtime.schedulers.linear)
             i  += 1                                           (the counter is a device tensor)

Every per-step value (coefficients, timestep, input scale, context rows) is READ INSIDE the step
from device tables indexed by the device-side counter (the arithmetic around the UNet, its input and
the update, is two pm_kernels calls: scaled_copies, guided_update), so replaying the graph `steps` times is
the whole loop: no host work, no host<->device copy between steps (euler-a's per-step noise is
the one exception: a device-to-device copy before each replay). With a UNet that keeps per-image
K/V tables (FastUNet.set_contexts), the contexts' cross-attention K and V are computed once per
image in `load` and the step passes only row indices; with one that keeps time tables
(FastUNet.set_timesteps), so are the ResNets' time-embedding vectors of every step (the step passes
the counter). The latent state stays float32;
the UNet runs in the model dtype. Without CUDA (or cuda_graph=False) the same step function runs
eagerly, which is how it is tested against the host loop.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

import pm_kernels

from ..schedulers.linear import COLUMNS, LinearSteps

WARMUP = 2  # eager steps on a side stream before capture (Triton compiles, cuDNN picks algorithms)
_SIDE_STREAMS: dict = {}  # device -> the one warm-up stream (see _side_stream)


def _side_stream(device) -> torch.cuda.Stream:
    """The warm-up stream of `device`, one per process. PyTorch keeps a cuBLAS workspace (32 MiB on
    Hopper) for every stream cuBLAS has run on, for the life of the process: a new stream per
    capture (low-memory mode captures once per image) left one more behind each time (measured on
    an H200: +32 MiB allocated per low-memory image; 0.58 GiB held after a benchmark's earlier variants)."""
    key = torch.device(device)
    key = torch.device(key.type, torch.cuda.current_device() if key.index is None else key.index)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(key)
    return _SIDE_STREAMS[key]


def capture_graph(fn: Callable, device, warm_up: list[Callable], pool=None):
    """(CUDA graph of one call of `fn`, that call's output): the `warm_up` calls run first on a side
    stream (Triton compiles, cuDNN picks its algorithms: outside the capture), as torch.cuda.graphs
    documents, and the capture runs on that same stream (one cuBLAS workspace for both, not a
    second one for torch.cuda.graph's own capture stream); it goes to memory pool `pool` (None: a
    pool of its own). torch.cuda.graph empties the allocator's cache before capturing (the warm-up's
    activations go back to the GPU); what the capture left in the general pool goes after it, so that
    between replays the GPU holds the weights and the graph's pool."""
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode():
        for call in warm_up:
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph, pool=pool, stream=side):
        out = fn()
    torch.cuda.empty_cache()
    return graph, out


class StepGraph:
    def __init__(self, unet: Callable, *, n: int, latent_shape: tuple[int, int, int], context_shape: tuple[int, int],
                 rows: int, dtype: torch.dtype, device: torch.device, cuda_graph: bool = True, max_steps: int = 1000,
                 kv_tables: bool = True, sequential: bool = False, time_tables: bool = True,
                 step_kernels: bool = True):
        self.unet, self.n, self.dtype, self.device = unet, n, dtype, torch.device(device)
        self.sequential = bool(sequential)
        # the arithmetic around the UNet: pm_kernels' two kernels, or (False) their PyTorch references
        self._copies, self._update = ((pm_kernels.scaled_copies, pm_kernels.guided_update) if step_kernels else
                                      (pm_kernels.scaled_copies_reference, pm_kernels.guided_update_reference))
        self.indexed = bool(kv_tables) and hasattr(unet, "allocate_context_tables")
        if self.indexed:
            unet.allocate_context_tables(rows, context_shape[0])
        self.timed = bool(time_tables) and hasattr(unet, "allocate_time_tables")
        if self.timed:  # one row per step: (max_steps, sum of the ResNets' widths) in the UNet's dtype
            unet.allocate_time_tables(max_steps)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.x = torch.zeros((n, *latent_shape), **f32)        # the sample
        self.x0_prev = torch.zeros_like(self.x)                 # the previous step's x0 (DPM-Solver++ 2M)
        self.noise = torch.zeros_like(self.x)                   # this step's noise (euler-a)
        self.step = torch.zeros((), dtype=torch.int64, device=self.device)
        self.coef = torch.zeros((max_steps, len(COLUMNS)), **f32)
        self.clip = torch.full((), float("inf"), **f32)
        self.timesteps = torch.zeros(max_steps, **f32)
        self.input_scale = torch.zeros(max_steps, **f32)
        # the UNet batch's context rows per step: n x row 0 (negative prompt), then n x rows[i]
        self.kv_rows = torch.zeros((max_steps, 2 * n), dtype=torch.int64, device=self.device)
        self.c_k = torch.zeros((rows, *context_shape), dtype=dtype, device=self.device)  # row 0: negative prompt
        self.c_v = torch.zeros_like(self.c_k)
        self.guidance = torch.zeros((), **f32)
        self.max_steps, self.capacity = max_steps, rows
        self.graph = None
        if cuda_graph and self.device.type == "cuda":
            self._capture()

    # ------------------------------------------------------------------ the step
    def _unet(self, xin, t, rows) -> torch.Tensor:
        """The UNet on xin (b, C, h, w) at timesteps t (b,) (this step's: row `step` of the time
        tables) with context rows `rows` (b,), in the UNet's dtype."""
        extra = {"t_index": self.step.view(1)} if self.timed else {}
        if self.indexed:
            return self.unet(xin, t, kv_index=rows, **extra)
        return self.unet(xin, t, self.c_k.index_select(0, rows), self.c_v.index_select(0, rows), **extra)

    def _step(self) -> None:
        n, i = self.n, self.step.view(1)
        t = self.timesteps.index_select(0, i)
        r = self.kv_rows.index_select(0, i)[0]  # (2n,)
        fmt = self.unet.sample_format(self.device) if hasattr(self.unet, "sample_format") else torch.contiguous_format
        copies = 1 if self.sequential else 2
        xin = self._copies(self.x, self.input_scale, self.step, copies, self.dtype, fmt)
        if self.sequential:  # one half after the other: activations of a batch of n at a time
            uncond = self._unet(xin, t.expand(n), r[:n])
            cond = self._unet(xin, t.expand(n), r[n:])
        else:  # one UNet call on [uncond; cond] (2n, C, h, w)
            out = self._unet(xin, t.expand(2 * n), r)
            uncond, cond = out[:n], out[n:]
        self._update(uncond, cond, self.x, self.x0_prev, self.noise, self.coef, self.step, self.guidance, self.clip)
        self.step.add_(1)

    def _capture(self) -> None:
        def warm_up():
            self.step.zero_()
            self._step()

        self.graph, _ = capture_graph(self._step, self.device, warm_up=[warm_up] * WARMUP)

    # ------------------------------------------------------------------ one image (group)
    def load(self, latents: np.ndarray, c_k: np.ndarray, c_v: np.ndarray, rows: np.ndarray, lin: LinearSteps,
             guidance: float) -> None:
        steps = lin.num_steps
        if steps > self.max_steps or len(c_k) > self.capacity:
            raise ValueError(f"{steps} steps / {len(c_k)} context rows exceed the step graph's "
                             f"{self.max_steps} / {self.capacity}")
        dev = self.device

        def put(buf, values):
            src = getattr(values, "tensor", None)  # a DeviceArray: device to device, no host round trip
            if src is None:
                src = torch.from_numpy(np.array(values))  # a writable copy
            buf[:len(values)].copy_(src.to(dev, buf.dtype))

        self.x.copy_(torch.from_numpy(np.ascontiguousarray(latents, np.float32)).to(dev))
        self.x0_prev.zero_()
        self.noise.zero_()
        self.step.zero_()
        put(self.coef, lin.coef)
        put(self.timesteps, lin.timesteps)
        put(self.input_scale, lin.input_scale)
        rows = np.asarray(rows, np.int64)[:, None]
        put(self.kv_rows, np.concatenate([np.zeros((len(rows), self.n), np.int64), np.repeat(rows, self.n, 1)], 1))
        put(self.c_k, c_k)
        put(self.c_v, c_v)
        if self.indexed:
            self.unet.set_contexts(self.c_k[:len(c_k)], self.c_v[:len(c_v)])  # K/V of every context, once
        if self.timed:
            self.unet.set_timesteps(self.timesteps[:steps])  # every step's time vectors, once
        self.clip.fill_(lin.clip)
        self.guidance.fill_(float(guidance))

    def run(self, latents, c_k, c_v, rows, lin: LinearSteps, guidance: float, noise: np.ndarray | None,
            before_step: Callable[[int], None], after_step: Callable[[int], None]) -> np.ndarray:
        """The whole loop; returns the final latents (n, C, h, w) float32 on the host."""
        self.load(latents, c_k, c_v, rows, lin, guidance)
        noise_dev = None if noise is None else torch.from_numpy(np.ascontiguousarray(noise, np.float32)).to(self.device)
        for i in range(lin.num_steps):
            before_step(i)
            if noise_dev is not None:
                self.noise.copy_(noise_dev[i])
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            after_step(i)
        return self.x.cpu().numpy()  # the one device->host copy (synchronises)
