"""torch-cuda backend: the GPU fast path (DESIGN §3).

- Weights from the bundle's optional "torch" components (pm-export --target torch: fp16
  safetensors), or from the base model folder (model=...) when the bundle has none.
- The UNet is pm_runtime.modeling.fast_unet.FastUNet: channels-last, fp16, fused kernels
  (pm_kernels: Triton on CUDA GPUs of compute capability 7.0+, their PyTorch references elsewhere).
- The WHOLE denoising step (UNet on [uncond; cond], guidance combine, scheduler update in its
  affine form, pm_runtime.schedulers.linear) runs on static device buffers and is captured once
  as a CUDA graph (pm_runtime.modeling.step_graph); the step counter lives on the device, so a
  50-step image is 50 graph replays with nothing copied to or from the host in between, and one
  NaN/inf check at the end of the loop.
- Every step's contexts come from the pipeline's one batched text-encoder call; they stay on the
  device (DeviceArray: NaN check there, copied device-to-device into the step graph; on an H200
  the text-encoder stage went 10.5 -> 7.2 ms with it and the masked inputs below).
- low_memory: one network on the GPU at a time and a tiled VAE decode. Every network's weights
  rest in pinned host memory (_Parked: one copy per storage, so FastUNet's fused Q/K/V and its
  views stay one copy; the UNet's convolution weights already channels-last) and are copied to the
  GPU for their stage, then dropped (never copied back: they do not change); the step graph is
  re-captured per image; the UNet's feed-forward runs in token chunks (ff_chunk, FF_CHUNK tokens:
  fewer activations at large images, NOT MEASURED on a GPU yet).
  On an integrated GPU (unified_memory: Jetson boards, whose GPU memory is the host's DRAM) nothing
  is parked, in low-memory mode or by the offload options: a host copy would free nothing and the
  stage's device copy would be a second one (UNet: 1.72 + 1.72 GB at once instead of 1.72). The
  weights stay where they loaded; low-memory mode keeps the rest (each stage's graphs and
  activations freed after it, sequential guidance, feed-forward chunks, tiled decode).
  park_weights=True / False overrides the choice. NOT RUN on an integrated GPU (none was reachable):
  the rule is tested on the CPU with the property forced.
- The networks are pm_runtime.modeling.standalone's (torch only: this backend never imports
  diffusers or transformers, most of a new process's start) where they cover the config;
  hf_modules=True (or a config they do not cover) uses the diffusers/transformers classes. The
  weight files are hashed in background threads while they load (Bundle.verifying).
- vae_graph (opt-in; measured on an H200 only together with offload_text_encoder, where it did not
  lower the first image's peak below offload_text_encoder's alone): the VAE decode is captured as a CUDA graph per
  latent shape in the step graph's memory pool, so the decoder's activations reuse the UNet
  step's (both run in turn, never together): the steady-state footprint holds the larger of the
  two, not their sum (the first image still needs the decoder's eager warm-up on top). Without
  CUDA it runs eagerly.
- int8_weights (opt-in): the UNet's linear and convolution weights as per-output-channel int8,
  dequantized layer by layer as they run (pm_runtime.modeling.int8_weights): about half the UNet's
  memory (H200: first-image peak 2.91 -> 2.05 GB allocated), step 7.09 -> 8.00 ms, image 55.7 dB
  against the fp16 one (random weights).
- kv_tables: on by default (H200: 7.09 ms per step against 7.20 without), off by default in
  low-memory mode. With kv_step (default on; NOT MEASURED on a GPU yet) they are two rows per
  layer: the negative prompt's K/V computed once per image, the step's own context's inside the
  step by ONE GEMM for K and one for V over every cross-attention layer's concatenated weights
  (FastUNet.allocate_step_contexts; the layers' weights become views of them, no copy), 7.7 MB in
  fp16 at SD 1.5 widths; kv_step=False: a row per context, filled once per image (>= 32 rows of
  3.84 MB: 123 MB, 246 MB for the 50-odd contexts of a 50-step image, which the H200 measured as
  0.23 GB of the first image's peak), no GEMM in the step. Variant torch-cuda-kv-tables. int8
  weights keep the per-context tables.
- vae_tiling: decode above 512 px in blended 512 px tiles (default: in low-memory mode, as every
  backend). False decodes in one piece (exact): with the standalone decoder's fused GroupNorm+SiLU
  a 1024 px decode's activations are ~1.0 GiB in fp16 (benchmarks/live_memory.py), below the
  low-memory UNet stage's fp16 weights + activations, so at <= 1024 px the tiles may not lower the
  process peak at all: measured by the GPU check (torch-cuda-low-memory-1024-untiled), not here.
- vae_bands (opt-in; H200: the first image's peak 2.91 -> 2.63 GB allocated, the decode 16 -> 62 ms
  with 32-row bands): the standalone VAE decoder's full-resolution end
  in row bands of this many rows (pm_runtime.modeling.vae_bands: exact, GroupNorm statistics of the
  whole tensor; the last upsampler's output never exists whole): at 512 px in fp16 its activations
  go from 256 to 211 MiB with 32-row bands, by benchmarks/live_memory.py's count (from 320 when
  bands were measured: the plain decoder's blocks have since stopped holding their dead inputs).
- sequential_guidance: the step runs the UNet's unconditional and conditional halves as two
  calls one after the other instead of one batch (half the activation memory, some step time);
  the default in low-memory mode. Low-memory mode with its defaults was measured on an H200 (1.89 GB
  allocated / 1.96 GB reserved at 512 px); these two defaults' own share of that was not.
- offload_safety_checker (default on; NOT MEASURED on a GPU yet): the safety checker (a CLIP
  ViT-L/14 vision tower, ~0.6 GB in fp16, called once per image) rests in pinned host memory and is
  copied to the GPU for its call only, as offload_text_encoder does for the text encoder.
- fused_epilogues (default on; NOT MEASURED on a GPU yet): FastUNet runs the ResNets' convolutions
  (and conv_in's and the resamplers', whose biases the next ResNet adds: fast_unet.input_shifts)
  without their biases (PyTorch adds a cuDNN convolution's bias in a separate pass) and folds them
  into the time vector and one residual kernel; residual add + LayerNorm in one kernel; the
  standalone VAE decoder's ResNets the same way (their residual written into conv2's output). Counted:
  fewer kernels per UNet call (benchmarks/launch_count.py); whether the step gets faster is for the
  GPU check (variant torch-cuda-unfused-epilogues). Default off on a CPU in bfloat16/float16: there,
  without Triton, the epilogues' PyTorch paths add in fp32 copies of the activations (2-core Xeon with
  AMX, bfloat16, 512 px: UNet step 1.90-2.05 -> 1.60-1.64 s, VAE decode 4.4 -> 3.5 s).
- time_tables (default on; NOT MEASURED on a GPU yet): every ResNet's time-embedding vector of
  every step computed once per image (FastUNet.set_timesteps); the step reads its row (variant
  torch-cuda-no-time-tables).
- te_graph (default on; NOT MEASURED on a GPU yet): the text encoder's call captured as a CUDA graph
  per input shape (its own small memory pool; not when its weights are parked in host memory):
  the 185 kernels a call launches from Python (SD 1.5's text encoder on the standalone modules,
  counted on the meta device by benchmarks/launch_count.py) become one replay (the stage took 7.2 ms on an
  H200, diffusers' text encoder alone 3.35 ms). Variant torch-cuda-no-te-graph.
- step_kernels (default on; NOT MEASURED on a GPU yet): the step's arithmetic around the UNet
  (input scale/cast/copies; guidance + the scheduler update) as two pm_kernels kernels instead of
  ~30 PyTorch ops (False: those ops, their references).
- gn_impl ("tuned" default | "tiled" | "grouped" | "auto", NOT MEASURED on a GPU yet): which of
  pm_kernels' Triton GroupNorms the UNet runs (fewer kernel launches per GroupNorm with "grouped";
  "auto" uses it where one launch covers a group; "tuned": per shape as measured, tune above, else
  "tiled"); process-wide.
- shared_pool (opt-in; NOT MEASURED on a GPU yet): ONE memory pool (modeling.step_graph.GraphPool:
  a torch.cuda.MemPool) for every CUDA graph of the backend, the eager warm-ups after the first
  capture allocating from it too (torch.cuda.use_mem_pool; the first capture's warm-up runs in the
  general pool, given back before the capture, so that the VAE's cuDNN algorithm searches leave
  nothing behind in the pool; the step's, where its shapes are new to cuDNN and no tuning step ran
  them first, carve from the pool's free memory and stay in it: a lower first-image peak than
  running them outside, see step_graph.capture_graph), so that the pool holds the largest of the networks' activations
  (the VAE decode's, 256 MiB at 512 px in fp16) instead of each graph's pool and the warm-ups'
  cached blocks side by side. The largest come first: with each new step graph the VAE decode of
  one latent is captured before it (the allocator carves later, smaller blocks out of the free big
  ones, never the reverse); then (with kv_step=False; kv_step's two-row buffers are 7.7 MB) the K/V
  tables, allocated by a graph of their own (the fill, one flat buffer) and let go once the step is
  captured, so the decode reuses their memory too (the
  tables are dead after the last step and rewritten by the fill before the next image's first);
  the text encoder runs eagerly in the first image and is captured into the pool from the second.
  Networks parked in host memory (offload_text_encoder, the safety checker) copy their weights into
  the pool's memory for their stage once it exists (nothing in it is alive between replays but the
  graphs' static outputs): with offload_text_encoder the text encoder's 0.25 GB then borrow the
  decode's memory instead of adding to the peak (by count: UNet + VAE weights + ~0.26 GiB).
  Safe because these graphs replay one at a time in a fixed order and each one's outputs are copied
  out (or were held alive through the captures after it) before another replays. Counted without a
  GPU, the whole-pipeline floor is then the weights + ~256 MiB; what the allocator really reserves
  (block rounding, cuDNN's workspaces, the warm-ups' algorithm searches) is for the GPU check
  (variants torch-cuda-shared-pool, -shared-pool-offload-te).
- tune (default on; NOT MEASURED on a GPU yet): where a kernel call has several implementations
  (attention: SDPA, SDPA with cuDNN's or the memory-efficient attention first, the Triton kernel in a few launch
  configurations; the feed-forward's GEGLU projection: cuBLAS + the GEGLU kernel, or the GEGLU in a
  Triton GEMM; GroupNorm: tiled or grouped), the one that runs for a shape is the fastest measured on
  this GPU (pm_kernels.tuning): before a step graph's first capture of a shape, one eager step in a
  tuning session times each candidate of each call not yet measured as a CUDA graph of a few calls
  (after checking its output against the untuned default's) and keeps the fastest; the choices
  persist in a cache file per GPU and software (PM_KERNELS_TUNE_DIR; default
  ~/.cache/pm_kernels/tuning), so only a new process on a new GPU, software version or shape pays
  for it (the cold start; the warm start reads the file). A session measures for at most
  PM_KERNELS_TUNE_BUDGET_S seconds (default 120); calls it reaches later run their default and are
  measured by the next process. False, or PM_KERNELS_TUNE=0: every call's
  untuned default (the routing rules in pm_kernels). Variant torch-cuda-untuned.
- geglu_gemm (None: tuned; True / False force one; True NOT MEASURED on a GPU yet): the
  feed-forward's GEGLU computed in the epilogue of its projection's GEMM (pm_kernels.geglu_linear, a
  Triton GEMM) instead of cuBLAS's projection then the GEGLU kernel: the (tokens, 8 x width)
  projection is never written (42 MB per 64x64 layer at 512 px, batch 2). Variant
  torch-cuda-geglu-gemm; kernel benchmark op geglu_linear.
- vae_channels_last (default on; NOT MEASURED on a GPU yet): the VAE decoder's convolution weights in
  the channels-last layout on CUDA, as the UNet's (its activations follow: cuDNN's NHWC
  convolutions, pm_kernels' coalesced channels-last GroupNorm path); before, the decoder ran NCHW
  (H200: 15.8 ms per 512 px decode). Variant torch-cuda-vae-nchw. On a CPU in bfloat16/float16 too
  (oneDNN's fast layout; with the epilogues off, 512 px decode 3.5 -> 1.4 s on the Xeon above); fp32
  on a CPU, the tests' run, stays NCHW.
- one_stream (opt-in; NOT MEASURED on a GPU yet): every network stage's CUDA work on the stream the
  graphs are warmed up and captured on, not the default stream: PyTorch keeps a cuBLAS workspace
  (32 MiB on Hopper) for each stream cuBLAS ever ran on, and the eager work (the K/V and time
  tables, a parked text encoder) put one on the default stream besides the capture stream's.
- offload_text_encoder (opt-in): the text encoder's weights rest in pinned host memory and are
  copied to the GPU for the one encoding call per image, then dropped (~0.25 GB of fp16 SD-1.5
  weights fewer on the GPU while the UNet and VAE run; H200: first-image peak 2.91 -> 2.66 GB
  allocated, image 0.386 -> 0.387 s; each in its own process).

Where CUDA is missing, --backend auto skips it; with --device cpu it runs the same code eagerly
with the kernels' PyTorch paths (how it is tested on CPUs), in fp32 by default; auto takes it there
only with a dtype or when no other backend can run the bundle (onnxruntime's fp32 is faster than
this path's). dtype="bfloat16" on a CPU with bfloat16 units is faster than onnxruntime's fp32 where
measured: the fastest CPU path on a Xeon with AMX, within 10% of the int8 bundle at 256 px on an AMD
EPYC with AVX512-BF16 (README: CPUs with bfloat16 units); on an x86 CPU without them it runs emulated
(3.6x slower than fp32 where measured; float16 9x) and loading warns (cpu_dtype_note); the UNet stays channels-last on the CPU too (oneDNN's fast
convolutions read NHWC, and FastUNet's transformer blocks return it).
- cpu_packed_convs (default on; CPU only): the UNet blocks' and the VAE decoder's convolution
  weights reordered into oneDNN's blocked layout once, at their first call, instead of at every call
  (pm_runtime/modeling/cpu_convs.py: the UNet's deep layers' reorder cost more than their
  convolution; the VAE gains less, 3.78 -> 3.33 s per 512 px bfloat16 decode on a 2-core EPYC, one-off timing). Float32
  and bfloat16, not with low-memory parking, int8 weights or vae_bands; where oneDNN's packed
  operators are missing or disagree with F.conv2d in a probe, the plain convolutions run
  (packed_convs_note says why). False: plain convolutions (the A/B).
Module import needs no torch (the runtime's torch line): torch is imported when it is used.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from .. import formats as F
from .. import resources
from ..bundle import Bundle
from ..errors import UserError
from ..specs import NETWORKS, OPTIONAL_NETWORKS, SAFETY_CHECKER, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from .base import Backend, DenoiseJob
from .torch import TorchNetwork  # numpy in, numpy out around a module on the device

INSTALL_HINT = ("the torch-cuda backend needs PyTorch with CUDA (and diffusers + transformers for a --model folder "
                "or networks its standalone modules do not cover): install the CUDA "
                "build of torch, then pip install 'personamagic-runtime[train,kernels]'")
TORCH_FORMAT = "torch"
FF_CHUNK = 2048  # low-memory mode's feed-forward chunk, in tokens (FastUNet.ff_chunk; 4096 tokens at 512 px)


def _has_torch_weights(bundle: Bundle) -> bool:
    return not TorchCudaBackend.missing_networks(bundle)


class TorchCudaBackend(Backend):
    name = "torch-cuda"
    component_format = TORCH_FORMAT
    # one latent per VAE decode: its activations (~256 MiB per 512 px image in fp16) are the pipeline's
    # largest, and grow with the batch; one 512 px decode is already a large amount of convolution
    # work (not measured per batch size: the GPU check times the decode of one image)
    decode_batch = 1

    def __init__(self, bundle: Bundle, *, device: str | None = None, low_memory: bool = False,
                 model: Path | str | None = None, dtype: str | None = None, cuda_graph: bool = True,
                 kernels: bool = True, kv_tables: bool | None = None, sdpa: str | None = None,
                 offload_text_encoder: bool = False, vae_graph: bool = False, hf_modules: bool = False,
                 int8_weights: bool = False, sequential_guidance: bool | None = None, cudnn_benchmark: bool = True,
                 offload_safety_checker: bool = True, vae_tiling: bool | None = None, vae_bands: int | None = None,
                 ff_chunk: int | None = None, gn_impl: str | None = None, fused_epilogues: bool | None = None,
                 time_tables: bool = True, step_kernels: bool = True, te_graph: bool = True,
                 shared_pool: bool = False, one_stream: bool = False, vae_channels_last: bool = True,
                 geglu_gemm: bool | None = None, tune: bool = True, kv_step: bool = True,
                 park_weights: bool | None = None, cpu_packed_convs: bool = True, **_):
        super().__init__(bundle, device=device, low_memory=low_memory)
        reason = self.unavailable(bundle, model=model, device=device)
        if reason:
            raise UserError(reason)
        import torch

        self.torch_device = torch.device(device or "cuda")
        on_cuda = self.torch_device.type == "cuda"
        self.dtype_name = dtype or ("float16" if on_cuda else "float32")
        if self.dtype_name not in ("float16", "bfloat16", "float32"):
            raise UserError("torch-cuda dtype must be float16, bfloat16 or float32")
        self.torch_dtype = getattr(torch, self.dtype_name)
        # where the CPU computes this 16-bit type only by emulation: said once per load (pm-run: "warning: ...")
        self.cpu_dtype_note = resources.warn_emulated_16bit(self.torch_device.type, self.dtype_name)
        if vae_tiling is not None:  # default: tiles in low-memory mode (Backend)
            self.vae_tiling = bool(vae_tiling)
        from ..modeling.step_graph import graphs_available

        self.cuda_graph = bool(cuda_graph) and graphs_available(self.torch_device)
        self.kernels = bool(kernels)
        self.int8_weights = bool(int8_weights)
        if self.int8_weights and not self.kernels:
            raise UserError("int8 weights run in the fast UNet (kernels on): drop kernels=False")
        # per-image cross-attention K/V tables (FastUNet only): rows x 16 layers x 2 x L x inner
        # values (>= 123 MB in fp16 at SD 1.5 widths): off by default in low-memory mode
        self.kv_tables = (not self.low_memory) if kv_tables is None else bool(kv_tables)
        # with kv_tables: two-row K/V buffers (the negative prompt's, the step's own context's, computed
        # in the step by one GEMM for K and one for V over every layer) instead of a row per context
        self.kv_step = bool(kv_step)
        # the unconditional and conditional UNet halves one after the other (half the activations;
        # the default in low-memory mode, where memory matters more than the step time)
        self.sequential_guidance = self.low_memory if sequential_guidance is None else bool(sequential_guidance)
        # the UNet's feed-forward in token chunks (FastUNet.ff_chunk): the default in low-memory mode;
        # 0 turns it off
        if ff_chunk is not None and int(ff_chunk) < 0:
            raise UserError(f"ff_chunk must be a token count >= 1 (0: off), got {ff_chunk}")
        self.ff_chunk = (FF_CHUNK if self.low_memory else None) if ff_chunk is None else (int(ff_chunk) or None)
        if sdpa not in (None, "flash", "cudnn", "efficient"):
            raise UserError(f"sdpa must be flash, cudnn or efficient, got {sdpa!r}")
        self.sdpa = sdpa  # PyTorch SDPA backend preferred for self-attention (None: PyTorch's choice)
        # 16-bit on a CPU (no Triton there): the fastest way (see fused_epilogues and vae_channels_last above)
        cpu_16 = not on_cuda and self.dtype_name != "float32"
        self.fused_epilogues = (not cpu_16) if fused_epilogues is None else bool(fused_epilogues)  # FastUNet's
        self.geglu_gemm = None if geglu_gemm is None else bool(geglu_gemm)  # FastUNet.geglu_gemm (None: tuned)
        # pm_kernels.tuning: per shape, the fastest of a computation's implementations as measured on this GPU
        # (one eager step in a tuning session before a shape's first capture, once per GPU and software:
        # the choices persist in a cache file); False: every kernel call's untuned default
        import pm_kernels

        self.tune = bool(tune) and pm_kernels.tuning.enabled()
        self.time_tables = bool(time_tables)  # per-image time-embedding tables (StepGraph / FastUNet)
        self.step_kernels = bool(step_kernels)  # the step's arithmetic around the UNet in two kernels (StepGraph)
        if gn_impl is not None:  # which Triton GroupNorm the UNet's graph captures (a process-wide setting)
            import pm_kernels

            try:
                pm_kernels.set_group_norm_impl(gn_impl)
            except ValueError as e:
                raise UserError(f"gn_impl: {e}") from None
        if on_cuda:  # fixed shapes per image: time cuDNN's convolution algorithms once per shape (a process-wide
            # setting; False: its heuristics, no timing runs in a new process's first image)
            torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
        # weights parked in host memory (low-memory mode, the offload options); not where the GPU's memory IS
        # the host's (an integrated GPU: Jetson boards), where a host copy frees nothing and the device copy
        # for the stage is a second one: there the weights stay put (see the docstring)
        self.unified_memory = unified_memory(self.torch_device)
        self.park_weights = (not self.unified_memory) if park_weights is None else bool(park_weights)
        park = self.park_weights
        self.home = self.torch_device if not (self.low_memory and park) else torch.device("cpu")  # where weights rest
        self.offload_text_encoder = bool(offload_text_encoder) and not self.low_memory and park
        self.offload_safety_checker = bool(offload_safety_checker) and not self.low_memory and park
        self.vae_graph = bool(vae_graph) and self.cuda_graph and not self.low_memory
        self.te_graph = bool(te_graph) and self.cuda_graph  # (a parked text encoder is never graphed: _load)
        # one memory pool for every CUDA graph of the backend, warm-ups included (see the docstring)
        self.shared_pool = bool(shared_pool) and self.cuda_graph and not self.low_memory
        self._pool = None  # the current GraphPool (shared_pool), made with the step graph
        # every CUDA call of a network stage on the graphs' warm-up/capture stream (see network())
        self.one_stream = bool(one_stream) and self.torch_device.type == "cuda"
        # the VAE decoder's weights (and so its activations) channels-last on CUDA, as the UNet's
        self.vae_channels_last = bool(vae_channels_last) and (on_cuda or cpu_16)
        # on a CPU: the UNet's and VAE's convolution weights reordered for oneDNN once, not per call (cpu_convs);
        # network -> how many, from its first load on (packed_convs_note: why none, where none were)
        self.cpu_packed_convs = bool(cpu_packed_convs) and self.torch_device.type == "cpu"
        self._packed_convs: dict[str, int] = {}
        self.packed_convs_note: str | None = None
        self._graphed: list = []  # the _GraphedNetworks of the loaded networks
        self.hf_modules = bool(hf_modules)  # False: pm_runtime.modeling.standalone's networks where they fit
        # networks whose weights rest in host memory (parked below): loaded there directly; the VAE encoder
        # (img2img: one call per image) always where parking is on, off the UNet's and decoder's memory
        self.on_host = ({TEXT_ENCODER} if self.offload_text_encoder else set()) | (
            {SAFETY_CHECKER} if self.offload_safety_checker else set()) | (
            {VAE_ENCODER} if park and not self.low_memory else set())
        self.modules = self._load_modules(bundle, model)
        self._unet_layout()
        for m in self.modules[VAE_DECODER].modules():  # the standalone VAE's ResNets (FastUNet's: per load)
            if hasattr(m, "fused_epilogues"):
                m.fused_epilogues = self.fused_epilogues
        # low-memory VAE tiling: inside diffusers' module (graphs.tiled_decoding), or by the pipeline
        # (pm_runtime/vae_tiles.py) for the standalone decoder
        self.tiles_vae = hasattr(self.modules[VAE_DECODER].vae, "use_tiling")
        if vae_bands:
            vae = self.modules[VAE_DECODER].vae
            if not hasattr(vae, "band_rows") or int(vae_bands) < 1:
                raise UserError("vae_bands needs a row count >= 1 and the standalone VAE decoder (not hf_modules=True, "
                                "and a VAE config it covers)")
            vae.band_rows = int(vae_bands)
        self._parked = {}  # network -> _Parked: weights in (pinned) host memory, on the device only in use
        if self.low_memory and park:  # every network, each on the device only for its stage
            self._parked = {n: _Parked(m, self.torch_device, channels_last=n == UNET or (
                n == VAE_DECODER and self.vae_channels_last)) for n, m in self.modules.items()}
        else:
            self._parked = {n: _Parked(self.modules[n], self.torch_device) for n in self.on_host if n in self.modules}
        self._loops: dict = {}  # (n, C, h, w, L, D, rows capacity, max steps, kv_step) -> StepGraph

    # ------------------------------------------------------------------ availability and loading
    @classmethod
    def unavailable(cls, bundle: Bundle, model=None, device: str | None = None, dtype: str | None = None,
                    auto: bool = False, **_) -> str | None:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return INSTALL_HINT
        if not _has_torch_weights(bundle) and any(importlib.util.find_spec(m) is None
                                                  for m in ("diffusers", "transformers")):
            return INSTALL_HINT
        import torch

        kind = (device or "cuda").split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available to PyTorch here" + (" (--device cpu runs it on the CPU, eagerly)"
                                                                    if device is None else "")
        if kind not in ("cuda", "cpu"):
            return f"--device {device}: torch-cuda runs on cuda (or cpu, eagerly)"
        if kind == "cpu" and auto and dtype is None:  # fp32 eager on a CPU: slower than onnxruntime's
            return ("on a CPU, auto leaves it to onnxruntime unless --dtype is given (e.g. bfloat16 on CPUs "
                    "with AMX or AVX512-BF16) or --backend torch-cuda is named")
        if not _has_torch_weights(bundle):
            if model is None:
                return ("the bundle has no torch weights (export with pm-export --target onnx,torch) and no "
                        "--model folder was given")
            if not Path(model).is_dir():
                return f"model folder not found: {model}"
        return None

    def _load_modules(self, bundle: Bundle, model) -> dict:
        """Graph modules (pm_runtime.modeling.graphs) at their resting place, in the run dtype."""
        if _has_torch_weights(bundle):
            from ..modeling.bundle_weights import load_graph_module

            out = {}
            optional = [n for n in OPTIONAL_NETWORKS if any(c[F.CK_NETWORK] == n and c[F.CK_FORMAT] == TORCH_FORMAT
                                                           for c in bundle.components)]
            nets = [*NETWORKS, *optional]
            # the files' sha256 are computed while they load; leaving the block checks them (before any use)
            with bundle.verifying([(n, TORCH_FORMAT) for n in nets]) as paths:
                for net in nets:
                    comp = bundle.component(net, TORCH_FORMAT)
                    # the standalone UNet is FastUNet's parameter tree: without our kernels, diffusers' UNet runs
                    standalone = not self.hf_modules and (net != UNET or self.kernels)
                    out[net] = load_graph_module(net, comp.get(F.CK_DETAILS, {}), paths[(net, TORCH_FORMAT)],
                                                 self._load_place(net), self.torch_dtype, standalone=standalone)
            if self.int8_weights:
                out[UNET] = self._quantized_unet(out[UNET])
            return out
        from ..modeling.graphs import graph_modules
        from ..modeling.loading import load_base_model, quiet_hf

        base = load_base_model(Path(model), with_safety_checker=True)
        if base.fingerprint != bundle.fingerprint:
            raise UserError(f"the model folder {model} is not the base model of this bundle (fingerprint mismatch)")
        with quiet_hf():  # diffusers warns on any dtype cast through .to()
            out = {n: m.to(self._load_place(n), self.torch_dtype) for n, m in graph_modules(base).items()}
        if self.int8_weights:
            out[UNET] = self._quantized_unet(out[UNET])
        return out

    def _load_place(self, network: str):
        """Where `network`'s weights are loaded: host memory for networks parked there and for a UNet
        about to be quantized (layer by layer, _quantized_unet), else where they rest (self.home)."""
        import torch

        if network in self.on_host or (network == UNET and self.int8_weights):
            return torch.device("cpu")
        return self.home

    def _runs_fast(self, graph_module) -> bool:
        """Whether the UNet graph module runs as FastUNet: loaded as its parameter tree (the standalone
        UNet, int8 weights), or diffusers' UNet with kernels on and a config FastUNet supports."""
        from ..modeling.fast_unet import FastUNet, unsupported

        return isinstance(graph_module, FastUNet) or (self.kernels and not unsupported(graph_module.unet))

    def _unet_layout(self) -> None:
        """The UNet that will run as FastUNet channels-last from the start, on every device: cuDNN's and
        oneDNN's fast convolutions read NHWC, and FastUNet's transformer blocks hand their output back in
        it (measured on a 2-core Xeon with AMX, SD-1.5 shapes at 256 px: 2.30 -> 1.72 s per fp32 step,
        0.76 -> 0.51 s in bfloat16, the NCHW run converting weights in every call). Done once here, so
        no stage load copies the weights (an integrated GPU's resident UNet keeps its storage; a parked
        one keeps the layout, _Parked restores each tensor's strides)."""
        import torch

        if self._runs_fast(self.modules[UNET]):
            self.modules[UNET].unet.to(memory_format=torch.channels_last)

    def _quantized_unet(self, graph_module):
        """FastUNet with int8 weights (pm_runtime.modeling.int8_weights) from the UNet loaded in host
        memory: each layer is quantized on the run device and kept where the weights rest, so the
        device never holds the whole fp16 UNet."""
        from ..modeling.fast_unet import FastUNet, unsupported
        from ..modeling.int8_weights import quantize_unet_

        if not isinstance(graph_module, FastUNet):
            reason = unsupported(graph_module.unet)
            if reason:
                raise UserError(f"int8 weights need the fast UNet, which does not support this UNet: {reason}")
            graph_module = FastUNet(graph_module.unet)
        self.int8_stats = quantize_unet_(graph_module, self.torch_device, self.home)  # all of it at home then
        return graph_module

    def resident(self, network: str) -> bool:
        return super().resident(network) and network not in self._parked

    def _load(self, network: str):
        import torch

        spec = self.specs[network]
        module = self.modules[network]
        if network in self._parked:
            self._attach(network)
        if network == UNET:
            module = self._fast_unet(module)
        elif network == VAE_DECODER:
            if self.vae_channels_last and network not in self._parked:  # (parked: at rest in that layout)
                module.to(memory_format=torch.channels_last)
            self._pack_convs(VAE_DECODER, (module,))  # (after the layout: the packed weights keep no other)
            if self.vae_tiling and self.tiles_vae:
                from ..modeling.graphs import tiled_decoding

                tiled_decoding(module)
        # the text encoder's contexts stay on the device (the step graph copies them in place), and of
        # its (rows, L, D) concept-embedding and bypass inputs only the rows at concept positions go up
        te = network == TEXT_ENCODER
        net = TorchNetwork(module, spec.input_names, spec.output_names, self.torch_device, self.torch_dtype,
                           device_outputs=te, masked_inputs={"concept_embeds": "concept_mask",
                                                             "bypass": "concept_mask"} if te else None)
        if network == VAE_DECODER and self.shared_pool:  # captured with the step graph (denoise)
            net = _GraphedNetwork(net, self._shared, needs_pool=True, name=network)
        elif network == VAE_DECODER and self.vae_graph:
            net = _GraphedNetwork(net, self._step_pool, name=network)
        elif te and self.te_graph and not self.low_memory and network not in self._parked:  # weights stay in place
            # shared_pool: eager until the pool exists (the first image), captured into it after
            net = (_GraphedNetwork(net, self._shared, needs_pool=True, name=network) if self.shared_pool
                   else _GraphedNetwork(net, name=network))
        if isinstance(net, _GraphedNetwork):
            self._graphed.append(net)
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)
        return net

    def provides(self, network: str) -> bool:
        return network in self.modules

    @contextlib.contextmanager
    def network(self, name: str):
        """Backend.network; with one_stream, the stage's CUDA work (uploads, eager calls, graph
        replays, copies back) runs on step_graph.work_stream, where the graphs are warmed up and
        captured, instead of the default stream: cuBLAS keeps a workspace (32 MiB on Hopper) per
        stream it ever ran on, so one stream holds one. On leaving, the default stream waits for
        it (what the pipeline reads between stages, the contexts' NaN check, runs there)."""
        if not self.one_stream:
            with super().network(name) as net:
                yield net
            return
        import torch

        from ..modeling.step_graph import work_stream

        stream = work_stream(self.torch_device)
        default = torch.cuda.current_stream(self.torch_device)
        stream.wait_stream(default)
        try:
            with torch.cuda.stream(stream), super().network(name) as net:
                yield net
        finally:
            default.wait_stream(stream)

    def _step_pool(self):
        """The memory pool of the current captured step graph (an id that is never reused), or None."""
        loop = next(iter(self._loops.values()), None)
        return None if loop is None or loop.graph is None else loop.graph.pool()

    def _shared(self):
        """The shared GraphPool (shared_pool), or None before the first step graph made it."""
        return self._pool

    def _new_shared_pool(self, latent_shape) -> None:
        """shared_pool, before a step graph is captured (the old one already dropped): every other
        graph of the backend lets go of the old pool (the text encoder's and the decode's re-capture into the new one when next called),
        and the VAE decode of one latent of `latent_shape` (C, h, w) is captured first: the largest
        activations of the three networks' graphs come first into the pool, so the later captures
        carve their blocks out of its memory instead of adding segments."""
        from ..modeling.step_graph import GraphPool

        for g in self._graphed:
            g.release()
        self._pool = GraphPool(self.torch_device)
        with self.network(VAE_DECODER) as vae:  # resident: loaded here (once), kept for the decode
            engine = vae.engine
            if isinstance(engine, _GraphedNetwork):
                engine.prepare({vae.spec.input_names[0]: np.zeros((self.decode_batch, *latent_shape), np.float32)})

    def graph_pools(self) -> dict:
        """{memory pool id: the graphs in it}: the step graph (+ its K/V fill), the text encoder's and
        the VAE decode's graphs (the GPU check's memory map names the allocator's pools with it)."""
        import collections

        names = collections.defaultdict(list)
        for loop in self._loops.values():
            if loop.graph is not None:
                names[tuple(loop.graph.pool())].append("step")
        for g in self._graphed:
            if g.graph is not None:
                names[tuple(g.graph.pool())].append(g.name)
        return {pid: "+".join(v) for pid, v in names.items()}

    def _fast_unet(self, graph_module):
        """FastUNet around the graph module's UNet (channels-last since the load: _unet_layout); the
        plain module where FastUNet does not support the UNet or kernels are off."""
        from ..modeling.fast_unet import FastUNet

        if not self._runs_fast(graph_module):
            return graph_module
        fast = FastUNet(graph_module.unet)  # a fresh wrapper per load: the K/V tables it gets belong to this load's step graph
        fast.ff_chunk = self.ff_chunk
        fast.fused_epilogues = self.fused_epilogues
        fast.geglu_gemm = self.geglu_gemm
        self._pack_convs(UNET, (*fast.unet.down_blocks, fast.unet.mid_block, *fast.unet.up_blocks))
        return fast

    @property
    def packed_convs(self) -> int | None:
        """How many convolutions run packed (cpu_convs), over the networks loaded so far; None before any."""
        return sum(self._packed_convs.values()) if self._packed_convs else None

    def _pack_convs(self, network: str, roots) -> None:
        """On a CPU, at the network's first load: its convolutions below `roots` as cpu_convs.PackedConv2d
        (they stay packed for later loads). Not where the network is parked (each stage gets fresh weight
        copies), for int8 UNet weights, or for the VAE's row bands (they read the plain weights)."""
        if not self.cpu_packed_convs or network in self._packed_convs:
            return
        from ..modeling import cpu_convs

        if network in self._parked or (network == UNET and self.int8_weights):
            note = "not with parked or int8 weights"
        elif network == VAE_DECODER and getattr(self.modules[VAE_DECODER].vae, "band_rows", None):
            note = "not with vae_bands (its row bands read the plain weights)"
        else:
            note = cpu_convs.unavailable(self.torch_dtype)
        if note:
            self.packed_convs_note = note
        self._packed_convs[network] = 0 if note else sum(cpu_convs.pack_convs_(r) for r in roots)

    def _attach(self, network: str) -> None:
        """Copy a parked network's weights to the device for its stage. With shared_pool, once the
        pool exists, into the pool's memory: between the graphs' replays it holds nothing alive but
        their static outputs (every graph's work memory is dead then: the decode's, the step's, the
        K/V tables', refilled before the next step), so a parked text encoder (offload_text_encoder)
        or safety checker borrows it instead of adding its weights to the GPU's peak."""
        if self._pool is None:  # (made by shared_pool's step graphs only)
            self._parked[network].attach()
            return
        from ..modeling.step_graph import allocating_in

        with allocating_in(self._pool, self.torch_device):
            self._parked[network].attach()

    def _free(self, net) -> None:
        import torch

        if net.spec.name == UNET:  # (low-memory mode, close): the step graphs and their memory pool go; a
            self._loops.clear()  # later load captures anew (a parked UNet's weights leave the device)
        if net.spec.name in self._parked:
            if self._pool is not None and self.torch_device.type == "cuda":
                torch.cuda.synchronize(self.torch_device)  # nothing in flight reads them when the pool reuses them
            self._parked[net.spec.name].detach()  # the device copies go; the pinned host weights stay
        if isinstance(net.engine, _GraphedNetwork):  # its graph, static tensors and module go with it
            net.engine.release()
            self._graphed = [g for g in self._graphed if g is not net.engine]
        net.engine = None
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Every engine, graph and memory pool let go now (a later image loads and captures anew)."""
        super().close()
        self._loops.clear()
        self._pool = None

    def device_memory(self) -> dict | None:
        import torch

        if self.torch_device.type != "cuda":
            return None
        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(self.torch_device) / 2**30, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(self.torch_device) / 2**30, 3)}

    def describe(self) -> str:
        import torch

        what = "CUDA graph" if self.cuda_graph else "eager"
        weights = ", UNet weights int8" if self.int8_weights else ""
        if self.unified_memory and not self.park_weights:
            weights += ", integrated GPU: weights stay in its memory (the host's)"
        if self.packed_convs:
            weights += f", {self.packed_convs} convolutions packed for oneDNN"
        return f"torch-cuda {torch.__version__} {self.torch_device} {self.dtype_name} ({what}{weights})"

    def _sdpa_choice(self):
        import contextlib

        if self.sdpa is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        first = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}[self.sdpa]
        order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
                           if b != first]
        return sdpa_kernel(order, set_priority=True)

    def _tuning_note(self, h: int, w: int) -> None:
        """Tell the user why this first image takes longer (a cold machine: seconds to a minute)."""
        if self.log is not None:
            import pm_kernels

            self.log(f"tuning kernels for this GPU at {8 * h}x{8 * w} px (once per GPU, software and image size, "
                     f"at most {pm_kernels.tuning.BUDGET_S:g} s, PM_KERNELS_TUNE_BUDGET_S; the choices are kept in "
                     f"{pm_kernels.tuning.cache_file(self.torch_device)})")

    def _tuning(self):
        """tune=False: pm_kernels.tuning off for the block (the kernels' untuned defaults, no stored
        choices); else unchanged."""
        import pm_kernels

        return pm_kernels.tuning.enabled_kept(None if self.tune else False)

    # ------------------------------------------------------------------ the loop on the device
    def denoise(self, unet, job: DenoiseJob) -> np.ndarray:
        import torch

        from ..modeling.step_graph import StepGraph
        from ..schedulers.linear import linear_steps

        engine = unet.engine
        n, C, h, w = job.latents.shape
        rows, L, D = job.c_k.shape
        capacity = 1 << max(5, (rows - 1).bit_length())  # context rows the graph's buffers hold
        lin = linear_steps(job.tables)
        # steps the graph's tables hold: the time tables are (steps, sum of the ResNets' widths), 2.4 MB
        # in fp16 at SD 1.5 widths for 64 steps (38 MB for 1000)
        max_steps = 1 << max(6, (lin.num_steps - 1).bit_length())
        # kv_step computes the negative prompt's K/V once per image: a scheduled one reads table rows instead
        kv_step = self.kv_step and (job.neg_rows is None or len(set(job.neg_rows.tolist())) == 1)
        key = (n, C, h, w, L, D, capacity, max_steps, kv_step)
        loop = self._loops.get(key)
        if loop is None:
            self._loops.clear()  # one captured graph at a time: its memory pool is freed with it
            if self.shared_pool:
                self._new_shared_pool((C, h, w))
            with self._sdpa_choice(), self._tuning():  # the attention kernels are chosen at capture
                loop = StepGraph(engine.module, n=n, latent_shape=(C, h, w), context_shape=(L, D), rows=capacity,
                                 dtype=self.torch_dtype, device=self.torch_device, cuda_graph=self.cuda_graph,
                                 kv_tables=self.kv_tables, sequential=self.sequential_guidance, max_steps=max_steps,
                                 time_tables=self.time_tables, step_kernels=self.step_kernels,
                                 pool=self._pool, kv_graph=self.shared_pool, tune=self.tune, kv_step=kv_step,
                                 on_tune=lambda: self._tuning_note(h, w))
            self._loops[key] = loop
        noise = None
        if lin.needs_noise:
            noise = np.stack([job.noise(i) for i in range(lin.num_steps)])  # (steps, n, C, h, w)
        with torch.inference_mode(), self._sdpa_choice(), self._tuning():
            x = loop.run(job.latents, job.c_k, job.c_v, job.rows, lin, job.guidance, noise,
                         job.before_step, job.after_step, job.neg_rows)
        return x


def unified_memory(device) -> bool:
    """Whether `device` is a CUDA GPU whose memory is the host's (an integrated GPU: Jetson boards;
    cudaDeviceProp.integrated)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return bool(getattr(torch.cuda.get_device_properties(device), "is_integrated", 0))


class _Parked:
    """A module whose weights rest in host memory (pinned where CUDA is, for fast copies): attach()
    gives its parameters and buffers device copies, detach() points them back at the host ones.
    The weights never change, so nothing is copied back. Tensors that share a storage (FastUNet's
    fused Q/K/V matrix and the views of it) keep sharing one copy on both sides, where Module.to
    would copy each apart. channels_last: 4-D tensors that share nothing rest in the channels-last
    layout (what FastUNet's convolutions read on the GPU), so no conversion happens per load."""

    def __init__(self, module, device, channels_last: bool = False):
        import collections

        import torch

        self.module, self.device = module, torch.device(device)
        pin = self.device.type == "cuda"
        slots = list(self._slots())
        users = collections.Counter(self._key(t) for _, _, t in slots)
        index: dict = {}  # source storage key -> position in self.bases
        self.bases: list = []  # host storages
        self.views: list = []  # per slot: (owner dict, name, base position, offset, shape, stride, dtype)
        for store, name, t in slots:
            key = self._key(t)
            if users[key] == 1 and channels_last and t.ndim == 4:
                t = t.contiguous(memory_format=torch.channels_last)
                key = ("own", len(self.views))
            if key not in index:
                src = t.untyped_storage()
                base = src.cpu() if src.device.type != "cpu" else src
                self.bases.append(base.pin_memory() if pin and not base.is_pinned() else base)
                index[key] = len(self.bases) - 1
            self.views.append((store, name, index[key], t.storage_offset(), tuple(t.shape), t.stride(), t.dtype))
            self._place(self.bases, self.views[-1:])  # at once: a storage nothing else shares is freed here

    def _slots(self):
        """(owner dict, name, tensor) of every parameter and buffer slot of the module."""
        for m in self.module.modules():
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is not None:
                        yield store, name, t

    @staticmethod
    def _key(t):
        return (str(t.device), t.untyped_storage().data_ptr())

    def _place(self, bases: list, views=None) -> None:
        """Point every slot (of `views`: all) at its view of bases[position]."""
        import torch
        from torch import nn

        for store, name, pos, offset, shape, stride, dtype in self.views if views is None else views:
            b = bases[pos]
            view = torch.empty(0, dtype=dtype, device=b.device).set_(b, offset, shape, stride)
            if isinstance(store[name], nn.Parameter):
                store[name].data = view
            else:
                store[name] = view

    def attach(self) -> None:
        self._place([self._copy(b) for b in self.bases])

    def _copy(self, base):
        """A device copy of host storage `base` (asynchronous from pinned memory); on the CPU, itself."""
        import torch

        if self.device.type == "cpu":
            return base
        src = torch.empty(0, dtype=torch.uint8).set_(base)  # the storage's bytes
        dst = torch.empty(base.nbytes(), dtype=torch.uint8, device=self.device)
        dst.copy_(src, non_blocking=True)
        return dst.untyped_storage()

    def detach(self) -> None:
        self._place(self.bases)
        self._drop_strays()

    def _drop_strays(self) -> None:
        """Drop the buffers registered on the module's device while it was attached that no slot
        covers: FastUNet's derived tensors (the fused Q/K/V, the fused epilogues' biases) on a
        diffusers UNet, which FastUNet builds after parking (the standalone UNet has them before, as
        slots). Nothing then stays on the device between stages; the next load derives them again."""
        slots = {(id(store), name) for store, name, *_ in self.views}
        for m in self.module.modules():
            for name, t in list(m._buffers.items()):
                if t is not None and t.device.type == self.device.type and (id(m._buffers), name) not in slots:
                    del m._buffers[name]

    def on_host(self) -> bool:
        """Whether every slot points into the host storages (detached)."""
        ptrs = {b.data_ptr() for b in self.bases}
        return all(store[name].untyped_storage().data_ptr() in ptrs for store, name, *_ in self.views)


class _GraphedNetwork:
    """A TorchNetwork run as one CUDA graph per input signature (shapes and dtypes; and memory pool:
    `pool_of()` -> a pool id, a GraphPool, or None for a pool of its own; with needs_pool=True, None
    means no graph yet: called eagerly): the inputs are uploaded as the network
    would upload them, copied into the graph's static inputs, the graph replays, and the outputs are
    copied out of its static outputs (to the host, or on the device as DeviceArrays) before any
    later replay can overwrite them. Re-captured when the signature or the pool changes (one graph
    at a time). Without CUDA the same code calls the module eagerly on the static inputs (how it is
    tested). Its networks must keep their weights in place between calls (not parked in host memory)."""

    def __init__(self, net: TorchNetwork, pool_of=None, needs_pool: bool = False, name: str = ""):
        self.net, self.pool_of, self.name = net, pool_of or (lambda: None), name
        self.needs_pool = needs_pool  # True: called eagerly while pool_of() is None (no capture then)
        self.module = net.module  # the graph module, as on a TorchNetwork
        self.key = self.graph = None
        self.static_in: list = []
        self.static_out: tuple = ()
        self.captures = 0

    def release(self) -> None:
        """Drop the graph and its static tensors (its memory pool is let go; the next call captures again)."""
        self.key = self.graph = None
        self.static_in, self.static_out = [], ()

    def prepare(self, inputs) -> None:
        """Capture for the signature of `inputs` now, without replaying (nothing is computed for them)."""
        import torch

        with torch.inference_mode():
            args = self.net.device_inputs(inputs)
            pool = self.pool_of()
            if not (self.needs_pool and pool is None):
                self._ready(args, pool)

    def _ready(self, args, pool) -> bool:
        """Capture for the signature of `args` (shapes and dtypes) in `pool` unless the graph held is
        that one; whether it captured now."""
        key = (tuple((tuple(a.shape), a.dtype) for a in args), pool)
        if key == self.key:
            return False
        self._capture(args, pool)
        self.key = key
        return True

    def _call(self):
        return self.net.call(self.static_in)

    def _capture(self, args, pool) -> None:
        from ..modeling.step_graph import capture_graph, graphs_available

        self.graph = None  # the old graph and its pool go first
        self.static_in = [a.clone() for a in args]
        if graphs_available(self.net.device):  # one warm-up call (outside the capture), then the capture
            self.graph, self.static_out = capture_graph(self._call, self.net.device, warm_up=[self._call], pool=pool)
        self.captures += 1

    def run(self, inputs):
        import torch

        with torch.inference_mode():
            args = self.net.device_inputs(inputs)
            pool = self.pool_of()
            if self.needs_pool and pool is None:  # no pool yet (shared_pool's first image): eagerly
                return self.net.outputs(self.net.call(args))
            if not self._ready(args, pool):  # (a capture takes its static inputs from args)
                for static, a in zip(self.static_in, args):
                    static.copy_(a)
            if self.graph is not None:
                self.graph.replay()
            else:
                self.static_out = self._call()
            return self.net.outputs(self.static_out, copy=True)
