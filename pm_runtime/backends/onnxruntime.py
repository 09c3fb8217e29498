"""onnxruntime backend: the bundle's ONNX graphs under an InferenceSession per network. No torch.

Devices (`--device`): cpu (default) -> CPUExecutionProvider; cuda[:N] -> CUDAExecutionProvider
(onnxruntime-gpu); dml[:N] / directml[:N] -> DmlExecutionProvider (onnxruntime-directml);
coreml -> CoreMLExecutionProvider (macOS builds). The CPU provider is always appended as the
fallback for ops the device provider lacks. A provider that this onnxruntime build does not
have is refused with the package that provides it. Only the CPU provider runs on this
project's machines; the others are written against onnxruntime's documented provider names
and options and are NOT RUN here.

Session settings: graph optimisation level (default "all": constant folding, fusions, and on
CPU the NCHWc layout transforms), intra-op threads (default: onnxruntime's own, one per
physical core), sequential execution, denormals as zero. Graph IO is float32 at every bundle precision (fp16
bundles are fp16 inside), so the loop feeds the same arrays to an fp32 or fp16 bundle.

Optimised-graph cache (`cache_dir`, opt-in; CPU provider only): the first session of a network
saves onnxruntime's optimised graph (weights as external data) under
CACHE/<component sha256>-ort<version>-<level>-<cpu>/, and later sessions load that file with
optimisation off. Creating the SD-1.5-shaped UNet session drops from ~5 s to ~1 s on a 2-core
CPU (the weights are memory-mapped, not copied), which is what makes low-memory mode
(load, run, free each network per image) cheap. "all"-level graphs hold CPU-specific layouts,
so the key includes onnxruntime's version and a hash of the CPU's model name and flags. A cache
entry that fails to load is deleted and rebuilt; entries are written to a temporary folder and
renamed, never half-written.

Denoising loop: on the CPU (and DirectML, CoreML) the host loop (numpy between UNet calls). With
the CUDA provider and a bundle that has the step graph (`step.onnx`, pm-export writes it), the
loop stays on the GPU: device_loop.denoise_on_device with OrtOps (OrtValues, IOBinding by
address). That path is NOT RUN on CUDA here; the identical code runs on the CPU device in
tests/test_device_loop.py and equals the host loop.
"""

from __future__ import annotations

import gc
import hashlib
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import formats as F
from ..bundle import Bundle
from ..errors import UserError
from ..specs import STEP
from .base import DTYPE_NOTE, Backend, DenoiseJob
from .device_loop import OrtOps, denoise_on_device

INSTALL_HINT = "onnxruntime is not installed: pip install 'personamagic-runtime[onnx]'"
OPT_LEVELS = ("all", "extended", "basic", "disabled")
# --device prefix -> (provider, what provides it)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu (pip install onnxruntime-gpu, CUDA 12)"),
    "dml": ("DmlExecutionProvider", "onnxruntime-directml (Windows: pip install onnxruntime-directml)"),
    "directml": ("DmlExecutionProvider", "onnxruntime-directml (Windows: pip install onnxruntime-directml)"),
    "coreml": ("CoreMLExecutionProvider", "onnxruntime's macOS build (pip install onnxruntime on macOS)"),
}


def require_onnxruntime():
    from ..interrupts import import_optional

    try:
        return import_optional("onnxruntime")  # a Ctrl-C during the import is not "not installed"
    except ImportError:
        raise UserError(INSTALL_HINT) from None


def providers_for(device: str | None, available: list[str]) -> list:
    """onnxruntime's `providers` argument for a --device string; UserError if not installed."""
    kind, _, index = (device or "cpu").lower().partition(":")
    if kind not in PROVIDERS:
        raise UserError(f"--device {device!r} is not an onnxruntime device; use cpu, cuda[:N], dml[:N] or coreml")
    if index and not index.isdigit():
        raise UserError(f"--device {device!r}: the device index must be a number")
    provider, package = PROVIDERS[kind]
    if provider not in available:
        raise UserError(f"--device {device}: this onnxruntime has no {provider} (it has {', '.join(available)}); "
                        f"install {package}")
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    options = {"device_id": int(index)} if index else {}
    return [(provider, options), "CPUExecutionProvider"]


class OrtNetwork:
    def __init__(self, session, output_names: list[str]):
        self.session = session
        self.output_names = output_names

    def run(self, inputs):
        outs = self.session.run(self.output_names, dict(inputs))
        return dict(zip(self.output_names, outs))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    component_format = "onnx"

    def __init__(self, bundle: Bundle, *, device: str | None = None, low_memory: bool = False,
                 threads: int | None = None, graph_optimization: str = "all", cache_dir: str | Path | None = None,
                 **_):
        super().__init__(bundle, device=device, low_memory=low_memory)
        self.ort = require_onnxruntime()
        if graph_optimization not in OPT_LEVELS:
            raise UserError(f"graph optimisation level must be one of {', '.join(OPT_LEVELS)}")
        if threads is not None and threads < 0:
            raise UserError("--threads must be >= 0 (0: onnxruntime's default)")
        self.providers = providers_for(device, self.ort.get_available_providers())
        self.threads = threads
        self.graph_optimization = graph_optimization
        self.precision = {c[F.CK_NETWORK]: c[F.CK_PRECISION] for c in bundle.components if c[F.CK_FORMAT] == "onnx"}
        cpu_only = self.providers == ["CPUExecutionProvider"]
        self.cache_dir = Path(cache_dir) if cache_dir is not None and cpu_only else None
        self.cache_hits: dict[str, int] = {}  # network -> sessions loaded from the cache

    @classmethod
    def unavailable(cls, bundle: Bundle, device: str | None = None, dtype: str | None = None, **_) -> str | None:
        if dtype is not None:
            return DTYPE_NOTE.format("onnxruntime")
        missing = cls.missing_networks(bundle)
        if missing:
            return f"the bundle has no ONNX {', '.join(missing)}"
        try:
            ort = require_onnxruntime()
            providers_for(device, ort.get_available_providers())
        except UserError as e:
            return str(e)
        return None

    def session_options(self):
        ort = self.ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[self.graph_optimization]
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Denormals flushed to zero: ~7% faster SD-1.5-shaped UNet steps on the 2-core CPU, same outputs
        # there (SD activations live far from 1e-38).
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        return opts

    def _device_provider(self) -> tuple[str, dict]:
        """(name, options) of the provider asked for first: the device's (the CPU provider follows it)."""
        first = self.providers[0]
        return (first, {}) if isinstance(first, str) else first

    def _session(self, path: Path, opts):
        try:
            sess = self.ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise UserError(f"onnxruntime could not load {path.name}: {str(e).splitlines()[0][:300]}") from None
        # A device provider that fails to start (onnxruntime-gpu without the CUDA / cuDNN libraries it
        # was built for) only logs a warning and leaves the session on the CPU: refused here, not run
        # slowly under the device's name (nor with the device loop's GPU buffers).
        want, _ = self._device_provider()
        if want != "CPUExecutionProvider" and want not in sess.get_providers():
            raise UserError(f"onnxruntime {self.ort.__version__} could not start {want} for {path.name} (it would run "
                            f"on the CPU): check that the GPU libraries its build needs are installed (CUDA and "
                            f"cuDNN for onnxruntime-gpu), or use --device cpu")
        return sess

    def _cached_session(self, network: str, path: Path):
        """The session from the optimised-graph cache, creating the entry on a miss."""
        comp = self.bundle.component(network, "onnx")
        key = f"{comp[F.CK_SHA256][:20]}-ort{self.ort.__version__}-{self.graph_optimization}-{cpu_key()}"
        entry = self.cache_dir / key
        cached = entry / "model.onnx"
        if cached.is_file():
            opts = self.session_options()
            opts.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimised
            try:
                sess = self._session(cached, opts)
                self.cache_hits[network] = self.cache_hits.get(network, 0) + 1
                return sess
            except UserError:
                shutil.rmtree(entry, ignore_errors=True)  # damaged entry: rebuild it below
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.cache_dir))
        except OSError as e:
            raise UserError(f"cannot write the onnxruntime cache {self.cache_dir}: {e.strerror or e}") from None
        try:
            opts = self.session_options()
            opts.optimized_model_filepath = str(tmp / "model.onnx")
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            sess = self._session(path, opts)
            try:
                os.replace(tmp, entry)
            except OSError:  # another process made the entry first
                pass
            return sess
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _load(self, network: str) -> OrtNetwork:
        path = self.bundle.component_path(network, "onnx")  # sha256 checked here, on first use
        if self.cache_dir is not None:
            sess = self._cached_session(network, path)
        else:
            sess = self._session(path, self.session_options())
        names = [o.name for o in sess.get_outputs()]
        want = self.specs[network].output_names
        if names != want or [i.name for i in sess.get_inputs()] != self.specs[network].input_names:
            raise UserError(f"{path.name} does not have the inputs/outputs of the {network} spec "
                            f"(outputs {names}, expected {want})")
        return OrtNetwork(sess, names)

    def denoise(self, unet, job: DenoiseJob) -> np.ndarray:
        """With the CUDA execution provider and the bundle's step graph: the loop on the GPU
        (device_loop.py with OrtOps: OrtValues on the GPU, IOBinding by address; NOT RUN, the CUDA
        provider cannot be installed on this project's machines; the same code runs on the CPU
        device in the tests). Otherwise (CPU, DirectML, CoreML, older bundles): the host loop."""
        name, options = self._device_provider()
        if name != "CUDAExecutionProvider" or not self.provides(STEP):
            return super().denoise(unet, job)
        with self.network(STEP) as step:
            return denoise_on_device(OrtOps(self.ort, "cuda", int(options.get("device_id", 0))), unet, step, job)

    def _free(self, net) -> None:
        net.engine = None
        gc.collect()  # the session's arena goes with the session object

    def describe(self) -> str:
        dev, _ = self._device_provider()
        prec = "/".join(sorted(set(self.precision.values())))
        return f"onnxruntime {self.ort.__version__} {dev} {prec}"


def cpu_key() -> str:
    """A short hash of what makes an "all"-level optimised graph CPU-specific."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            text += "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]
