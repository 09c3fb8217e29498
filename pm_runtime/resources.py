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
