"""benchmarks/gpu_check.sh, the one lent-GPU run, checked without a GPU: every variant it names
exists, and its time budget (the issue: the whole check in under 8 minutes) holds. The budget test
runs the script with stand-ins for python3 / nvidia-smi on PATH (they log their arguments and take a
set time), so what is checked is the script's own logic: stage order, time limits cut to what is
left, the fresh processes stopped and the rest named when time runs short, the goals table last."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _default_list(name: str) -> list[str]:
    m = re.search(r"\$\{PM_" + name + r":-([^}]*)\}", SCRIPT.read_text())
    assert m, name
    return m.group(1).split(",")


def test_every_variant_the_script_names_exists():
    from pm_bench import gpu_ours

    ours = _default_list("OURS")
    fresh = [e.split(":", 1)[-1] for e in _default_list("FRESH")]
    assert "torch-cuda" in ours and "reference" in ours and "profile" in ours
    assert set(ours) <= set(gpu_ours.ALL) and set(fresh) <= set(gpu_ours.ALL)
    assert len(set(_default_list("FRESH"))) == len(_default_list("FRESH"))  # no process run twice


STUB_PYTHON = """#!/usr/bin/env bash
echo "python3 $* [alloc=${PYTORCH_CUDA_ALLOC_CONF:-}] [generic=${PM_KERNELS_GENERIC_SIZES:-}] [ws=${CUBLAS_WORKSPACE_CONFIG:-},${CUBLASLT_WORKSPACE_SIZE:-}] [wscap=${CUDNN_CONV_WSCAP_DBG:-}] [tune=${PM_KERNELS_TUNE:-}] [budget=${PM_KERNELS_TUNE_BUDGET_S:-}]" >> "$STUB_LOG"
case "$*" in
  *bench_gpu.py*--compile*) sleep "$STUB_BENCH_S";;
  *bench_gpu.py*) sleep "$STUB_FRESH_S";;
  *pytest*) sleep 1;;
esac
exit 0
"""


def _run(tmp_path, budget: int, bench_s: int, fresh_s: int, stages="tests,kernels,bench,start,fresh", **extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(STUB_PYTHON)
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'stub GPU'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "calls.log"
    work = tmp_path / "repo"  # the script runs from the repository root: a copy of what it reads
    (work / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, work / "benchmarks")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "STUB_BENCH_S": str(bench_s), "STUB_FRESH_S": str(fresh_s), "PM_BUDGET_S": str(budget),
           "PM_SITE": str(tmp_path / "site"), "PM_WORK": str(tmp_path / "work"), "PM_RESERVE_S": "1", "PM_MIN_S": "2", "PM_FRESH_MIN_S": "2", "PM_STAGES": stages,
           **extra}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "out"), "abc123"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=120)
    calls = log.read_text().splitlines() if log.exists() else []
    return r, calls


def test_the_check_keeps_to_its_time_budget(tmp_path):
    r, calls = _run(tmp_path, budget=10, bench_s=2, fresh_s=2)
    assert r.returncode == 0, r.stderr
    order = [c for c in calls if "import" not in c]
    assert "pytest" in order[0] and "bench_kernels.py" in order[1] and "--compile" in order[2]
    assert "[generic=]" in order[1] and "[generic=]" in order[2]
    # the kernels' size-rule A/B and sweep wait until the goals' measurements are done: none here, the
    # budget ran out in the new processes
    assert not [c for c in order if "sweep_kernels.py" in c or "[generic=1]" in c], order
    # the GPU tests without kernel tuning at the tiny model's shapes; the benchmarks with it (the default)
    assert "[tune=0]" in order[0] and all("[tune=]" in c for c in order[1:])
    # kernel tuning's budget per session: 60 s in the bench stage, 25 s in each new process
    assert "[budget=60]" in order[2] and "[budget=]" in order[1]
    assert "bench_start.py" not in "".join(order)  # no bundle was made: the stage has nothing to run
    fresh = [c for c in order if "bench_gpu.py" in c and "--compile" not in c]
    # 10 s budget, 1 s reserve, ~2 + 2 s of stand-ins and the script's own time before: one to three
    # 2-second processes, then the stop (a second more than it had: one process under a loaded machine)
    assert 1 <= len(fresh) <= 3, order
    assert all("[budget=25]" in c for c in fresh)
    assert "--ours torch-cuda-low-memory-1024-phases " in fresh[0] + " "  # the list's first entry first
    assert "skipped for time" in r.stdout and "torch-cuda-lean-bands" in r.stdout.split("skipped for time")[1]
    assert "gpu_goals.py" in order[-1]  # the goals table always comes last


def test_fresh_entries_set_their_environment_one_process_each(tmp_path):
    """A new-process entry's prefix sets its environment for that process only: "expandable:" the
    allocator's expandable segments, "smallws:" those and a 4 MiB cuBLAS workspace, "wscap:" those
    and cuDNN's workspace capped at 128 MiB, "generic:" PM_KERNELS_GENERIC_SIZES=1, each into its own
    file."""
    r, calls = _run(tmp_path, budget=60, bench_s=0, fresh_s=0, stages="fresh",
                    PM_FRESH="expandable:torch-cuda-low-memory-1024,smallws:torch-cuda-low-memory-1024,"
                             "generic:torch-cuda,torch-cuda-shared-pool,wscap:torch-cuda-low-memory-1024,torch-cuda",
                    PM_KERNELS_GENERIC_SIZES="", PYTORCH_CUDA_ALLOC_CONF="", CUBLAS_WORKSPACE_CONFIG="")
    assert r.returncode == 0, r.stderr
    fresh = [c for c in calls if "bench_gpu.py" in c]
    assert len(fresh) == 6, calls
    assert "gpu-fresh-wscap.jsonl" in fresh[4] and "[alloc=expandable_segments:True] [generic=] [ws=,] [wscap=128]" \
        in fresh[4]
    assert "gpu-fresh.jsonl" in fresh[5] and "[alloc=] [generic=] [ws=,] [wscap=]" in fresh[5]  # not inherited
    assert "--ours torch-cuda-low-memory-1024 " in fresh[0] and "gpu-fresh-expandable.jsonl" in fresh[0]
    assert "[alloc=expandable_segments:True] [generic=] [ws=,]" in fresh[0]
    assert "--ours torch-cuda-low-memory-1024 " in fresh[1] and "gpu-fresh-smallws.jsonl" in fresh[1]
    assert "[alloc=expandable_segments:True] [generic=] [ws=:4096:1,4096]" in fresh[1]
    assert "--ours torch-cuda " in fresh[2] and "gpu-fresh-generic-sizes.jsonl" in fresh[2]
    assert "[alloc=] [generic=1] [ws=,]" in fresh[2]
    assert "--ours torch-cuda-shared-pool " in fresh[3] and "gpu-fresh.jsonl" in fresh[3]
    assert "[alloc=] [generic=] [ws=,]" in fresh[3]


def test_the_first_new_processes_run_before_the_start_up_stage(tmp_path):
    """The first PM_FRESH_FIRST new-process entries (the unmet memory goals') run before the start-up
    stage (the cold start's report), the rest after it, in list order."""
    bundle = tmp_path / "work" / "bundle-sd15-torch"
    bundle.mkdir(parents=True)
    (bundle / "bundle.json").write_text("{}")  # what bench_gpu.py leaves in the work folder
    r, calls = _run(tmp_path, budget=60, bench_s=0, fresh_s=0, stages="start,fresh", PM_FRESH_FIRST="2",
                    PM_FRESH="torch-cuda-low-memory-1024,torch-cuda-shared-pool,torch-cuda,torch-cuda-int8")
    assert r.returncode == 0, r.stderr
    order = [c for c in calls if "bench_start.py" in c or "bench_gpu.py" in c]
    assert ["bench_start.py" in c for c in order] == [False, False, True, False, False], order
    assert "--ours torch-cuda-low-memory-1024 " in order[0] and "--ours torch-cuda-int8 " in order[4]
    assert f"--bundle {bundle}" in order[2]


def test_new_process_settings_do_not_outlive_their_entry(tmp_path):
    """When the time runs out inside the new-process list, the last entry's settings (here a small
    cuBLAS workspace) are not left in the environment of the stages after it."""
    r, calls = _run(tmp_path, budget=5, bench_s=0, fresh_s=3, stages="fresh,extra",
                    PM_FRESH="smallws:torch-cuda-low-memory-1024,torch-cuda", PYTORCH_CUDA_ALLOC_CONF="",
                    CUBLAS_WORKSPACE_CONFIG="")
    assert r.returncode == 0, r.stderr
    fresh = [c for c in calls if "bench_gpu.py" in c and "gpu-fresh" in c]
    assert len(fresh) == 1 and "[ws=:4096:1,4096]" in fresh[0]  # the second entry: skipped for time
    after = [c for c in calls if "gpu-wscap256" in c]
    assert after and all("[ws=,]" in c for c in after), after


def test_the_kernel_rule_answers_run_after_the_goals_measurements(tmp_path):
    """Stage kernel-ab: the kernel benchmark again with the kernels compiled without size
    specialisation (the A/B of that rule), then the launch-configuration sweep; after the new
    processes (the memory goals), before the goals table."""
    r, calls = _run(tmp_path, budget=60, bench_s=0, fresh_s=0, stages="kernels,fresh,kernel-ab",
                    PM_FRESH="torch-cuda-low-memory-1024,torch-cuda")
    assert r.returncode == 0, r.stderr
    order = [c for c in calls if "import" not in c]
    assert "bench_kernels.py" in order[0] and "[generic=]" in order[0] and "--only" not in order[0]
    assert "--ours torch-cuda-low-memory-1024 " in order[1] + " " and "--ours torch-cuda " in order[2] + " "
    assert "bench_kernels.py" in order[3] and "--only group_norm_silu," in order[3] and "[generic=1]" in order[3]
    assert "sweep_kernels.py --max-seconds" in order[4] and "[generic=]" in order[4]
    assert "gpu_goals.py" in order[5] and len(order) == 6


def test_the_opt_in_features_tests_run_after_the_goals_measurements(tmp_path):
    """The gpu tests in two processes: the main ones first (tuning off), the shared-pool / one-stream /
    PDL ones (opt-in features, their first real run) after the new processes, before the kernel A/B."""
    r, calls = _run(tmp_path, budget=80, bench_s=0, fresh_s=0, stages="tests,fresh,opt-in-tests,kernel-ab",
                    PM_FRESH="torch-cuda")
    assert r.returncode == 0, r.stderr
    order = [c for c in calls if "import" not in c]
    assert "pytest" in order[0] and '-k not (shared_pool or one_stream or pdl)' in order[0]
    assert "--ours torch-cuda" in order[1]
    assert "pytest" in order[2] and "-k shared_pool or one_stream or pdl" in order[2] and "[tune=0]" in order[2]
    assert "bench_kernels.py" in order[3] and "gpu_goals.py" in order[-1]


def test_the_bench_stage_leaves_the_first_new_processes_their_time(tmp_path):
    """A bench stage that would run to the end of the budget is cut PM_FRESH_RESERVE_S before it, so
    the new processes of the memory goals still run."""
    r, calls = _run(tmp_path, budget=10, bench_s=30, fresh_s=1, stages="bench,fresh", PM_FRESH_RESERVE_S="4",
                    PM_FRESH="torch-cuda-low-memory-1024,torch-cuda")
    assert r.returncode == 0, r.stderr
    fresh = [c for c in calls if "bench_gpu.py" in c and "--compile" not in c]
    assert fresh and "--ours torch-cuda-low-memory-1024 " in fresh[0] + " ", calls


def test_a_stage_with_no_time_left_is_skipped_and_said(tmp_path):
    r, calls = _run(tmp_path, budget=6, bench_s=6, fresh_s=1, stages="bench,fresh")
    assert r.returncode == 0, r.stderr
    bench = [c for c in calls if "--compile" in c]
    assert len(bench) == 1  # its time limit was cut to what was left (the stand-in was stopped by it)
    assert not [c for c in calls if "bench_gpu.py" in c and "--compile" not in c]
    assert "skipped for time" in r.stdout and "gpu_goals.py" in calls[-1]


@pytest.mark.skipif(shutil.which("pkill") is None, reason="needs pkill (procps)")
def test_the_device_run_stops_what_the_check_left_running_before_packing(tmp_path):
    """gpu_device_run.sh's limit stops gpu_check.sh, but not a stage's `timeout` (a process group of
    its own) nor the python3 under it: those are stopped before the files are packed, so no record is
    half-written in the tar. A stand-in check starts a stand-in python3 that would outlive the limit."""
    import tarfile

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/usr/bin/env bash\nsleep 60\n")
    (bin_dir / "python3").chmod(0o755)
    work = tmp_path / "repo"
    (work / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "gpu_device_run.sh", work / "benchmarks")
    (work / "benchmarks" / "gpu_check.sh").write_text(
        'echo started > "$1/started.txt"\ntimeout 100 python3 benchmarks/bench_gpu.py --stand-in\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "benchmarks/gpu_device_run.sh", str(tmp_path / "gpu.tgz"), "abc123", "2"], cwd=work,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "stopped the check's leftover processes" in r.stdout, r.stdout + r.stderr
    left = subprocess.run(["pgrep", "-f", "python3 benchmarks/bench_gpu.py --stand-in"], capture_output=True)
    assert left.returncode == 1, left.stdout  # nothing of the check still running
    with tarfile.open(tmp_path / "gpu.tgz") as tar:
        assert {"./started.txt", "./check.log"} <= set(tar.getnames())
