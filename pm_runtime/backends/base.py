"""One small interface for every backend (STYLE: one engine file per backend, no `if` in the loop).

A backend turns a bundle's networks into `Network`s: named float32/int64/bool numpy arrays in,
named numpy arrays out, with the names, dtypes and shapes of pm_runtime.specs. The loop asks
for a network with `with backend.network(UNET) as unet:`; a backend in low-memory mode loads
the network on entry and frees it on exit (one network in memory at a time), otherwise the
first entry loads it and it stays. `loads` counts network creations (tests prove that switching
concepts reloads nothing).

Adding a backend = one file here with a `Backend` subclass and a line in BACKENDS. No torch.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import dataclasses
import importlib
import threading
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np

from .. import schedulers
from ..bundle import Bundle
from ..errors import UserError
from ..schedulers.common import Tables
from ..specs import NETWORKS, NetworkSpec, network_specs

# name -> "module:Class"; imported only when used, so a missing library never breaks the others.
BACKENDS = {
    "tensorrt": "pm_runtime.backends.tensorrt:TensorRTBackend",
    "torch-cuda": "pm_runtime.backends.torch_cuda:TorchCudaBackend",
    "onnxruntime": "pm_runtime.backends.onnxruntime:OnnxRuntimeBackend",
    "torch": "pm_runtime.backends.torch:TorchBackend",
}
# --backend auto tries these in this order and takes the first that can run the bundle here
# (torch-cuda only where CUDA is present and the bundle has its torch weights).
AUTO_ORDER = ("tensorrt", "torch-cuda", "onnxruntime", "torch")
# the exported-graph backends' answer to a dtype option (Backend.unavailable)
DTYPE_NOTE = "--dtype is for the PyTorch backends (torch-cuda, torch): {} runs the precision the bundle was exported in"


class Network(Protocol):
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class CheckedNetwork:
    """Checks names, dtypes and axis ranges against the spec before calling the engine: a wrong
    feed fails with the network and tensor named, not deep inside an engine."""

    def __init__(self, engine: Network, spec: NetworkSpec):
        self.engine, self.spec = engine, spec

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.spec
        if set(inputs) != set(spec.input_names):
            raise ValueError(f"{spec.name}: inputs {sorted(inputs)} != {sorted(spec.input_names)}")
        axes: dict[str, int] = {}
        for t in spec.inputs:
            a = inputs[t.name]
            if a.dtype != np.dtype(t.dtype) or a.ndim != len(t.shape):
                raise ValueError(f"{spec.name}.{t.name}: got {a.dtype}{list(a.shape)}, spec {t.dtype}{list(t.shape)}")
            for d, n in zip(t.shape, a.shape):
                if isinstance(d, int) and d != n or isinstance(d, str) and axes.setdefault(d, n) != n:
                    raise ValueError(f"{spec.name}.{t.name}: shape {list(a.shape)} does not fit {list(t.shape)}")
        spec.axis_values(**{k: v for k, v in axes.items() if k in spec.axes})  # range check
        return self.engine.run(inputs)


@dataclasses.dataclass
class DenoiseJob:
    """One group of images' denoising loop, as the pipeline hands it to a backend.

    Per step i: the UNet runs once on [uncond; cond] (2n rows): the unconditional half reads
    context row neg_row(i) (the negative prompt: row 0 unless it is scheduled), the conditional half
    row rows[i]; then
    o = uncond + guidance * (cond - uncond) and the scheduler step (explicit state; noise(i) for
    samplers that need it)."""

    latents: np.ndarray                 # (n, C, h, w) float32, already scaled by init_noise_sigma
    c_k: np.ndarray                     # (rows, L, D) float32 key contexts; the negative prompt's rows first
    c_v: np.ndarray                     # (rows, L, D) float32 value contexts
    rows: np.ndarray                    # (steps,) int: the conditional context row of each step
    tables: Tables
    guidance: float
    noise: Callable[[int], np.ndarray] | None  # step -> (n, C, h, w) standard normal; None if unused
    before_step: Callable[[int], None]  # called before every step (raises to cancel)
    after_step: Callable[[int], None]   # called after every step (progress)
    # (steps,) int: the unconditional context row of each step, where prompt editing schedules the
    # negative prompt; None: row 0 at every step
    neg_rows: np.ndarray | None = None

    def neg_row(self, i: int) -> int:
        return 0 if self.neg_rows is None else int(self.neg_rows[i])

    def pairs(self) -> list[tuple[int, int]]:
        """(unconditional row, conditional row) of every step."""
        return [(self.neg_row(i), int(r)) for i, r in enumerate(self.rows)]


def denoise_on_host(unet: "CheckedNetwork", job: DenoiseJob) -> np.ndarray:
    """The loop with numpy between steps: one `unet.run` per step, guidance and scheduler step
    on the host. Returns the final latents (n, C, h, w)."""
    n, tables = job.latents.shape[0], job.tables
    pairs = job.pairs()
    per_row = {}  # (uncond row, cond row) -> (c_k, c_v) of the UNet batch [uncond; cond], (2n, L, D) each
    for u, r in sorted(set(pairs)):
        per_row[u, r] = tuple(np.concatenate([np.repeat(c[u:u + 1], n, 0), np.repeat(c[r:r + 1], n, 0)])
                              for c in (job.c_k, job.c_v))
    x, state = job.latents, None
    for i in range(tables.num_steps):
        job.before_step(i)
        ck, cv = per_row[pairs[i]]
        xin = schedulers.scale_model_input(i, x, tables)
        out = unet.run({"sample": np.concatenate([xin, xin]),
                        "timestep": np.full(2 * n, tables.timesteps[i], np.float32),
                        "c_k": ck, "c_v": cv})["noise_pred"]  # (2n, C, h, w)
        uncond, cond = out[:n], out[n:]
        eps = uncond + np.float32(job.guidance) * (cond - uncond)
        x, state = schedulers.step(i, eps, x, state, job.noise(i) if job.noise else None, tables)
        job.after_step(i)
    return x


class Backend(abc.ABC):
    """Base of every backend. Subclasses implement `_load` (and may override `close`)."""

    name = "?"
    component_format: str | None = None  # the bundle component format this backend runs (onnx, tensorrt, ...)
    tiles_vae = False  # True: the backend decodes in tiles itself in low-memory mode (else the pipeline does)
    decode_batch: int | None = None  # latents per VAE decoder call (None: a whole group of images at once)

    def __init__(self, bundle: Bundle, *, device: str | None = None, low_memory: bool = False):
        self.bundle = bundle
        self.device = device
        self.low_memory = bool(low_memory)
        self.vae_tiling = self.low_memory  # decode above 512 px in tiles (bounded memory, blended seams)
        self.log = None  # a callable(str) for notes the user should see (Pipeline.load(log=...) sets it)
        self.specs = network_specs(bundle.dims)
        self.loads: collections.Counter[str] = collections.Counter()  # network -> creations
        self._cache: dict[str, CheckedNetwork] = {}
        self._lock = threading.Lock()

    @classmethod
    def missing_networks(cls, bundle: Bundle) -> list[str]:
        """The required networks the bundle has no component for in this backend's format."""
        return [n for n in NETWORKS if not any(c["network"] == n and c["format"] == cls.component_format
                                               for c in bundle.components)]

    @classmethod
    def unavailable(cls, bundle: Bundle, **options) -> str | None:
        """None when this backend can run `bundle` here (library, files, device), else why not."""
        return None

    @abc.abstractmethod
    def _load(self, network: str) -> Network:
        """Create the engine for `network` (text_encoder | unet | vae_decoder)."""

    def describe(self) -> str:
        """One line for the log and the PNG: backend, device, precision."""
        return self.name

    def provides(self, network: str) -> bool:
        """Whether this backend can run `network`: the three networks always (checked when the
        backend was chosen); an optional one (the safety checker) when the bundle has it in this
        backend's format."""
        if network in NETWORKS:
            return True
        return any(c["network"] == network and c["format"] == self.component_format for c in self.bundle.components)

    def resident(self, network: str) -> bool:
        """Whether `network` stays loaded between uses: every network, or none in low-memory mode
        (a backend may keep some networks and free others)."""
        return not self.low_memory

    @contextlib.contextmanager
    def network(self, name: str) -> Iterator[CheckedNetwork]:
        keep = self.resident(name)
        with self._lock:
            net = self._cache.get(name)
            if net is None:
                net = CheckedNetwork(self._load(name), self.specs[name])
                self.loads[name] += 1
                if keep:
                    self._cache[name] = net
        try:
            yield net
        finally:
            if not keep:
                self._free(net)
                del net

    def denoise(self, unet: CheckedNetwork, job: DenoiseJob) -> np.ndarray:
        """Run `job` with the UNet network `unet`; returns the final latents (n, C, h, w) float32.
        Default: the host loop. GPU backends override it to keep the loop on the device."""
        return denoise_on_host(unet, job)

    def _free(self, net: CheckedNetwork) -> None:
        """Low-memory mode: release an engine now (subclasses free device memory here)."""
        net.engine = None

    def device_memory(self) -> dict | None:
        """This process's peak device memory so far ({"peak_allocated_gib", "peak_reserved_gib"}) where
        the backend can tell (torch-cuda on a GPU); None elsewhere."""
        return None

    def close(self) -> None:
        with self._lock:
            for net in self._cache.values():
                self._free(net)
            self._cache.clear()


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def select_backend(bundle: Bundle, requested: str = "auto", prefer: str | None = None,
                   **options) -> tuple[type[Backend], str]:
    """(backend class, why). `requested` is a name or "auto"; with "auto", `prefer` (e.g. from a
    .plan or .onnx named on the command line) is tried first, then AUTO_ORDER. Each backend's
    `unavailable(bundle, **options)` returns None when it can run the bundle here, else the reason
    (with "auto" it also gets auto=True: a backend may run only when asked for, as torch-cuda on a CPU);
    a named backend that cannot run raises that reason (with its install hint) as a UserError."""
    if requested != "auto":
        cls = backend_class(requested)
        reason = cls.unavailable(bundle, **options)
        if reason:
            raise UserError(f"backend {requested}: {reason}")
        return cls, f"backend: {requested} (asked for)"
    order = ([prefer] if prefer else []) + [n for n in AUTO_ORDER if n != prefer]
    # first what auto prefers; if none, one that runs here when asked for (torch-cuda's eager CPU path)
    for auto in (True, False):
        skipped = []
        for name in order:
            cls = backend_class(name)
            reason = cls.unavailable(bundle, auto=auto, **options)
            if reason is None:
                if not auto:
                    return cls, f"backend: {name} (auto: the only one that can run this bundle here)"
                why = f"; skipped {'; '.join(skipped)}" if skipped else ""
                return cls, f"backend: {name} (auto, order {', '.join(order)}{why})"
            skipped.append(f"{name}: {reason}")
    raise UserError("no backend can run this bundle here: " + "; ".join(skipped))
