"""Where a kernel runs: its Triton version on CUDA tensors of a GPU Triton supports (compute
capability 7.0+), or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, which is how
CI tests them); its PyTorch reference elsewhere.

set_enabled(False), or PM_KERNELS=0 in the environment, forces the references everywhere. A
kernel that CAN run but fails raises: the fallback is for "cannot run here", never for errors.
"""

from __future__ import annotations

import contextlib
import functools
import os

_ENABLED = os.environ.get("PM_KERNELS", "1") != "0"


def set_enabled(flag: bool) -> None:
    global _ENABLED
    _ENABLED = bool(flag)


def enabled() -> bool:
    return _ENABLED


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


KERNELS = ("group_norm_silu", "geglu", "attention", "dequant_int8", "add_bias_residual", "add_layer_norm",
           "step_update")


# Triton compiles for NVIDIA GPUs of compute capability 7.0 (Volta) and newer; PyTorch's inductor
# refuses older ones for that reason. On those (Pascal: GTX 10xx, P100) the references run.
MIN_CAPABILITY = (7, 0)


@functools.lru_cache(maxsize=None)
def capability(index: int) -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(index))


def kernel_path(name_or_tensor, tensor=None) -> str:
    """"triton" or "reference": the path kernel `name` takes on `tensor`, kernel_path(name, tensor)
    (kernel_path(tensor) also works: the rule is the same for every kernel). attention() also
    hands long key axes to PyTorch's SDPA on the Triton path (attention.SHORT_KEYS)."""
    if tensor is None:
        tensor = name_or_tensor
    elif name_or_tensor not in KERNELS:
        raise ValueError(f"kernel_path: unknown kernel {name_or_tensor!r} (one of {', '.join(KERNELS)})")
    if not (_ENABLED and triton_available()):
        return "reference"
    if tensor.is_cuda:
        if interpreting():
            return "reference"
        return "triton" if capability(tensor.device.index) >= MIN_CAPABILITY else "reference"
    return "triton" if interpreting() and tensor.device.type == "cpu" else "reference"


# Integer arguments (sizes): Triton specialises each on being 1 and on divisibility by 16, and
# vectorises a masked load or store along a contiguous axis (16-byte accesses: eight fp16 values)
# only where the mask's bound is known to be a multiple of the vector: `cols < C` with C
# unspecialised compiles to one 2-byte access per element. The channel counts and pixel counts of
# SD's layers (320 ... 2560 channels, 64 ... 16384 pixels at 512-1024 px) all divide by 16, so a
# few compiled variants (a program count of 1, say) serve every layer. Until this rule the
# GroupNorm, residual, LayerNorm and step kernels kept their sizes unspecialised ("one compiled
# kernel for every size"), and Triton compiled all their fp16 accesses to 2-byte loads and stores
# (benchmarks/compile_check.py reports each kernel's access widths). set_generic_sizes(True), or
# PM_KERNELS_GENERIC_SIZES=1 in the environment, launches them compiled that way again: the
# benchmark's A/B of this rule (the torch-cuda-generic-sizes variant, the kernel benchmark's rerun).
_GENERIC_SIZES = os.environ.get("PM_KERNELS_GENERIC_SIZES", "0") == "1"


def set_generic_sizes(flag: bool) -> None:
    """Launch the size-taking kernels without size specialisation from now on (True), or with it
    (False, the default). A CUDA graph keeps the kernels it captured: set this before capturing."""
    global _GENERIC_SIZES
    _GENERIC_SIZES = bool(flag)


def generic_sizes() -> bool:
    return _GENERIC_SIZES


@contextlib.contextmanager
def _kept(get, put, value):
    """A block run with put(value) (None: unchanged); get()'s value before it put back afterwards."""
    old = get()
    try:
        if value is not None:
            put(value)
        yield
    finally:
        put(old)


def generic_sizes_kept(flag: bool | None = None):
    """A block run with set_generic_sizes(flag) (None: unchanged); the setting before it afterwards."""
    return _kept(generic_sizes, set_generic_sizes, flag)


class SizedKernel:
    """One Triton kernel compiled two ways, launched as `kernel[grid](...)` like a JITFunction: with
    its integer sizes specialised (Triton's default) or, under set_generic_sizes(True), without
    (`do_not_specialize=sizes`). Each way is a JITFunction of its own, with its own compiled cache."""

    def __init__(self, fn, sizes):
        import triton

        self.specialised = triton.jit(fn)
        self.generic = triton.jit(do_not_specialize=list(sizes))(fn)

    def current(self):
        """The JITFunction a launch takes now."""
        return self.generic if _GENERIC_SIZES else self.specialised

    def __getitem__(self, grid):
        return self.current()[grid]


def jit(*sizes: str):
    """Decorator: a SizedKernel for a Triton kernel whose integer arguments `sizes` are tensor sizes."""
    return lambda fn: SizedKernel(fn, sizes)


# Programmatic dependent launch (PDL; Hopper, compute capability 9.0+): a kernel launched with it may
# be scheduled while the kernel before it on the stream finishes, hiding its launch latency (a UNet
# step graph replays ~520 kernels, ~270 of them pm_kernels'). Every pm_kernels kernel takes a PDL
# constexpr: when set, its programs first wait for the kernel before it to complete and its writes to
# be visible (griddepcontrol.wait, before any memory access: stream order holds as without PDL) and
# then let the next kernel launch (griddepcontrol.launch_dependents). Off until the GPU check measures
# it (variant torch-cuda-pdl): set_pdl(True) or PM_KERNELS_PDL=1. A CUDA graph keeps what it captured.
_PDL = os.environ.get("PM_KERNELS_PDL", "0") == "1"
PDL_MIN_CAPABILITY = (9, 0)


def set_pdl(flag: bool) -> None:
    """Launch pm_kernels' kernels with programmatic dependent launch from now on (on GPUs of compute
    capability 9.0+; elsewhere it does nothing)."""
    global _PDL
    _PDL = bool(flag)


def pdl() -> bool:
    return _PDL


def pdl_kept(flag: bool | None = None):
    """A block run with set_pdl(flag) (None: unchanged); the setting before it afterwards."""
    return _kept(pdl, set_pdl, flag)


def pdl_keywords(on: bool) -> dict:
    """The launch keywords of a pm_kernels kernel with PDL on or off: its PDL constexpr, and Triton's
    launch_pdl option where on."""
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def pdl_options(tensor) -> dict:
    """pdl_keywords for a kernel working on `tensor`: on where set_pdl is and the GPU has PDL."""
    return pdl_keywords(_PDL and tensor.is_cuda and not interpreting()
                        and capability(tensor.device.index) >= PDL_MIN_CAPABILITY)


try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # no Triton: no kernel is ever loaded
    class OutOfResources(Exception):
        pass


def deepest_that_loads(cache: dict, key, depths, launch):
    """launch(depth) for the first of `depths` (software-pipelining depths, deepest first) that the GPU
    loads: Triton raises OutOfResources as it loads a kernel whose shared memory per block or threads
    do not fit, before anything runs. The depth that loaded is remembered in cache[key] and tried alone
    next time; where none loads, cache[key] = () and None is returned (the caller's PyTorch path)."""
    for depth in cache.get(key, depths):
        try:
            out = launch(depth)
        except OutOfResources:  # one stage less
            continue
        cache[key] = (depth,)
        return out
    cache[key] = ()
    return None


if triton_available():
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def pdl_prologue(PDL: tl.constexpr):
        """First thing in every pm_kernels kernel: with PDL, wait for the kernel before (all its
        writes visible), then allow the next one to launch. Without PDL: nothing (no instruction)."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
else:  # no Triton: no kernel calls it
    pdl_prologue = None


def layout(t):
    """torch.channels_last for a 4-D tensor dense in that layout (and not also plain contiguous), else
    torch.contiguous_format: the memory format a kernel's output keeps."""
    import torch

    return torch.channels_last if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous() else torch.contiguous_format


def dense(t):
    """(t, its layout) where t is dense in either layout, else (a contiguous copy, contiguous_format):
    what a kernel reads through its strides."""
    import torch

    fmt = layout(t)
    return (t, fmt) if t.is_contiguous(memory_format=fmt) else (t.contiguous(), torch.contiguous_format)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
