"""What every benchmark record carries, written once (STYLE.md: benchmarks are records).

environment(device) is the header of every record: commit (+ whether the tree was dirty), date,
CPU, OS, Python, library versions and the device (GPU name, capability, memory, NVIDIA driver,
CUDA and cuDNN versions). No host name: records are committed and shared. The helpers below
write records: percentiles, a one-write-per-line JSONL append, the default results folder.
No torch import at module level (the CPU benches' children import it themselves).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import pathlib
import platform
import re
import subprocess
import time
from importlib import metadata

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
LIBRARIES = ("torch", "diffusers", "transformers", "numpy", "triton", "onnxruntime")


def _run_text(cmd: list[str], cwd=None) -> str | None:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_state(override: str | None, dirty: bool | None = None) -> tuple[str, bool | None]:
    """(commit, dirty): `git rev-parse HEAD` of this tree, or `override` (a copied tree without
    .git: the caller knows the commit; PM_COMMIT in the GPU scripts); ("unknown", None) without git."""
    override = override or os.environ.get("PM_COMMIT")
    if override:
        return override, dirty
    commit = _run_text(["git", "rev-parse", "HEAD"], cwd=REPO)
    if not commit:
        return "unknown", None
    porcelain = _run_text(["git", "status", "--porcelain"], cwd=REPO)
    return commit, bool(porcelain) if porcelain is not None else None


def host_cpu() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} x{os.cpu_count()}"


def nvidia_driver() -> str | None:
    v = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"])
    if v:
        return v
    with contextlib.suppress(OSError):  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15 ..."
        words = pathlib.Path("/proc/driver/nvidia/version").read_text().split()
        return next((w for w in words if w[:1].isdigit() and "." in w), None)
    return None


def versions(names=LIBRARIES) -> dict:
    """Installed versions (None where not installed), read from package metadata: no imports."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(device: str, commit_override: str | None = None, dirty: bool | None = None) -> dict:
    """The record header. device: "cpu" or "cuda" (/"cuda:N": GPU facts of that device)."""
    commit, dirty = git_state(commit_override, dirty)
    env = {"commit": commit, "dirty": dirty,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "host_cpu": host_cpu(), "os": platform.platform(), "python": platform.python_version(), **versions(),
           # pm_kernels' A/B switch (kernels/_dispatch.py): "1" compiles the kernels without size specialisation
           "kernels_generic_sizes": os.environ.get("PM_KERNELS_GENERIC_SIZES"),
           "kernels_pdl": os.environ.get("PM_KERNELS_PDL")}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    if device.startswith("cuda"):
        i = int(device.split(":")[1]) if ":" in device else 0
        props = torch.cuda.get_device_properties(i)
        env.update({
            "device_name": props.name,
            "device_capability": f"{props.major}.{props.minor}",
            "device_memory_bytes": props.total_memory,
            "driver": nvidia_driver(),
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            # allocator and cuDNN workspace settings change peaks
            "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"),
            "cudnn_conv_wscap_dbg": os.environ.get("CUDNN_CONV_WSCAP_DBG"),
            # cuBLAS's workspace per (handle, stream), from the caching allocator (32 MiB by default on Hopper)
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "cublaslt_workspace_size": os.environ.get("CUBLASLT_WORKSPACE_SIZE"),
        })
    else:
        env.update({"device_name": "cpu: " + env["host_cpu"], "driver": None})
    return env


def pcts(values) -> dict:
    """{"p20", "p50", "p80"} of `values` (numpy's linear-interpolation percentiles), 4 decimals."""
    import numpy as np

    a = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(a, q)), 4) for q in (20, 50, 80)}


def proc_status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...); 0 where it is missing (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def failure(r: dict) -> str:
    """What a record that is not ok says of itself, for a summary line: "STATUS: error or reason"."""
    return f"{r.get('status')}: {r.get('error') or r.get('reason') or ''}"


def psnr_db(a, b, peak: float = 255.0) -> float | None:
    """PSNR of `a` against `b` in dB, 2 decimals; None when they are identical; NaN when either holds
    NaN or inf (never None then: NaN compares unequal to everything, and read as "identical" it
    would pass any floor)."""
    import numpy as np

    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    if not np.isfinite(mse):
        return float("nan")
    return round(10 * float(np.log10(peak**2 / mse)), 2) if mse > 0 else None


def cuda_reset(torch) -> None:
    """Free what the last measurement left on the GPU and restart the peak-memory counters."""
    import gc

    gc.collect()
    torch.cuda.synchronize()
    # cuBLAS workspaces PyTorch keeps per stream for the process's life: the last variant's would
    # count in the next one's memory (no graph of it is alive by now to need them)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def cuda_peak(torch) -> dict:
    """Peak allocated / reserved GiB since the last cuda_reset."""
    return {"peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}


def _json_safe(value):
    """`value` with every non-finite float as the string "NaN" / "Infinity" / "-Infinity": json.dumps
    would write them bare, which is not JSON (strict readers such as jq and JavaScript refuse the line)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def append_jsonl(path: pathlib.Path, records) -> None:
    """Append each record as one JSON line with one write(2) on an O_APPEND descriptor: lines of
    runs sharing a file do not interleave, and a crash loses at most the line being written.
    Non-finite floats are written as strings ("NaN", "Infinity"), keeping every line strict JSON."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for rec in records:
            data = (json.dumps(_json_safe(rec), default=str, allow_nan=False) + "\n").encode()
            while data:
                data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def save_records(out, records: list, log=print) -> None:
    """Append `records` to the JSON-lines file `out` (nothing when out is None) and say so."""
    if out:
        append_jsonl(out, records)
        log(f"appended {len(records)} records to {out}")


def slug(text: str) -> str:
    """A file-name part: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return re.sub(r"^nvidia-", "", s) or "unknown"


def results_dir() -> pathlib.Path:
    """benchmarks/results of this source tree; ./pm-bench-results when installed from a wheel
    (never inside site-packages)."""
    if (REPO / "pyproject.toml").is_file() and (HERE / "results").is_dir():
        return HERE / "results"
    return pathlib.Path.cwd() / "pm-bench-results"


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its finished children)."""
    import resource

    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    mine = sum(getattr(resource.getrusage(w), a) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for a in ("ru_utime", "ru_stime"))
    return busy, mine


def wait_quiet(limit_s: float, window_s: float = 5.0, frac: float = 0.1, windows: int = 3) -> float:
    """Wait (at most limit_s) until other processes use < frac of the CPUs in `windows` windows in a
    row; seconds waited."""
    t0, quiet = time.perf_counter(), 0
    while time.perf_counter() - t0 < limit_s and quiet < windows:
        b0, m0 = cpu_seconds()
        time.sleep(window_s)
        b1, m1 = cpu_seconds()
        quiet = quiet + 1 if (b1 - b0) - (m1 - m0) < frac * window_s * os.cpu_count() else 0
    return round(time.perf_counter() - t0, 1)
