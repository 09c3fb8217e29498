"""Every export validates itself (STYLE: optimum): the ONNX graph under onnxruntime (CPU) against
the PyTorch module, on FRESH random inputs, at several shapes per network.

Difference measures, per output, maximised over outputs and shapes:
  max_abs = max |onnx - torch|
  max_rel = max_abs / max |torch|      (relative to the output's scale; elementwise ratios blow
                                        up where the reference crosses zero)
A check passes when max_abs <= atol + rtol * max |torch|, and for the precisions in PSNR_MIN (an
image output) when the image's PSNR against PyTorch's is at least that: psnr_db = 10 log10(1 / mse)
of both images as the pipeline maps them (clip(x / 2 + 0.5, 0, 1)). Over tolerance is a UserError
with the numbers, so the export exits non-zero and leaves no bundle.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pm_runtime.errors import UserError
from pm_runtime.specs import SAFETY_CHECKER, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, NetworkSpec

# (atol, rtol). Measured (random weights, CPU provider): fp32 max abs <= 6e-6 (tiny) and <= 1.2e-5
# (SD-1.5-shaped); fp16 max abs <= 1.3e-2 on both, rel (to the output's max) <= 1e-2 (SD-1.5 UNet).
# A broken graph (wrong cast, NaN, wrong input wiring) is off by O(1).
# int8: weights (and, in dynamic modes, activations) rounded to 8 bits: a per-call drift of ~1% of
# the output's range is expected (benchmarks/results/int8-cpu.jsonl reports whole-trajectory drift).
# int8-static (pm-export --int8 static-qdq): activations rounded on FIXED calibrated ranges, so
# outliers are clipped: checked on held-out recorded inputs, the tiny model's first step (t=999)
# is off by up to 8% of the output's range elementwise (0.137 of 1.7); 2-3% at later steps.
# int8-vae (pm-export --int8-vae): the VAE decoder's convolutions int8 with calibrated ranges, checked on a
# held-out latent: elementwise, single pixels move by up to ~0.23 of the [-1, 1] range (SD-1.5-shaped
# random decoder, 29/255, a one-off A/B); the image as a whole is what matters, so the check is its PSNR
# (41.8-42.7 dB there; 42.4 dB at its SD-1.5-shaped export), the elementwise limit only catches a
# broken graph (off by O(1) everywhere).
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2), "int8": (5e-2, 5e-2), "int8-static": (1e-1, 1e-1),
              "int8-vae": (0.5, 0.5)}
PSNR_MIN = {"int8-vae": 30.0}  # dB: the GPU issue's own floor for an fp16 image


def validation_shapes(spec: NetworkSpec) -> list[dict[str, int]]:
    """Axis values to test: the smallest legal sizes plus a second, non-square shape (cheap on CPU)."""
    if spec.name in (TEXT_ENCODER, SAFETY_CHECKER):
        return [{"batch": 1}, {"batch": 3}]
    lat = spec.axes["latent_height"]
    small, other = lat.min, lat.min + lat.multiple_of
    if spec.name == UNET:  # the second with a long prompt's context (2 chunks) where the UNet takes one
        ctx = spec.axes.get("context_length")
        return [{"batch": 2, "latent_height": small, "latent_width": small},
                {"batch": 1, "latent_height": other, "latent_width": other + lat.multiple_of,
                 **({"context_length": 2 * ctx.min} if ctx else {})}]
    if spec.name == VAE_DECODER:
        return [{"batch": 1, "latent_height": small, "latent_width": other}]
    if spec.name == VAE_ENCODER:  # batch 2: the traced batch is 1
        return [{"batch": 2, "latent_height": small, "latent_width": other}]
    return [{}]


@dataclass(frozen=True)
class Check:
    network: str
    precision: str
    axes: dict[str, int]
    max_abs: float
    max_rel: float
    ref_max: float
    atol: float
    rtol: float
    seed: int
    psnr_db: float | None = None  # image outputs (VAE decoder): PSNR of the pipeline's image
    psnr_min: float | None = None  # the precision's floor (PSNR_MIN), None: no PSNR decision

    @property
    def limit(self) -> float:
        return self.atol + self.rtol * self.ref_max

    @property
    def ok(self) -> bool:
        psnr_ok = self.psnr_min is None or (self.psnr_db is not None and self.psnr_db >= self.psnr_min)
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.limit and psnr_ok

    def to_dict(self) -> dict:
        psnr = {"psnr_db": self.psnr_db, "psnr_min_db": self.psnr_min} if self.psnr_min is not None else {}
        return {"precision": self.precision, "axes": dict(self.axes), "max_abs": self.max_abs,
                "max_rel": self.max_rel, "ref_max_abs": self.ref_max, "atol": self.atol, "rtol": self.rtol,
                "limit": self.limit, **psnr, "seed": self.seed, "passed": self.ok}

    def describe(self) -> str:
        shape = ",".join(f"{k}={v}" for k, v in self.axes.items())
        psnr = f", image {self.psnr_db:.1f} dB (at least {self.psnr_min:g})" if self.psnr_min is not None else ""
        return (f"{self.network} {self.precision} [{shape}]: max abs {self.max_abs:.3g}, "
                f"max rel {self.max_rel:.3g} (limit {self.limit:.3g}){psnr}")


def image_psnr(got: np.ndarray, want: np.ndarray) -> float:
    """PSNR (dB) of two decoder outputs in [-1, 1] as the pipeline maps them to [0, 1] images;
    inf where they are equal, -inf where `got` is not finite."""
    if not np.isfinite(got).all():
        return float("-inf")
    a, b = (np.clip(np.asarray(x, np.float64) / 2 + 0.5, 0, 1) for x in (got, want))
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(1 / mse))


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feed_axes(spec: NetworkSpec, feeds: dict) -> dict[str, int]:
    """Axis values of a given feed (the spec's named dims read off the input shapes)."""
    axes: dict[str, int] = {}
    for inp in spec.inputs:
        for dim, size in zip(inp.shape, np.shape(feeds[inp.name])):
            if isinstance(dim, str) and dim in spec.axes:
                axes[dim] = int(size)
    return axes


def compare(module: torch.nn.Module, spec: NetworkSpec, onnx_path: Path, precision: str,
            seed: int | None = None, shapes: list[dict[str, int]] | None = None,
            feeds: list[dict] | None = None) -> list[Check]:
    """Run both on fresh random inputs at each shape (or on the given `feeds`, e.g. recorded
    from a denoising run: the static int8 graph's ranges are calibrated for real inputs, and
    random ones fall outside them); no tolerance decision here."""
    atol, rtol = TOLERANCES[precision]
    seed = secrets.randbits(31) if seed is None else seed  # fresh inputs, recorded so they can be replayed
    rng = np.random.default_rng(seed)
    sess = ort_session(onnx_path)
    checks = []
    cases = ([(_feed_axes(spec, f), f) for f in feeds] if feeds is not None
             else [(axes, None) for axes in shapes or validation_shapes(spec)])
    for axes, given in cases:
        feeds_now = given if given is not None else spec.dummy_inputs(rng, "opt", **axes)
        got = sess.run(spec.output_names, feeds_now)
        with torch.no_grad():
            want = module(*(torch.from_numpy(np.ascontiguousarray(feeds_now[n])) for n in spec.input_names))
        want = [want] if isinstance(want, torch.Tensor) else list(want)
        max_abs, max_rel, ref_max, psnr = 0.0, 0.0, 0.0, None
        for g, w in zip(got, want):
            w = w.float().numpy()
            if g.shape != w.shape:
                raise UserError(f"{spec.name}: ONNX output shape {g.shape} differs from PyTorch's {w.shape}")
            diff = float(np.abs(g.astype(np.float64) - w).max())
            scale = float(np.abs(w).max())
            diff = diff if np.isfinite(g).all() else float("inf")
            max_abs, ref_max = max(max_abs, diff), max(ref_max, scale)
            max_rel = max(max_rel, diff / max(scale, 1e-12))
            if precision in PSNR_MIN:
                psnr = image_psnr(g, w) if psnr is None else min(psnr, image_psnr(g, w))
        checks.append(Check(spec.name, precision, dict(axes), max_abs, max_rel, ref_max, atol, rtol, seed,
                            psnr, PSNR_MIN.get(precision)))
    return checks


def validate(module: torch.nn.Module, spec: NetworkSpec, onnx_path: Path, precision: str,
             log: Callable[[str], None] = lambda m: None, feeds: list[dict] | None = None) -> list[Check]:
    """compare() + the decision (decide)."""
    return decide(compare(module, spec, onnx_path, precision, feeds=feeds), log)


def decide(checks: list[Check], log: Callable[[str], None] = lambda m: None) -> list[Check]:
    """Every check is logged; any over tolerance raises a UserError with the numbers."""
    for c in checks:
        log(f"  validated {c.describe()}")
    bad = [c for c in checks if not c.ok]
    if bad:
        raise UserError("validation failed: " + "; ".join(c.describe() for c in bad))
    return checks
