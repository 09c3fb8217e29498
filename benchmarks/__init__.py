"""pm_bench: the benchmarks (installed from benchmarks/ as pm_bench; also runnable as scripts)."""
