"""On-device choice between the implementations of one computation (a kernel "tactic", as TensorRT's
builder calls it), per shape, persisted per GPU.

Several of pm_kernels' computations have more than one implementation, and which is fastest depends
on the GPU, the shape and the library versions: attention (PyTorch's SDPA, SDPA with cuDNN's
attention first, the Triton kernel in a few launch configurations), the feed-forward's GEGLU
projection (cuBLAS's GEMM then the GEGLU kernel, or the GEGLU inside a Triton GEMM) and the
GroupNorm (the "tiled" and "grouped" kernels). Measured on an H200 some of the routing rules lost
(self-attention at head dim 40: the Triton kernel at 0.45x SDPA), and the GPUs this runs on range
from Jetson boards to H200s. So, like TensorRT's builder, the choice is measured on the GPU that runs:

- In a tuning session (`with session(signature, device) as active:`, around one eager call of the
  UNet step: what the torch-cuda backend's step graph does before its first capture of a shape),
  every call of a tunable computation whose key (op, dtype, shape) has no choice yet runs each
  candidate on its real inputs once, leaves out the ones that do not load or run here (the error is
  kept in the entry) and the ones whose output is not finite or differs from the first candidate's
  by more than TOLERANCE (relative to its largest value), times the rest, each as a CUDA graph of
  REPS calls (median of TRIALS replays, CUDA events: what a captured step pays, launch overheads
  included), and keeps the fastest.
- Outside a session: the choice for the key if one was made (in this process, or read from the
  cache file), else the first candidate, the untuned default (the routing rules in the code).
- Choices persist in one JSON file per GPU and software (cache_file: device name, compute
  capability, torch / CUDA / Triton versions, a hash of pm_kernels' sources), written atomically after
  each measured call (a process killed mid-session, e.g. by a time limit, keeps what it measured) and
  when a session ends; a session whose signature the file lists as done does nothing (no extra step).
- A session measures for at most BUDGET_S seconds (PM_KERNELS_TUNE_BUDGET_S; its own budget_s): the
  calls it reaches after that run their untuned default unmeasured, and the session is not recorded
  as done, so the next one (the next process) measures those and keeps the rest: a first run on a
  slow machine (many Triton compiles) is bounded, and the choices still complete over a few runs.

set_enabled(False), or PM_KERNELS_TUNE=0 in the environment, turns it off: no sessions, no stored
choices used, every call takes its untuned default (the A/B of the whole mechanism:
benchmarks/gpu_ours.py's torch-cuda-untuned). PM_KERNELS_TUNE_DIR sets the cache folder (default:
$XDG_CACHE_HOME/pm_kernels/tuning, else ~/.cache/pm_kernels/tuning). Module import needs no torch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

from ._dispatch import _kept

_ENABLED = os.environ.get("PM_KERNELS_TUNE", "1") != "0"
REPS = 5  # calls per timed CUDA graph
TRIALS = 7  # timed replays (the median counts)
TOLERANCE = {"float16": 2e-2, "bfloat16": 3e-2, "float32": 1e-3}  # largest |a - b| / largest |b| between candidates
FORMAT = 1  # the cache file's layout

_TABLES: dict = {}  # device key -> {"choices": {key: entry}, "sessions": [signature, ...]}


def _budget_from_env(default: float = 120.0) -> float:
    """PM_KERNELS_TUNE_BUDGET_S as seconds >= 0; a value that is not a number warns and keeps the default
    (a typo in the environment must not stop the import)."""
    text = os.environ.get("PM_KERNELS_TUNE_BUDGET_S", "").strip()
    if not text:
        return default
    try:
        return max(0.0, float(text))
    except ValueError:
        warnings.warn(f"PM_KERNELS_TUNE_BUDGET_S={text!r} is not a number of seconds; using {default:g}")
        return default


BUDGET_S = _budget_from_env()  # measuring per session, seconds
_ACTIVE: dict = {}  # device key with a session open -> {"until": perf_counter deadline, "cut": calls left}
_CUT = [0]  # calls this process's sessions left at their default for want of budget
_SPENT = [0.0, 0]  # seconds this process spent measuring candidates, and the calls it measured


def set_enabled(flag: bool) -> None:
    """Make and use tuned choices from now on (True), or take every call's untuned default (False). A
    CUDA graph keeps the kernels it captured: set this before capturing."""
    global _ENABLED
    _ENABLED = bool(flag)


def enabled() -> bool:
    return _ENABLED


def enabled_kept(flag: bool | None = None):
    """A block run with set_enabled(flag) (None: unchanged); the setting before it afterwards."""
    return _kept(enabled, set_enabled, flag)


def cache_dir() -> Path:
    if os.environ.get("PM_KERNELS_TUNE_DIR"):
        return Path(os.environ["PM_KERNELS_TUNE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pm_kernels" / "tuning"


@functools.lru_cache(maxsize=1)
def _sources_hash() -> str:
    """sha256 of pm_kernels' Python sources: a changed kernel or rule makes new choices."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def device_key(device) -> str:
    """What a choice is valid for: the GPU (name, compute capability) and the software that runs on it."""
    import torch

    return _device_key(torch.device(device))


@functools.lru_cache(maxsize=None)
def _device_key(device) -> str:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        major, minor = torch.cuda.get_device_capability(index)
        what = f"{torch.cuda.get_device_name(index)} sm{major}{minor} cuda{torch.version.cuda}"
    else:
        what = device.type
    return f"{what} torch{torch.__version__} triton{triton_version} src{_sources_hash()}"


def cache_file(device) -> Path:
    key = device_key(device)
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in key.split(" torch")[0]).strip("-")[:60]
    return cache_dir() / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _valid(data) -> bool:
    return (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("choices"), dict)
            and all(isinstance(e, dict) and isinstance(e.get("choice"), str) for e in data["choices"].values())
            and isinstance(data.get("sessions"), list))


def _table(device) -> dict:
    """The choices for `device` (read from its cache file the first time; a file that is not one of
    ours is ignored, with a warning, and replaced at the next save)."""
    key = device_key(device)
    if key not in _TABLES:
        table = {"format": FORMAT, "device": key, "choices": {}, "sessions": []}
        path = cache_file(device)
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                data = None
                warnings.warn(f"pm_kernels tuning: ignoring {path}: {e}")
            if _valid(data) and data.get("device") == key:
                table = data
            elif data is not None:
                warnings.warn(f"pm_kernels tuning: ignoring {path}: not a tuning table for {key}")
        _TABLES[key] = table
    return _TABLES[key]


def _save(device) -> Path | None:
    """Write `device`'s table to its cache file atomically (temp file + rename); a folder that cannot
    be written costs a warning, the choices stay in this process."""
    from pm_runtime.concept_table import atomic_write_bytes  # the project's one atomic writer

    path = cache_file(device)
    try:
        atomic_write_bytes(json.dumps(_table(device), indent=1, sort_keys=True).encode(), path)
    except OSError as e:
        warnings.warn(f"pm_kernels tuning: cannot write {path} ({e}); the choices hold in this process only")
        return None
    return path


def choices(device) -> dict:
    """{key: entry} of `device`: entry["choice"], the untuned default (entry["default"]), the timings in
    microseconds (entry["us"]), and the candidates left out (entry["failed"]: why; entry["rejected"]:
    their relative error)."""
    return dict(_table(device)["choices"])


def cut_short() -> int:
    """How many calls this process's tuning sessions left at their untuned default because the
    session's budget was spent (measured by the next session with the same signature)."""
    return _CUT[0]


def spent() -> tuple[float, int]:
    """(seconds, calls): how long this process has spent measuring candidates (compiles included), and
    for how many calls (what a cold start pays for tuning; 0 where every choice came from the file)."""
    return round(_SPENT[0], 3), _SPENT[1]


def forget(device=None) -> None:
    """Drop this process's tables (all, or `device`'s): the next use reads the cache file again."""
    if device is None:
        _TABLES.clear()
    else:
        _TABLES.pop(device_key(device), None)


@contextlib.contextmanager
def session(signature: str, device, budget_s: float | None = None):
    """A block in which tunable calls on `device` without a choice measure their candidates, for at
    most budget_s seconds (None: BUDGET_S) from its start; yields whether it is active: False where
    tuning is off or the cache file lists `signature` (the caller's name for the work it tunes: its
    shapes) as done, when the caller may skip that work. Leaving it normally saves the table and,
    unless the budget ran out before every call was measured, records the signature as done."""
    key = device_key(device)
    table = _table(device)
    if not _ENABLED or signature in table["sessions"]:
        yield False
        return
    state = {"until": time.perf_counter() + (BUDGET_S if budget_s is None else float(budget_s)), "cut": 0}
    _ACTIVE[key] = state
    try:
        yield True
    finally:
        _ACTIVE.pop(key, None)
    if state["cut"]:
        _CUT[0] += state["cut"]
        warnings.warn(f"pm_kernels tuning: the session's budget ran out; {state['cut']} call(s) ran their "
                      f"untuned default and are measured by the next run (PM_KERNELS_TUNE_BUDGET_S)")
    else:
        table["sessions"].append(signature)
    _save(device)


def _capturing(device) -> bool:
    import torch

    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def choose(op: str, key: tuple, candidates: dict, device) -> str:
    """The name of the candidate to run for `op` on inputs described by `key` (dtype and sizes):
    candidates {name: zero-argument call -> tensor, or None where it does not load here} in order of
    preference, the first the untuned default. The calls must not change their inputs (in a session
    each runs several times). Outside a session and without a stored choice: the first."""
    names = list(candidates)
    if not _ENABLED or len(names) == 1:
        return names[0]
    table = _table(device)
    entry_key = "|".join([op, *map(str, key)])
    entry = table["choices"].get(entry_key)
    if entry is not None and entry["choice"] in candidates:
        return entry["choice"]
    state = _ACTIVE.get(device_key(device))
    if state is None or _capturing(device):
        return names[0]
    if time.perf_counter() > state["until"]:  # out of budget: the default, unmeasured, for the next session
        state["cut"] += 1
        return names[0]
    t0 = time.perf_counter()
    entry = _measure(candidates, device, TOLERANCE.get(str(key[0]).replace("torch.", ""), 2e-2))
    _SPENT[0] += time.perf_counter() - t0
    _SPENT[1] += 1
    table["choices"][entry_key] = entry
    _save(device)  # now, not only at the session's end: a killed process keeps what it measured
    return entry["choice"]


def _measure(candidates: dict, device, tol: float) -> dict:
    import torch

    first_error, ref = None, None
    us, failed, rejected = {}, {}, {}
    for name, call in candidates.items():
        try:
            out = call()
            if out is None:
                failed[name] = "does not load on this GPU"
                continue
            _sync(device)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run here is left out, and said so
            first_error = first_error or e
            failed[name] = f"{type(e).__name__}: {e}"[:300]
            warnings.warn(f"pm_kernels tuning: candidate {name} failed ({failed[name]}); left out")
            continue
        if ref is None:  # (kept in its dtype, compared without fp32 copies: the session runs inside a
            ref = out     # step whose activations are alive, on GPUs where memory is the limit)
        err = float((out - ref).abs().max().float() / ref.abs().max().float().clamp_min(1e-6))
        if not (bool(torch.isfinite(out).all()) and err <= tol):
            rejected[name] = err
            continue
        del out
        try:
            us[name] = round(_time_us(call, device), 2)
        except Exception as e:  # noqa: BLE001 - as above (e.g. a call that cannot be captured)
            failed[name] = f"{type(e).__name__}: {e}"[:300]
            warnings.warn(f"pm_kernels tuning: candidate {name} cannot be timed ({failed[name]}); left out")
    if not us:
        if first_error is not None:
            raise first_error
        raise RuntimeError(f"pm_kernels tuning: no candidate of {list(candidates)} ran correctly "
                           f"(failed: {failed}, rejected: {rejected})")
    entry = {"choice": min(us, key=us.get), "default": next(iter(candidates)), "us": us}
    if failed:
        entry["failed"] = failed
    if rejected:
        entry["rejected"] = rejected
    return entry


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _time_us(call: Callable, device) -> float:
    """Microseconds per call: on CUDA the median of TRIALS replays of a CUDA graph of REPS calls (what
    a captured step pays: launch overheads as in a graph), after two eager calls (compiles, algorithm
    searches); elsewhere wall-clock time of REPS eager calls."""
    import torch

    if torch.device(device).type != "cuda":
        call()
        times = []
        for _ in range(TRIALS):
            t0 = time.perf_counter()
            for _ in range(REPS):
                call()
            times.append((time.perf_counter() - t0) / REPS * 1e6)
        return statistics.median(times)
    current = torch.cuda.current_stream(device)
    # capture on the caller's stream unless that is the default (legacy) stream, which cannot capture
    stream = None if current == torch.cuda.default_stream(device) else current
    for _ in range(2):
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):  # (its own memory pool, freed with the graph)
        for _ in range(REPS):
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    times = []
    for _ in range(TRIALS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / REPS)
    del graph
    return statistics.median(times)
