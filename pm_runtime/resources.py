"""This process's peak resident memory (ru_maxrss), the one place that reads it: pm-run's summary,
the trainer's and exporter's reports and the benchmarks use it."""

from __future__ import annotations

import sys


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size so far, in bytes (monotonic: imports, loading and all
    work since the start); None where the OS does not report it (Windows: no `resource` module)."""
    try:
        import resource
    except ImportError:
        return None
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux and the BSDs KiB
