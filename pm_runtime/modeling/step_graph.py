"""One whole denoising step on static device buffers, captured once as a CUDA graph.

    step i:  xin = input_scale[i] * x                         (n, C, h, w)
             out = unet([xin; xin], t[i], [C_k row neg[i]; C_k row rows[i]], [C_v ...])   (2n, C, h, w)
                   (neg[i]: the negative prompt's row, 0 unless prompt editing schedules it)
                   (sequential=True: the two halves in two UNet calls of n, one after the other:
                   the captured graph's pool then holds the activations of n samples, not 2n)
             o   = out_uncond + guidance * (out_cond - out_uncond)
             x, x0_prev = the scheduler's affine update (pm_runtime.schedulers.linear)
             i  += 1                                           (the counter is a device tensor)

Every per-step value (coefficients, timestep, input scale, context rows) is READ INSIDE the step
from device tables indexed by the device-side counter (the arithmetic around the UNet, its input and
the update, is two pm_kernels calls: scaled_copies, guided_update), so replaying the graph `steps` times is
the whole loop: no host work, no host<->device copy between steps (the per-step noise of euler-a and -sde is
the one exception: a device-to-device copy before each replay). With a UNet that keeps per-image
K/V tables (FastUNet.set_contexts), the contexts' cross-attention K and V are computed once per
image in `load` and the step passes only row indices (with kv_step, two-row buffers instead: the
negative prompt's K/V once per image, the step's own context's by two GEMMs inside the step); with one that keeps time tables
(FastUNet.set_timesteps), so are the ResNets' time-embedding vectors of every step (the step passes
the counter). The latent state stays float32;
the UNet runs in the model dtype. Without CUDA (or cuda_graph=False) the same step function runs
eagerly, which is how it is tested against the host loop.
"""

from __future__ import annotations

import contextlib
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


def _blas_outside_pools(stream, device) -> None:
    """cuBLAS keeps a workspace per (handle, stream) for the life of the process (or until PyTorch's
    workspaces are cleared, as the GPU benchmark does between variants), made by its first call
    there through PyTorch's allocator: made inside a GraphPool's routing it would sit in (and pin)
    one of the pool's segments after the pool is let go. One small matmul (and addmm: the cuBLASLt
    path) on `stream` before any routing makes it in the general pool (a few microseconds where it
    exists already: done before every routed warm-up, captures being rare)."""
    with torch.cuda.stream(stream), torch.inference_mode():
        a = torch.zeros((16, 16), dtype=torch.float16, device=device)
        torch.addmm(a[0], a, torch.mm(a, a))


def graphs_available(device) -> bool:
    """Whether CUDA graphs can be captured on `device` (a CUDA device)."""
    return torch.device(device).type == "cuda"


class GraphPool:
    """One memory pool that several CUDA graphs capture into AND whose warm-ups allocate from
    (torch-cuda's shared_pool): a torch.cuda.MemPool where this PyTorch has one (its id is what a
    capture takes as `pool`; torch.cuda.use_mem_pool routes the warm-ups' allocations to it), else a
    plain graph pool handle (captures share it; warm-ups then allocate from the general pool).
    Memory a warm-up or capture frees stays in the pool for the next one, so the pool holds the
    largest of its users' needs, not their sum, as long as the largest come first (the allocator
    carves small blocks out of big free ones, never the reverse): torch-cuda captures the VAE
    decode first. Sharing is safe for graphs replayed one at a time whose outputs are copied out (or
    held alive) before another replays: see TorchCudaBackend.shared_pool."""

    def __init__(self, device):
        device = torch.device(device)
        # with its index: torch.cuda.use_mem_pool refuses a "cuda" device without one
        self.device = torch.device(device.type, torch.cuda.current_device() if device.index is None else device.index)
        self.captures = 0  # graphs captured into it so far
        self.mem_pool = None
        if hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool"):
            with torch.cuda.device(self.device):
                self.mem_pool = torch.cuda.MemPool()
            self.id = self.mem_pool.id
        else:
            self.id = torch.cuda.graph_pool_handle()

    def routing(self):
        """A context in which this thread's allocations come from the pool (where it can)."""
        if self.mem_pool is None:
            return contextlib.nullcontext()
        return torch.cuda.use_mem_pool(self.mem_pool, self.device)


def work_stream(device) -> torch.cuda.Stream:
    """The process's one non-default stream for `device`: where every CUDA graph is warmed up and
    captured (and, with torch-cuda's one_stream, where the backend runs everything)."""
    return _side_stream(device)


@contextlib.contextmanager
def allocating_in(pool: GraphPool, device):
    """Allocations of the block come from `pool`, on work_stream (the stream its blocks belong to:
    the caching allocator reuses a free block only on the stream that freed it); the block's work
    runs there, ordered after the current stream's and before what the current stream does next."""
    side = work_stream(device)
    current = torch.cuda.current_stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side), pool.routing():
        yield
    current.wait_stream(side)


def capture_graph(fn: Callable, device, warm_up: list[Callable], pool=None):
    """(CUDA graph of one call of `fn`, that call's output): the `warm_up` calls run first on a side
    stream (Triton compiles, cuDNN picks its algorithms: outside the capture), as torch.cuda.graphs
    documents, and the capture runs on that same stream (one cuBLAS workspace for both, not a
    second one for torch.cuda.graph's own capture stream); it goes to memory pool `pool` (None: a
    pool of its own; a GraphPool: its pool, the warm-ups allocating from it too once an earlier
    capture left memory in it to reuse (the first capture's warm-ups run in the general pool,
    whose cached blocks go back to the GPU before the capture: the VAE's cuDNN algorithm searches
    leave nothing behind in the pool); else a pool id). A later capture's warm-ups run in the pool:
    where a convolution shape is new to cuDNN (the step's first warm-up, unless a tuning step ran it
    before), its algorithm search's workspaces come from the pool's free memory and stay in the pool
    (empty_cache does not release a live MemPool's blocks). Kept so on purpose: the process's peak
    is then the weights + max(the pool's free memory, the warm-up's activations + the searches),
    where a warm-up outside the pool would add the two (a lower footprint between images, a higher
    peak in each process's first image; the peak is the memory goal).
    torch.cuda.graph empties the allocator's cache before capturing (the warm-up's activations in
    the general pool go back to the GPU); what the capture left in the general pool goes after it, so
    that between replays the GPU holds the weights and the graph's pool."""
    shared = pool if isinstance(pool, GraphPool) else None
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    if shared is not None:
        _blas_outside_pools(side, device)
    routing = shared.routing() if shared is not None and shared.captures else contextlib.nullcontext()
    with torch.cuda.stream(side), torch.inference_mode(), routing:
        for call in warm_up:
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph, pool=shared.id if shared is not None else pool, stream=side):
        out = fn()
    if shared is not None:
        shared.captures += 1
    torch.cuda.empty_cache()
    return graph, out


class StepGraph:
    def __init__(self, unet: Callable, *, n: int, latent_shape: tuple[int, int, int], context_shape: tuple[int, int],
                 rows: int, dtype: torch.dtype, device: torch.device, cuda_graph: bool = True, max_steps: int = 1000,
                 kv_tables: bool = True, sequential: bool = False, time_tables: bool = True,
                 step_kernels: bool = True, pool=None, kv_graph: bool = False, tune: bool = False,
                 kv_step: bool = False, on_tune: Callable[[], None] | None = None):
        self.unet, self.n, self.dtype, self.device = unet, n, dtype, torch.device(device)
        # tune (with a CUDA graph): before the capture, one eager step in a pm_kernels.tuning session,
        # where every tunable kernel call of a shape not yet measured on this GPU picks its fastest
        # implementation (once per GPU, software and shape: the choices are kept in a cache file)
        self.tune = bool(tune)
        self.on_tune = on_tune  # called as a tuning session starts measuring (the backend tells the user)
        self.sequential = bool(sequential)
        # the arithmetic around the UNet: pm_kernels' two kernels, or (False) their PyTorch references
        self._copies, self._update = ((pm_kernels.scaled_copies, pm_kernels.guided_update) if step_kernels else
                                      (pm_kernels.scaled_copies_reference, pm_kernels.guided_update_reference))
        self.indexed = bool(kv_tables) and hasattr(unet, "allocate_context_tables")
        # kv_step (with kv_tables, where the UNet can): two-row K/V buffers instead of a table row per
        # context: row 0 the negative prompt's (once per image, in load), row 1 the step's own context,
        # computed inside the step by one GEMM for K and one for V over every layer
        # (FastUNet.allocate_step_contexts); the UNet reads row 0 for the unconditional half, 1 for the other
        self.step_kv = self.indexed and bool(kv_step) and getattr(unet, "step_contexts_supported", lambda: False)()
        graphed = cuda_graph and graphs_available(self.device)
        # kv_graph (with a CUDA graph): the K/V tables are filled by a graph of their own, captured in
        # the step graph's pool, which also allocates them there; once the step is captured nothing
        # here holds them, so later captures in the pool (the VAE decode's) may reuse their memory
        # (dead after the last step; the fill graph rewrites them before the next image's first)
        self.kv_fill = None
        self._kv_in_graph = self.indexed and not self.step_kv and bool(kv_graph) and graphed
        if self.step_kv:
            unet.allocate_step_contexts(context_shape[0])
        elif self.indexed and not self._kv_in_graph:
            unet.allocate_context_tables(rows, context_shape[0])
        self.timed = bool(time_tables) and hasattr(unet, "allocate_time_tables")
        if self.timed:  # one row per step: (max_steps, sum of the ResNets' widths) in the UNet's dtype
            unet.allocate_time_tables(max_steps)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.x = torch.zeros((n, *latent_shape), **f32)        # the sample
        self.x0_prev = torch.zeros_like(self.x)                 # the previous step's x0 (DPM-Solver++ 2M)
        self.noise = torch.zeros_like(self.x)                   # this step's noise (euler-a, -sde)
        self.step = torch.zeros((), dtype=torch.int64, device=self.device)
        self.coef = torch.zeros((max_steps, len(COLUMNS)), **f32)
        self.clip = torch.full((), float("inf"), **f32)
        self.timesteps = torch.zeros(max_steps, **f32)
        self.input_scale = torch.zeros(max_steps, **f32)
        # the UNet batch's context rows per step: n x the negative prompt's row, then n x rows[i]
        self.kv_rows = torch.zeros((max_steps, 2 * n), dtype=torch.int64, device=self.device)
        self.cond_rows = torch.zeros(max_steps, dtype=torch.int64, device=self.device)  # kv_step: each step's context row
        self.c_k = torch.zeros((rows, *context_shape), dtype=dtype, device=self.device)  # negative prompt's rows first
        self.c_v = torch.zeros_like(self.c_k)
        self.guidance = torch.zeros((), **f32)
        self.max_steps, self.capacity = max_steps, rows
        self.pool = pool  # None: the step graph's own pool; a GraphPool: shared (warm-ups allocate from it too)
        self.graph = None
        if graphed:
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
        if self.step_kv:  # this step's context -> row 1 of the two-row K/V buffers
            cr = self.cond_rows.index_select(0, i)
            self.unet.set_step_contexts(self.c_k.index_select(0, cr), self.c_v.index_select(0, cr), 1)
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

        if self._kv_in_graph:
            rows, length = self.c_k.shape[:2]

            def fill():  # tables allocated inside the capture: in the pool, alive while the step is captured
                self.unet.allocate_context_tables(rows, length, empty=True)
                self.unet.set_contexts(self.c_k, self.c_v)

            self.kv_fill, _ = capture_graph(fill, self.device, warm_up=[fill, self.unet.drop_context_tables],
                                            pool=self.pool)
            self.kv_fill.replay()  # defined values for the step's warm-up (the contexts are zeros here)
        if self.tune and self.device.type == "cuda":
            self._tune(warm_up)
        self.graph, _ = capture_graph(self._step, self.device, warm_up=[warm_up] * WARMUP, pool=self.pool)
        if self._kv_in_graph:
            self.unet.drop_context_tables()  # the two graphs keep the addresses; the pool may reuse the memory

    def signature(self) -> str:
        """What the step's kernel calls depend on (their shapes, dtype, the UNet's options): the name
        of its pm_kernels.tuning session."""
        u = self.unet
        options = {k: getattr(u, k) for k in ("ff_chunk", "fused_epilogues", "geglu_gemm") if hasattr(u, k)}
        return (f"step {type(u).__name__} n={self.n} latent={tuple(self.x.shape[1:])} context={tuple(self.c_k.shape)} "
                f"{str(self.dtype).replace('torch.', '')} sequential={self.sequential} kv_tables={self.indexed} "
                f"time_tables={self.timed} kv_step={self.step_kv} "
                f"{' '.join(f'{k}={v}' for k, v in sorted(options.items()))}")

    def _tune(self, step) -> None:
        """One eager `step` in a tuning session on the warm-up stream (outside any memory pool's routing:
        the candidates' own timing graphs take pools of their own), unless this GPU's cache file has the
        step's signature as done already."""
        side = _side_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode(), \
                pm_kernels.tuning.session(self.signature(), self.device) as active:
            if active:
                if self.on_tune is not None:
                    self.on_tune()
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def refill(self) -> None:
        """Fill the K/V tables again from the contexts in place (after other graphs in a shared pool
        ran, e.g. before timing replays of the step alone); a no-op unless the fill is a graph."""
        if self.kv_fill is not None:
            self.kv_fill.replay()

    # ------------------------------------------------------------------ one image (group)
    def load(self, latents: np.ndarray, c_k: np.ndarray, c_v: np.ndarray, rows: np.ndarray, lin: LinearSteps,
             guidance: float, neg_rows: np.ndarray | None = None) -> None:
        """One image group's values into the buffers; `neg_rows` (steps,): the negative prompt's row of each
        step where it is scheduled (None: row 0; kv_step computes that row once, so it takes one row only)."""
        steps = lin.num_steps
        if steps > self.max_steps or len(c_k) > self.capacity:
            raise ValueError(f"{steps} steps / {len(c_k)} context rows exceed the step graph's "
                             f"{self.max_steps} / {self.capacity}")
        neg_rows = np.zeros(len(rows), np.int64) if neg_rows is None else np.asarray(neg_rows, np.int64)
        if self.step_kv and len(set(neg_rows.tolist())) > 1:
            raise ValueError("kv_step reads one negative-prompt row per image; a scheduled negative prompt needs "
                             "kv_step=False")
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
        rows, uncond = np.asarray(rows, np.int64)[:, None], neg_rows[:, None]
        if self.step_kv:  # the UNet reads row 0 (negative prompt) for the first n samples, row 1 (the step's) for the rest
            put(self.cond_rows, rows[:, 0])
            rows, uncond = np.ones_like(rows), np.zeros_like(uncond)
        put(self.kv_rows, np.concatenate([np.repeat(uncond, self.n, 1), np.repeat(rows, self.n, 1)], 1))
        put(self.c_k, c_k)
        put(self.c_v, c_v)
        if self.step_kv:  # the negative prompt's K/V, once (each step computes its own context's)
            r0 = int(neg_rows[0]) if len(neg_rows) else 0
            self.unet.set_step_contexts(self.c_k[r0:r0 + 1], self.c_v[r0:r0 + 1], 0)
        elif self.kv_fill is not None:  # K/V of every row of the buffers, once (its own graph)
            self.kv_fill.replay()
        elif self.indexed:
            self.unet.set_contexts(self.c_k[:len(c_k)], self.c_v[:len(c_v)])  # K/V of every context, once
        if self.timed:
            self.unet.set_timesteps(self.timesteps[:steps])  # every step's time vectors, once
        self.clip.fill_(lin.clip)
        self.guidance.fill_(float(guidance))

    def run(self, latents, c_k, c_v, rows, lin: LinearSteps, guidance: float, noise: np.ndarray | None,
            before_step: Callable[[int], None], after_step: Callable[[int], None],
            neg_rows: np.ndarray | None = None) -> np.ndarray:
        """The whole loop; returns the final latents (n, C, h, w) float32 on the host."""
        self.load(latents, c_k, c_v, rows, lin, guidance, neg_rows)
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
