#!/usr/bin/env bash
# The GPU fast-path check in one run (issue: fused kernels + one CUDA graph per step), ordered by
# priority: the gpu-marked tests (kernels at SD 1.5 shapes, the torch-cuda backend on the tiny
# model), the kernel benchmark, bench_gpu.py (peers and ours on SD-1.5-shaped random weights, 512 px,
# 50 steps; torch.compile after the peers), start-up in new processes (warm, and cold: an empty Triton cache,
# kernel tuning for at most PM_COLD_TUNE_BUDGET_S, 30 s),
# the memory variants once more each in a NEW process ("fresh": nothing an earlier variant left in
# the process counts in its peak; "expandable:" entries with the allocator's expandable segments,
# which pm-run --low-memory sets; "smallws:" entries with them and cuBLAS's workspace cut from 32 MiB
# per (handle, stream) to 4 MiB (CUBLAS_WORKSPACE_CONFIG=:4096:1, CUBLASLT_WORKSPACE_SIZE=4096 KiB: what
# --low-memory could set too); "wscap:" entries with them and cuDNN's convolution workspace capped at
# 128 MiB (CUDNN_CONV_WSCAP_DBG: its algorithm search in the first image may try workspaces of
# hundreds of MB, on top of the weights); "generic:" entries with PM_KERNELS_GENERIC_SIZES=1, pm_kernels
# compiled without size specialisation, the A/B of that rule; the unmet goals first), the kernels'
# size-rule A/B and launch-configuration sweep (stage kernel-ab: answers for rules the on-device tuning
# now decides, after the goals' measurements), two short runs under other allocator /
# cuDNN workspace settings (stage "extra", off by default), and the goals table (gpu_goals.py ->
# OUT/goals.md). Records land in OUT as each variant ends.
# PM_STAGES picks stages (default tests,kernels,bench,start,fresh,opt-in-tests,kernel-ab; they run in this
# order, except that
# the first PM_FRESH_FIRST (6) new-process entries run before the start-up stage: the unmet goals'
# processes first (memory; the step's PDL and GEGLU-GEMM candidates), the cold start's report before
# the rest).
# Time: the whole run keeps within PM_BUDGET_S seconds (default 450, under the issue's 8 minutes):
# each stage's time limit is cut to what is left (minus PM_RESERVE_S, 15, for the goals table), a
# stage with under PM_MIN_S (60) seconds left is skipped, the bench stage leaves the new processes
# PM_FRESH_RESERVE_S (75) where it can, and the fresh processes stop when under
# PM_FRESH_MIN_S (40) are left; what was skipped is printed ("skipped for time"). Kernel tuning
# (pm_kernels.tuning, in a shape's first image) measures for at most PM_BENCH_TUNE_BUDGET_S (60 s)
# per session in the bench stage and PM_FRESH_TUNE_BUDGET_S (25 s) in each new process (its choices
# are saved as measured: the next process goes on where one stopped); the records say what was cut.
# Timed on an H200 (2026-11-26/27, other lists): tests 35-57 s (without the tuning test and the shared-pool / one-stream / PDL ones), kernels 8 s
# (kernel-ab: the generic-sizes A/B on 6 ops <= 40 s, the sweep <= 25 s, not yet timed), bench_gpu 162 s
# with 14 of our variants + peers + compile (before kernel tuning: its first image now tunes, <= 120 s),
# ~18-25 s per new process, start-up ~40 s for three warm variants.
#   bash benchmarks/gpu_check.sh OUTDIR COMMIT
# On a machine without diffusers, put its wheels in .whl/ (they are installed to PM_SITE, /tmp/site).
set -u
OUT=${1:?outdir}; export PM_COMMIT=${2:?commit}
SITE=${PM_SITE:-/tmp/site}
WORK=${PM_WORK:-/tmp/pm-gpu}  # bench_gpu's work folder: the SD-1.5-shaped model and bundle it makes
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$PWD
mkdir -p "$SITE" "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null && [ -d .whl ]; then
    pip install -q --no-deps --target "$SITE" .whl/*.whl
fi
# the installed names of export/ and kernels/ (pyproject's package-dir), without building a wheel here
ln -sfn "$PWD/export" "$SITE/pm_export"; ln -sfn "$PWD/kernels" "$SITE/pm_kernels"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
STAGES=",${PM_STAGES:-tests,kernels,bench,start,fresh,opt-in-tests,kernel-ab},"
NEW="shared_pool or one_stream or pdl"  # the opt-in features' gpu tests (stage opt-in-tests)
stage() { case "$STAGES" in *",$1,"*) return 0;; *) return 1;; esac; }
[ "${PM_GPU_TESTS:-1}" = 1 ] || STAGES=${STAGES/,tests,/,}
[ "${PM_EXTRA_RUNS:-1}" = 1 ] || STAGES=${STAGES/,extra,/,}
BUDGET=${PM_BUDGET_S:-450}; RESERVE=${PM_RESERVE_S:-15}; MIN=${PM_MIN_S:-60}; FRESH_MIN=${PM_FRESH_MIN_S:-40}
left() { echo $(( BUDGET - RESERVE - SECONDS )); }
# limit CAP [FLOOR]: the smaller of CAP and the time left; 0 when under FLOOR (default MIN) seconds are left
limit() { local l; l=$(left); [ "$l" -lt "${2:-$MIN}" ] && { echo 0; return; }; [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
skipped() { echo "== skipped for time ($(left) s left of ${BUDGET} s): $*"; }
# go NAME CAP [MIN]: whether stage NAME runs now, with time limit T; says so where time is short
go() { stage "$1" || return 1; T=$(limit "$2" "${3:-$MIN}"); [ "$T" -gt 0 ] && return 0; skipped "stage $1"; return 1; }
if go tests ${PM_TESTS_TIMEOUT:-150}; then
    echo "== gpu tests"
    # the shared-pool / one-stream / PDL tests (opt-in features; their code's first real run) in a
    # process of their own, in stage opt-in-tests after the goals' measurements: a fault there (an
    # illegal address poisons the CUDA context) cannot fail the others
    # PM_KERNELS_TUNE=0: no kernel tuning at the tiny model's shapes in every pipeline test (each pytest
    # process has its own empty tuning folder: candidates compiled and timed for nothing the figures use);
    # the tuning test turns it on for itself, and the bench stage tunes SD 1.5's shapes
    PM_KERNELS_TUNE=0 timeout "$T" python3 -m pytest -v -m gpu -p no:cacheprovider -k "not ($NEW)" tests/test_kernels.py \
        tests/test_torch_cuda.py tests/test_int8_weights.py tests/test_vae_bands.py 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -8  # the whole output (failures' tracebacks) in gpu_tests.log
fi
if go kernels 60 $(( MIN / 2 )); then
echo "== kernels"
timeout "$T" python3 benchmarks/bench_kernels.py --reps 30 --out "$OUT/kernels-gpu.jsonl" 2>&1 | grep -v -i warn \
    | tee "$OUT/bench_kernels.log"
fi
if go bench ${PM_BENCH_TIMEOUT:-300}; then
# PM_FRESH_RESERVE_S (75): what the bench stage leaves the first new processes (the memory goals'),
# where that still gives it PM_MIN_S; its own variants are in priority order (a cut loses the tail)
if stage fresh; then R=$(( $(left) - ${PM_FRESH_RESERVE_S:-75} )); [ "$R" -lt "$T" ] && [ "$R" -ge "$MIN" ] && T=$R; fi
echo "== pipeline: peers and torch-cuda ($T s at most)"
# PM_OURS: which of our variants (gpu_ours.ALL); the default: the step-time questions (torch-cuda
# tunes its kernels in its first image here, the first process on this machine: its record has the
# choices and the seconds it took; torch-cuda-untuned is the A/B of that choice; torch-cuda-kv-tables
# of the two-row K/V buffers (kv_step, new default: the step's own K/V in the step); the kernels'
# size rule against their unspecialised compile (torch-cuda-generic-sizes), the fusions against the
# default before them and one by one, the GroupNorm implementations forced, the step's profile;
# cuDNN attention is one of the tuner's candidates now) and the per-stage memory; the memory
# variants proper (low memory, int8) run in the new-process stage below. Left out: the ablations
# already recorded in benchmarks/results (no-kv-tables, the untiled 1024 decode), profile-gn-auto,
# for time: pre-fusion (its fusions' ablations one by one run), hf-modules (the 6.80 -> 7.09 ms
# suspect: the 2-byte finding explains more), -phases in the shared process (a new one runs below);
# and the shared-pool / one-stream / PDL / GEGLU-in-the-GEMM variants, whose first real run is this
# one: only in new processes (below), where a fault in them (an illegal address poisons a CUDA
# context) cannot take the shared run's later variants with it (torch.compile runs before ours); their records carry
# step and image times too.
OURS=${PM_OURS:-reference,torch-cuda,torch-cuda-untuned,torch-cuda-kv-tables,torch-cuda-generic-sizes,torch-cuda-vae-nchw,torch-cuda-gn-auto,torch-cuda-gn-grouped,torch-cuda-unfused-epilogues,torch-cuda-no-time-tables,torch-cuda-no-step-kernels,torch-cuda-no-te-graph,profile}
PM_KERNELS_TUNE_BUDGET_S=${PM_BENCH_TUNE_BUDGET_S:-60} \
timeout "$T" python3 benchmarks/bench_gpu.py --work "$WORK" --out "$OUT/gpu.jsonl" --compile \
    --ours "$OURS" 2>&1 | grep -v -i "warn" | tee "$OUT/bench_gpu.log"
fi
# by priority: the unmet goals as the user runs them (pm-run --low-memory sets expandable segments;
# the 1024 px -phases entry first: its first image tunes the kernels at 1024 px, a shape the shared run
# has not measured, and records where the memory goes; the goal's own entry then runs with the
# tuning cache warm, as every later pm-run on the machine does),
# the candidates for them (shared_pool; for the step: PDL, the GEGLU in its GEMM, beside torch-cuda in
# a new process of its own) and where their memory goes (-phases: per stage, by pool, in a new
# process: the first image's searches included), their A/B variants, then the goals already met (a
# check for regressions)
FRESH=${PM_FRESH:-expandable:torch-cuda-low-memory-1024-phases,expandable:torch-cuda-low-memory-1024,torch-cuda-shared-pool,smallws:torch-cuda-low-memory-1024,torch-cuda-pdl,wscap:torch-cuda-low-memory-1024,torch-cuda,torch-cuda-geglu-gemm,torch-cuda-shared-pool-offload-te,expandable:torch-cuda-low-memory-1024-one-stream,torch-cuda-shared-pool-phases,torch-cuda-shared-pool-one-stream,expandable:torch-cuda-shared-pool,expandable:torch-cuda-low-memory-1024-cudnn-heuristics,torch-cuda-phases,torch-cuda-lean-bands-no-kv,expandable:torch-cuda-low-memory-1024-no-ff-chunk,expandable:torch-cuda-low-memory-int8-1024,expandable:torch-cuda-lean-bands-no-kv,expandable:torch-cuda-low-memory,torch-cuda-int8,expandable:torch-cuda-low-memory-int8,torch-cuda-lean-bands,torch-cuda-low-memory-1024}
entries=(${FRESH//,/ })
FIRST=${PM_FRESH_FIRST:-6}  # this many entries run before the start-up stage, the rest after it
# fresh_run FROM TO: entries FROM .. TO-1, each in a new process; when the time runs out, names what is
# left of the whole list and sets FRESH_OUT
fresh_run() {
    local i e v
    for (( i=$1; i<$2 && i<${#entries[@]}; i++ )); do
        e=${entries[$i]}; v=${e#*:}
        # the previous entry's settings go first: a stage after an early return must not inherit them
        unset PYTORCH_CUDA_ALLOC_CONF PM_KERNELS_GENERIC_SIZES CUBLAS_WORKSPACE_CONFIG CUBLASLT_WORKSPACE_SIZE \
            CUDNN_CONV_WSCAP_DBG
        T=$(limit ${PM_FRESH_TIMEOUT:-60} "$FRESH_MIN")
        if [ "$T" -eq 0 ]; then skipped "${entries[*]:$i}"; FRESH_OUT=1; return; fi
        case "$e" in
            expandable:*) export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; conf=expandable; out=gpu-fresh-expandable;;
            smallws:*) export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUBLAS_WORKSPACE_CONFIG=:4096:1 \
                       CUBLASLT_WORKSPACE_SIZE=4096; conf=expandable-smallws; out=gpu-fresh-smallws;;
            wscap:*) export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDNN_CONV_WSCAP_DBG=128
                     conf=expandable-wscap128; out=gpu-fresh-wscap;;
            generic:*) export PM_KERNELS_GENERIC_SIZES=1; conf=generic-sizes; out=gpu-fresh-generic-sizes;;
            *) conf=default; out=gpu-fresh;;
        esac
        PM_KERNELS_TUNE_BUDGET_S=${PM_FRESH_TUNE_BUDGET_S:-25} timeout "$T" python3 benchmarks/bench_gpu.py \
            --work "$WORK" --out "$OUT/$out.jsonl" \
            --only ours --ours "$v" 2>&1 | grep "^  torch-cuda" | sed "s/^/[$conf] /" | tee -a "$OUT/bench_gpu_fresh.log"
    done
    unset PYTORCH_CUDA_ALLOC_CONF PM_KERNELS_GENERIC_SIZES CUBLAS_WORKSPACE_CONFIG CUBLASLT_WORKSPACE_SIZE \
        CUDNN_CONV_WSCAP_DBG
}
if stage fresh; then
    echo "== memory variants, each in a new process (expandable: with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True); the first $FIRST before the start-up stage"
    fresh_run 0 "$FIRST"
fi
if go start ${PM_START_TIMEOUT:-90}; then
echo "== start-up: new process to first image, warm caches and cold (an empty Triton cache)"
if [ -f "$WORK/bundle-sd15-torch/bundle.json" ]; then
    PM_KERNELS_TUNE_BUDGET_S=${PM_FRESH_TUNE_BUDGET_S:-25} timeout "$T" python3 benchmarks/bench_start.py \
        --bundle "$WORK/bundle-sd15-torch" \
        --device cuda --size 512 --steps 50 --runs 1 --variants standalone,cold --deadline $(( T - 3 )) --cold-tune-budget ${PM_COLD_TUNE_BUDGET_S:-30} \
        --out "$OUT/start-gpu.jsonl" 2>&1 | grep -v -i "warn" | tee "$OUT/bench_start.log"
fi
fi
if stage fresh && [ -z "${FRESH_OUT:-}" ] && [ "$FIRST" -lt "${#entries[@]}" ]; then
    echo "== memory variants, each in a new process: the rest"
    fresh_run "$FIRST" "${#entries[@]}"
fi
if go opt-in-tests 60 20; then
    echo "== gpu tests of the opt-in features (shared pool, one stream, PDL)"
    PM_KERNELS_TUNE=0 timeout "$T" python3 -m pytest -v -m gpu -p no:cacheprovider -k "$NEW" \
        tests/test_torch_cuda.py tests/test_kernels.py 2>&1 | tee "$OUT/gpu_tests_new.log" | tail -8
fi
if go kernel-ab 40 $(( MIN / 2 )); then  # after the goals' measurements: answers for the kernels' rules
echo "== kernels: the size-rule A/B and the launch-configuration sweep"
# the same memory-bound kernels compiled without size specialisation (their 2-byte accesses before
# kernels/_dispatch.py's rule): the A/B of that rule, kernel by kernel
PM_KERNELS_GENERIC_SIZES=1 timeout "$T" python3 benchmarks/bench_kernels.py --reps 30 \
    --only group_norm_silu,group_norm_temb_silu,group_norm_silu_nchw,add_layer_norm,add_bias_residual,step_update \
    --out "$OUT/kernels-gpu-generic-sizes.jsonl" 2>&1 | grep -v -i warn | tee "$OUT/bench_kernels_generic_sizes.log"
# the Triton attention's and geglu_linear's launch configurations against SDPA / cuBLAS + GEGLU (head
# dim 40 now 16-byte; the head dim as one tile or two): what their block-size rules should be (which
# implementation runs per shape is pm_kernels.tuning's on-device choice now, measured in the bench
# stage: this is the wider sweep behind its candidate list, at most 25 s)
T=$(limit 25 $(( MIN / 2 )))
[ "$T" -gt 0 ] && timeout "$T" python3 benchmarks/sweep_kernels.py --max-seconds $(( T > 12 ? T - 10 : 2 )) \
    --out "$OUT/kernel-sweep-gpu.jsonl" 2>&1 | grep -v -i warn | tee "$OUT/sweep_kernels.log"
fi
if stage extra; then  # last: what matters less if the time runs out
echo "== our memory variants again with the allocator's expandable segments (reserved vs allocated)"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout ${PM_ALLOC_TIMEOUT:-80} python3 benchmarks/bench_gpu.py \
    --work "$WORK" --out "$OUT/gpu-expandable.jsonl" --only ours \
    --ours torch-cuda-lean,torch-cuda-low-memory,torch-cuda-low-memory-1024 2>&1 | grep -v -i "warn" \
    | tee "$OUT/bench_gpu_expandable.log"
echo "== and with cuDNN's workspace capped at 256 MiB per allocation (first-image peak of cuDNN's algorithm timing)"
CUDNN_CONV_WSCAP_DBG=256 timeout ${PM_WSCAP_TIMEOUT:-80} python3 benchmarks/bench_gpu.py \
    --work "$WORK" --out "$OUT/gpu-wscap256.jsonl" --only ours \
    --ours torch-cuda,torch-cuda-phases,torch-cuda-low-memory 2>&1 | grep -v -i "warn" \
    | tee "$OUT/bench_gpu_wscap256.log"
fi
echo "== the GPU issue's goals against these records (benchmarks/gpu_goals.py)"
python3 benchmarks/gpu_goals.py "$OUT" | tee "$OUT/goals.md"
