"""One description per exported network (STYLE: TensorRT demo model classes, optimum export configs).

Export (torch.onnx dynamic axes), validation (fresh random inputs), the TensorRT build
(optimisation profiles) and the runtime (buffer shapes) all read these specs: the shape
arithmetic is written once, here. numpy only, no torch.

Dtypes are numpy names. Graph inputs and outputs stay float32 at every precision (fp16 bundles
convert the inside of the graph and keep float32 IO), so a spec does not depend on precision.
A shape entry is an int (fixed) or the name of an axis; named axes are dynamic, with min/opt/max
values; a derived axis is a fixed multiple of another (the VAE's image side = 8 x latent side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .schedulers.linear import COLUMNS as LINEAR_COLUMNS

TEXT_ENCODER = "text_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"
NETWORKS = (TEXT_ENCODER, UNET, VAE_DECODER)
SAFETY_CHECKER = "safety_checker"  # optional: exported when the model folder has one
# optional: the VAE's encoder half (img2img: an init image to latents), exported from pm-export 0.5 on
VAE_ENCODER = "vae_encoder"
OPTIONAL_NETWORKS = (SAFETY_CHECKER, VAE_ENCODER)
# The guidance + scheduler update of one step (pm_runtime/schedulers/linear.py's affine form) as a
# graph of its own: GPU backends run it between UNet calls so the loop never leaves the device
# (pm_runtime/backends/device_loop.py). pm-export ships it with every ONNX bundle (step.onnx) and
# builds it with TensorRT plans (step.plan).
STEP = "step"
# the step graph's `coef` row: linear.COLUMNS (10), then guidance, x0 clamp (inf: none), and the
# input scale of the NEXT step's UNet input (1 after the last step)
STEP_COEF_COLUMNS = (*LINEAR_COLUMNS, "guidance", "clip", "next_input_scale")
CHECKER_SIDE = 224  # the safety checker's CLIP input side (SD's checker: CLIP ViT-L/14 at 224 px)

# Image sides the UNet and VAE engines accept: 256..1024 px in steps of 64 (latent 32..128, step 8).
MIN_IMAGE, OPT_IMAGE, MAX_IMAGE, IMAGE_STEP = 256, 512, 1024, 64


# Long prompts: a text takes up to MAX_PROMPT_CHUNKS chunks of L tokens; the contexts of one UNet call are
# brought to one length by repeating each one's chunks (exact for attention: a key and its value repeated
# r times leave softmax-weighted sums as they were), to the least common multiple of their chunk counts,
# which for counts 1..4 is at most 12: the UNet's context axis goes up to CONTEXT_CHUNKS * L.
MAX_PROMPT_CHUNKS = 4
CONTEXT_CHUNKS = 12


def prompt_chunks(context_chunks: int) -> int:
    """The most chunks a text may take for a UNet whose context goes up to `context_chunks` chunks: the
    largest c <= MAX_PROMPT_CHUNKS with lcm(1..c) <= context_chunks (1 for bundles before 0.3)."""
    c = 1
    while c < MAX_PROMPT_CHUNKS and math.lcm(*range(1, c + 2)) <= context_chunks:
        c += 1
    return c


@dataclass(frozen=True)
class ModelDims:
    """Facts about the base model that fix the specs' constant sizes (read from its configs)."""

    text_dim: int  # D: CLIP hidden size (768 for SD 1.x, 1024 for SD 2.x)
    max_length: int = 77  # L: tokenizer model_max_length / text position embeddings
    vocab_size: int = 49408  # base vocabulary (placeholder tokens are never looked up: see text_encoder)
    latent_channels: int = 4
    vae_scale_factor: int = 8  # image side / latent side
    # the UNet's context length in chunks of L (long prompts, prompt_encoding): 1 in bundles before
    # pm-export 0.3 (context fixed at L), CONTEXT_CHUNKS since
    context_chunks: int = 1

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelDims":
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class Axis:
    min: int
    opt: int
    max: int
    multiple_of: int = 1

    def check(self, name: str, value: int) -> None:
        if not (self.min <= value <= self.max and value % self.multiple_of == 0):
            raise ValueError(f"{name}={value} outside {self.min}..{self.max} (multiple of {self.multiple_of})")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, int64, bool
    shape: tuple  # int (fixed) or axis name (dynamic)
    # Range of dummy values: uniform [low, high) when given (ints: token ids), else standard normal.
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: dict[str, Axis]  # dynamic axes with their ranges
    derived: dict[str, tuple[str, int]] = field(default_factory=dict)  # axis -> (source axis, factor)
    doc: str = ""

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def axis_values(self, which: str = "opt", **given: int) -> dict[str, int]:
        """Every axis (derived ones included) at min/opt/max, overridden by `given`, range-checked."""
        unknown = set(given) - set(self.axes)
        if unknown:
            raise ValueError(f"{self.name} has no axis {sorted(unknown)}; axes: {sorted(self.axes)}")
        values = {n: int(given.get(n, getattr(a, which))) for n, a in self.axes.items()}
        for n, a in self.axes.items():
            a.check(n, values[n])
        for n, (src, factor) in self.derived.items():
            values[n] = values[src] * factor
        return values

    def shape(self, tensor: TensorSpec, values: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else values[d] for d in tensor.shape)

    def input_shapes(self, which: str = "opt", **given: int) -> dict[str, tuple[int, ...]]:
        values = self.axis_values(which, **given)
        return {t.name: self.shape(t, values) for t in self.inputs}

    def output_shapes(self, which: str = "opt", **given: int) -> dict[str, tuple[int, ...]]:
        values = self.axis_values(which, **given)
        return {t.name: self.shape(t, values) for t in self.outputs}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input: (min shape, opt shape, max shape)}: a TensorRT optimisation profile."""
        lo, mid, hi = (self.input_shapes(w) for w in ("min", "opt", "max"))
        return {n: (lo[n], mid[n], hi[n]) for n in self.input_names}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes: {tensor: {dim index: axis name}}."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs) if any(isinstance(d, str) for d in t.shape)}

    def dummy_inputs(self, rng: np.random.Generator, which: str = "opt", **given: int) -> dict[str, np.ndarray]:
        """Random inputs of the right names, dtypes and shapes (values from the `rng`, see _fill)."""
        shapes = self.input_shapes(which, **given)
        return {t.name: _fill(t, shapes[t.name], rng) for t in self.inputs}

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "axes": {n: {"min": a.min, "opt": a.opt, "max": a.max, "multiple_of": a.multiple_of}
                         for n, a in self.axes.items()},
                "derived_axes": {n: {"axis": s, "factor": f} for n, (s, f) in self.derived.items()}}


def _fill(t: TensorSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if t.dtype == "bool":
        return rng.random(shape) < 0.1  # a few concept positions
    if t.dtype.startswith("int"):
        return rng.integers(int(t.low or 0), int(t.high), size=shape).astype(t.dtype)
    if t.high is not None:
        return rng.uniform(t.low or 0.0, t.high, size=shape).astype(t.dtype)
    return rng.standard_normal(shape).astype(t.dtype)


def network_specs(dims: ModelDims) -> dict[str, NetworkSpec]:
    L, D, C, s = dims.max_length, dims.text_dim, dims.latent_channels, dims.vae_scale_factor
    lat = Axis(MIN_IMAGE // s, OPT_IMAGE // s, MAX_IMAGE // s, IMAGE_STEP // s)  # latent side
    f32 = "float32"
    text = NetworkSpec(
        TEXT_ENCODER,
        inputs=(TensorSpec("input_ids", "int64", ("batch", L), 0, dims.vocab_size),
                TensorSpec("concept_embeds", f32, ("batch", L, D)),  # E[t] rows at concept positions
                TensorSpec("bypass", f32, ("batch", L, D)),  # B[t] rows at concept positions
                TensorSpec("concept_mask", "bool", ("batch", L))),  # True at the K placeholders
        outputs=(TensorSpec("c_k", f32, ("batch", L, D)), TensorSpec("c_v", f32, ("batch", L, D))),
        # one call per image: ~22 distinct contexts + the negative prompt (DESIGN §2)
        axes={"batch": Axis(1, 24, 64)},
        doc="equilibrium text encoder; ids at masked positions are ignored (looked up as id 0)")
    # the context: L positions, or (long prompts) any multiple of L up to context_chunks of them
    ctx = L if dims.context_chunks == 1 else "context_length"
    unet = NetworkSpec(
        UNET,
        inputs=(TensorSpec("sample", f32, ("batch", C, "latent_height", "latent_width")),
                TensorSpec("timestep", f32, ("batch",), 0, 1000),  # may be fractional
                TensorSpec("c_k", f32, ("batch", ctx, D)), TensorSpec("c_v", f32, ("batch", ctx, D))),
        outputs=(TensorSpec("noise_pred", f32, ("batch", C, "latent_height", "latent_width")),),
        # batch 2 = one image with classifier-free guidance
        axes={"batch": Axis(1, 2, 8), "latent_height": lat, "latent_width": lat,
              **({} if ctx == L else {"context_length": Axis(L, L, L * dims.context_chunks, L)})},
        doc="UNet with split K/V cross-attention (keys from c_k, values from c_v)")
    vae = NetworkSpec(
        VAE_DECODER,
        inputs=(TensorSpec("latent", f32, ("batch", C, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", f32, ("batch", 3, "image_height", "image_width")),),
        axes={"batch": Axis(1, 1, 4), "latent_height": lat, "latent_width": lat},
        derived={"image_height": ("latent_height", s), "image_width": ("latent_width", s)},
        doc="VAE decoder; takes the scheduler's latent (1/scaling_factor applied inside), image in [-1, 1]")
    encoder = NetworkSpec(
        VAE_ENCODER,
        inputs=(TensorSpec("image", f32, ("batch", 3, "image_height", "image_width"), -1.0, 1.0),),
        outputs=(TensorSpec("latent", f32, ("batch", C, "latent_height", "latent_width")),),
        # batch: one init image per generation (2: the exporter's check runs a second size; a TensorRT
        # context's activation block is sized for the largest)
        axes={"batch": Axis(1, 1, 2), "latent_height": lat, "latent_width": lat},
        derived={"image_height": ("latent_height", s), "image_width": ("latent_width", s)},
        doc="VAE encoder; image in [-1, 1] -> the latent distribution's mean x scaling_factor (the sampler's space)")
    checker = NetworkSpec(
        SAFETY_CHECKER,
        inputs=(TensorSpec("clip_input", f32, ("batch", 3, CHECKER_SIDE, CHECKER_SIDE)),),  # CLIP-preprocessed
        outputs=(TensorSpec("nsfw_score", f32, ("batch",)),),  # > 0: flagged (diffusers' has_nsfw_concepts)
        axes={"batch": Axis(1, 2, 8)},  # opt 2: the exporter traces at opt shapes (a 1 would be baked in)
        doc="Stable Diffusion's safety checker: max over concepts of (cosine - threshold [+ 0.01 special care])")
    latent = (C, "latent_height", "latent_width")
    step = NetworkSpec(
        STEP,
        inputs=(TensorSpec("noise_pred", f32, ("unet_batch", *latent)),  # the UNet's output: [uncond; cond]
                TensorSpec("sample", f32, ("batch", *latent)),
                TensorSpec("x0_prev", f32, ("batch", *latent)),  # the previous step's x0 (zeros at step 0)
                TensorSpec("noise", f32, ("batch", *latent)),  # standard normal (euler-a), else zeros
                TensorSpec("coef", f32, (len(STEP_COEF_COLUMNS),))),
        outputs=(TensorSpec("prev_sample", f32, ("batch", *latent)), TensorSpec("x0", f32, ("batch", *latent)),
                 TensorSpec("unet_sample", f32, ("unet_batch", *latent))),  # next UNet input [s x; s x]
        axes={"batch": Axis(1, 1, 4), "latent_height": lat, "latent_width": lat},
        derived={"unet_batch": ("batch", 2)},
        doc="guidance combine + scheduler update (affine, schedulers/linear.py) + the next UNet input")
    return {n.name: n for n in (text, unet, vae, encoder, checker, step)}
