#!/usr/bin/env bash
# One lent-GPU call of the whole check: gpu_check.sh under a time limit, then everything it wrote packed
# into ONE file (the device tool brings back at most 8 files; a check cut short by the limit still
# returns what it finished, since our records are written as each variant ends), and the log's tail.
#   bash benchmarks/gpu_device_run.sh "$OUT/gpu.tgz" COMMIT [LIMIT_S, default 480]
# COMMIT written out as this checkout's `git rev-parse HEAD` (a copied tree's .git can be stale there)
# with `carry: [".whl"]` (the diffusers + importlib_metadata wheels, which the lent machine lacks; fetched
# here first with: pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata==10.2.0) and
# timeout_s ~ LIMIT_S + 35.
# gpu_check.sh keeps itself within PM_BUDGET_S (default 450 s); LIMIT_S is the safety net around it.
set -u
TAR=${1:?tar file}; COMMIT=${2:?commit}; LIMIT=${3:-480}
W=$(mktemp -d)
timeout "$LIMIT" bash benchmarks/gpu_check.sh "$W" "$COMMIT" > "$W/check.log" 2>&1
echo "gpu_check exit status $? (124: stopped at ${LIMIT} s)" >> "$W/check.log"
# the stage's own `timeout`s run in process groups of their own, which the limit above does not reach:
# stop what the check left running before its files are packed (no record half-written in the tar)
LEFT="python3 (benchmarks/|-m pytest -v -m gpu)"  # the check's python processes (pkill -f: extended regex)
if pkill -TERM -f "$LEFT" 2>/dev/null; then
    echo "stopped the check's leftover processes" >> "$W/check.log"; sleep 3
    pkill -KILL -f "$LEFT" 2>/dev/null
fi
tar czf "$TAR" -C "$W" .
tail -c 11000 "$W/check.log"
