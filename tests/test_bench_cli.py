"""pm-bench's dispatch and the GPU table (CPU-only checks: the GPU benchmark itself runs on a GPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def pm_bench(*args):
    return subprocess.run([sys.executable, "-m", "pm_bench.cli", *args], capture_output=True, text=True)


def test_help_names_every_benchmark():
    r = pm_bench("--help")
    assert r.returncode == 0
    for mode in ("--gpu", "--kernels", "--train", "bench_run.py"):
        assert mode in r.stdout


def test_each_mode_has_its_own_help():
    for mode, needle in (("--gpu", "--compile"), ("--kernels", "--reps"), ("--train", "--grad-accum")):
        r = pm_bench(*([mode] if mode else []), "--help")
        assert r.returncode == 0 and needle in r.stdout, (mode, r.stderr)


def test_two_modes_are_refused():
    r = pm_bench("--gpu", "--kernels")
    assert r.returncode == 2 and "choose one" in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_modes_refuse_cleanly_without_cuda():
    for mode in ("--gpu", "--kernels"):
        r = pm_bench(mode)
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_gpu_table_ratios():
    sys.path.insert(0, "benchmarks")
    try:
        from pm_bench.bench_gpu import table
    finally:
        sys.path.remove("benchmarks")
    recs = [{"variant": "diffusers-eager", "status": "ok", "unet_step_ms": {"p50": 24.0}},
            {"variant": "diffusers-cuda-graph", "status": "ok", "unet_step_ms": {"p50": 12.0}},
            {"variant": "torch-compile-reduce-overhead", "status": "ok", "unet_step_ms": {"p50": 8.0}},
            {"variant": "torch-cuda", "status": "ok", "unet_step_ms": {"p50": 6.0}, "image_ms": {"p50": 350.0},
             "peak_reserved_gib": 2.4},
            {"variant": "broken", "status": "error", "error": "RuntimeError: boom"}]
    lines = table(recs).splitlines()
    ours = next(line for line in lines if line.startswith("torch-cuda"))
    assert ours.split()[1:5] == ["6.0", "4.00", "2.00", "1.33"] and "0.35" in ours
    assert any("broken" in line and "boom" in line for line in lines)
