"""This process's peak resident memory, the one place that reads it: pm-run's summary, the
trainer's and exporter's reports and the benchmarks use it."""

from __future__ import annotations

import sys


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


def cpu_bf16_units() -> list[str]:
    """The bfloat16 matrix units this machine's CPU advertises (Linux /proc/cpuinfo flags): "amx_bf16"
    (Intel AMX, Xeon 4th generation and later), "avx512_bf16" (bfloat16 dot products, AVX-512). Empty
    where there are none or the flags cannot be read (other systems). Reads no torch: pm-run's
    onnxruntime path uses it for its hint."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [u for u in ("amx_bf16", "avx512_bf16") if u in flags]
    except OSError:
        pass
    return []
