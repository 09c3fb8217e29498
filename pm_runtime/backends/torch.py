"""PyTorch backend: the reference. The same loop runs on the ORIGINAL modules of the model folder
(diffusers UNet with split K/V attention, the equilibrium text encoder, the VAE decoder),
wrapped with exactly the signatures of pm_runtime.specs (the wrappers pm-export traces).

It needs torch, diffusers and transformers (the `train` extra) and the base model folder
(`--model`): the bundle records only the folder's name. The folder's fingerprint must equal the
bundle's. Device and dtype are parameters (default cpu, float32); low-memory mode is ignored
here (the modules are loaded together, as the reference generator loads them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import formats as F
from ..bundle import Bundle
from ..errors import UserError
from ..resources import warn_emulated_16bit
from .base import Backend

INSTALL_HINT = "the torch backend needs PyTorch: pip install torch, then pip install 'personamagic-runtime[train]'"
DTYPES = ("float32", "float16", "bfloat16")


class DeviceArray:
    """A network output left where it was computed (a torch tensor on the run device) that still
    reads as a float32 numpy array (np.asarray copies it to the host, once): a backend that can
    consume it in place (torch-cuda's step graph) skips the round trip through host memory."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.float32)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self._host = None

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        if self._host is None:
            self._host = self.tensor.float().cpu().numpy()
        return self._host if dtype is None else self._host.astype(dtype)

    def all_finite(self) -> bool:
        """The NaN/inf check where the values are (one bool comes back)."""
        import torch

        return bool(torch.isfinite(self.tensor).all())

    def emphasised(self, weights: np.ndarray, normalize: bool = True) -> "DeviceArray":
        """prompt_encoding.apply_emphasis where the values are: (rows, L, D) times the (rows, L) weights,
        each weighted row scaled back to its mean before (float32 arithmetic); a new DeviceArray."""
        import torch

        z = self.tensor.float()  # a copy where the tensor is fp16, else the same tensor: written below only
        w = torch.as_tensor(weights, dtype=torch.float32, device=z.device)  # via the new tensors
        changed = (w != 1).any(dim=1)
        weighted = z * w[:, :, None]
        if normalize:
            scale = z.mean(dim=(1, 2), dtype=torch.float64) / weighted.mean(dim=(1, 2), dtype=torch.float64)
            weighted = weighted * scale.float()[:, None, None]
        out = torch.where(changed[:, None, None], weighted, z)  # rows without weights: bit for bit
        return DeviceArray(out.to(self.tensor.dtype))

    def regrouped(self, index: np.ndarray) -> "DeviceArray":
        """(chunks, L, D) -> (rows, N * L, D), row r the chunks index[r] (N of them) one after the other
        (pipeline._regroup where the values are); a new DeviceArray."""
        import torch

        t = self.tensor[torch.as_tensor(index, device=self.tensor.device)]  # (rows, N, L, D)
        return DeviceArray(t.reshape(len(index), -1, t.shape[-1]))


class TorchNetwork:
    def __init__(self, module, input_names, output_names, device, dtype, device_outputs: bool = False,
                 masked_inputs: dict | None = None):
        self.module, self.input_names, self.output_names = module, input_names, output_names
        self.device, self.dtype = device, dtype
        self.device_outputs = device_outputs  # outputs as DeviceArray (left on the device) instead of numpy
        # input -> the boolean input that says where it is read: only those entries are uploaded (zeros
        # elsewhere, which the network never reads): the text encoder's concept embeddings and bypass
        self.masked_inputs = masked_inputs or {}

    def _upload(self, name, inputs):
        import torch

        a = np.ascontiguousarray(inputs[name])
        mask_name = self.masked_inputs.get(name)
        if mask_name is None:
            return torch.from_numpy(a).to(self.device)
        mask = np.asarray(inputs[mask_name], bool)
        out = torch.zeros(a.shape, dtype=torch.from_numpy(a[:0]).dtype, device=self.device)
        if mask.any():
            rows = torch.from_numpy(np.ascontiguousarray(a[mask])).to(self.device)
            out[torch.from_numpy(mask).to(self.device)] = rows
        return out

    def device_inputs(self, inputs) -> list:
        """The module's arguments on the device, floating point ones in the run dtype."""
        args = []
        for n in self.input_names:
            t = self._upload(n, inputs)
            args.append(t.to(self.dtype) if t.is_floating_point() else t)
        return args

    def call(self, args) -> tuple:
        """The module on device arguments: its outputs as a tuple (call under inference_mode)."""
        import torch

        outs = self.module(*args)
        return (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)

    def outputs(self, outs, copy: bool = False) -> dict:
        """name -> output: a DeviceArray (copied on the device first when `copy`: a buffer that the next
        call overwrites) or a float32 numpy array."""
        if self.device_outputs:
            return {n: DeviceArray(o.clone() if copy else o) for n, o in zip(self.output_names, outs)}
        return {n: o.float().contiguous().cpu().numpy() for n, o in zip(self.output_names, outs)}  # any layout

    def run(self, inputs):
        import torch

        with torch.inference_mode():
            args = self.device_inputs(inputs)
            return self.outputs(self.call(args))


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle: Bundle, *, device: str | None = None, low_memory: bool = False,
                 model: Path | str | None = None, dtype: str | None = None, **_):
        super().__init__(bundle, device=device, low_memory=False)
        reason = self.unavailable(bundle, model=model, device=device)
        if reason:
            raise UserError(reason)
        import torch

        from ..modeling.graphs import graph_modules  # the wrappers that were exported and validated

        from ..modeling.loading import load_base_model

        self.dtype_name = dtype or "float32"
        if self.dtype_name not in DTYPES:
            raise UserError(f"torch backend dtype must be one of {', '.join(DTYPES)}")
        self.torch_device = torch.device(device or "cpu")
        self.torch_dtype = getattr(torch, self.dtype_name)
        self.cpu_dtype_note = warn_emulated_16bit(self.torch_device.type, self.dtype_name)  # 16-bit, no CPU units
        base = load_base_model(Path(model), with_safety_checker=True)
        if base.fingerprint != bundle.fingerprint:
            raise UserError(f"the model folder {model} is not the base model of this bundle (fingerprint mismatch)")
        self.model_dir = Path(model)
        self.modules = {n: m.to(self.torch_device, self.torch_dtype) for n, m in graph_modules(base).items()}

    @classmethod
    def unavailable(cls, bundle: Bundle, model=None, device: str | None = None, **_) -> str | None:
        from ..interrupts import import_optional

        try:
            torch = import_optional("torch")  # a Ctrl-C during the import is not "not installed"
        except ImportError:
            return INSTALL_HINT
        kind = (device or "cpu").split(":")[0]
        if kind not in ("cpu", "cuda") or kind == "cuda" and not torch.cuda.is_available():
            return f"--device {device} is not available to PyTorch here (use cpu, or cuda with a CUDA build of torch)"
        if model is None:
            folder = bundle.manifest.get(F.BK_BASE_MODEL, {}).get(F.BM_MODEL_FOLDER, "the base model folder")
            return f"the torch backend runs the original model: give --model (the {folder!r} folder)"
        if not Path(model).is_dir():
            return f"model folder not found: {model}"
        return None

    def provides(self, network: str) -> bool:
        return network in self.modules

    def _load(self, network: str) -> TorchNetwork:
        spec = self.specs[network]
        return TorchNetwork(self.modules[network], spec.input_names, spec.output_names, self.torch_device,
                            self.torch_dtype)

    def describe(self) -> str:
        import torch

        return f"torch {torch.__version__} {self.torch_device} {self.dtype_name}"
