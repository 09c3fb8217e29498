"""This process's peak resident memory, the one place that reads it: pm-run's summary, the
trainer's and exporter's reports and the benchmarks use it; and the CPU's 16-bit units (x86 flags), which
pm-run's bfloat16 hint and the PyTorch backends' emulation warning read."""

from __future__ import annotations

import sys
import warnings


def peak_rss_bytes() -> int | None:
    """The process's own peak resident set size so far, in bytes (monotonic: imports, loading and all
    work since the start). Linux: VmHWM of /proc/self/status, not getrusage's ru_maxrss, which carries
    the PARENT's peak over fork + exec (pm-run started by a process that once held 4 GB would report
    >= 4 GB). Elsewhere ru_maxrss (macOS reports bytes, the BSDs KiB); None where neither exists
    (Windows: no `resource` module)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_flags() -> frozenset[str] | None:
    """This x86 CPU's feature flags (the "flags" line of Linux's /proc/cpuinfo); None where there is no
    such line (other systems, and other architectures: ARM's line is "Features", with other names)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


# the x86 units that compute in a 16-bit type natively: AMX (Xeon 4th generation and later; amx_fp16 from
# the 6th), AVX-512's bfloat16 / float16 instructions. Without them oneDNN converts to float32 and back.
CPU_16BIT_UNITS = {"bfloat16": ("amx_bf16", "avx512_bf16"), "float16": ("amx_fp16", "avx512_fp16")}


def cpu_16bit_units(dtype: str) -> list[str] | None:
    """The units of CPU_16BIT_UNITS[dtype] this CPU advertises ([] where it has none of them); None where
    the flags cannot be read. Reads no torch."""
    flags = cpu_flags()
    return None if flags is None else [u for u in CPU_16BIT_UNITS[dtype] if u in flags]


def cpu_bf16_units() -> list[str]:
    """The bfloat16 matrix units this machine's CPU advertises (Linux /proc/cpuinfo flags): "amx_bf16"
    (Intel AMX, Xeon 4th generation and later), "avx512_bf16" (bfloat16 dot products, AVX-512). Empty
    where there are none or the flags cannot be read (other systems). Reads no torch: pm-run's
    onnxruntime path uses it for its hint."""
    return cpu_16bit_units("bfloat16") or []


# measured on a 2-core Xeon whose virtual machine shows AVX-512 but neither 16-bit unit (README: "CPUs with
# bfloat16 units"; benchmarks/results/run-cpu.jsonl, SD-1.5 shapes, 256 px, 10 steps, same runs)
_EMULATED_16BIT = {"bfloat16": "3.6-3.7x slower than float32 (66-68 s against 18 s per 256 px image)",
                   "float16": "9x slower than float32 (164 s against 18 s per 256 px image)"}


def cpu_16bit_note(dtype_name: str) -> str | None:
    """A warning where a CPU runs the networks in a 16-bit type it has no units for (x86 flags read, none of
    CPU_16BIT_UNITS[dtype] among them): oneDNN then converts every product to float32 and back,
    several times slower than float32. None for float32, and where the flags cannot be read (other systems,
    ARM: not measured, no claim)."""
    if dtype_name not in CPU_16BIT_UNITS or cpu_16bit_units(dtype_name) != []:
        return None
    units = " or ".join(CPU_16BIT_UNITS[dtype_name])
    return (f"this CPU shows no {dtype_name} units ({units}): {dtype_name} runs emulated, "
            f"{_EMULATED_16BIT[dtype_name]} on the Xeon measured without them; float32 (the default on a CPU) or "
            f"onnxruntime (an int8 bundle: the fastest there) is faster here")


def warn_emulated_16bit(device_type: str, dtype_name: str) -> str | None:
    """What a PyTorch backend loading its networks on `device_type` in `dtype_name` does about emulation:
    on a CPU without the type's units, cpu_16bit_note warned once (pm-run prints "warning: ...") and
    returned (the backend keeps it as cpu_dtype_note); otherwise None."""
    note = cpu_16bit_note(dtype_name) if device_type == "cpu" else None
    if note:
        warnings.warn(note, stacklevel=3)
    return note
