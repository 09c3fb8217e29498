#!/usr/bin/env bash
# The GPU fast-path check in one run (issue: fused kernels + one CUDA graph per step), ordered by
# priority: the gpu-marked tests (kernels at SD 1.5 shapes, the torch-cuda backend on the tiny
# model), the kernel benchmark, bench_gpu.py (peers and ours on SD-1.5-shaped random weights, 512 px,
# 50 steps; torch.compile last), start-up in new processes (warm, and cold: an empty Triton cache),
# the memory variants once more each in a NEW process ("fresh": nothing an earlier variant left in
# the process counts in its peak; some also with the allocator's expandable segments; the unmet
# goals' variants first), two short runs under other allocator / cuDNN workspace settings (stage
# "extra", off by default), and the goals table (gpu_goals.py -> OUT/goals.md). Records land in OUT.
# PM_STAGES picks stages (default tests,kernels,bench,start,fresh; they run in this order).
# Timed on an H200 (two runs, 2026-11-26/27): tests 35-57 s, kernels 8 s, bench_gpu 162 s with 14 of
# our variants + peers + compile, ~18 s per new process, start-up ~40 s for three warm variants: the
# defaults below (15 in-process entries, a warm and a cold start, 13 new processes) come to an
# estimated ~9-10 min (not timed with these lists); run it with a ~590 s limit: it is ordered so
# that what it has not reached by then is the least needed.
#   bash benchmarks/gpu_check.sh OUTDIR COMMIT
# On a machine without diffusers, put its wheels in .whl/ (they are installed to /tmp/site).
set -u
OUT=${1:?outdir}; export PM_COMMIT=${2:?commit}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/site "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null && [ -d .whl ]; then
    pip install -q --no-deps --target /tmp/site .whl/*.whl
fi
# the installed names of export/ and kernels/ (pyproject's package-dir), without building a wheel here
ln -sfn "$PWD/export" /tmp/site/pm_export; ln -sfn "$PWD/kernels" /tmp/site/pm_kernels
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
STAGES=",${PM_STAGES:-tests,kernels,bench,start,fresh},"
stage() { case "$STAGES" in *",$1,"*) return 0;; *) return 1;; esac; }
[ "${PM_GPU_TESTS:-1}" = 1 ] || STAGES=${STAGES/,tests,/,}
[ "${PM_EXTRA_RUNS:-1}" = 1 ] || STAGES=${STAGES/,extra,/,}
if stage tests; then
    echo "== gpu tests"
    timeout ${PM_TESTS_TIMEOUT:-120} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_torch_cuda.py \
        tests/test_int8_weights.py tests/test_vae_bands.py 2>&1 \
        | tail -8
fi
if stage kernels; then
echo "== kernels"
timeout 60 python3 benchmarks/bench_kernels.py --reps 30 --out "$OUT/kernels-gpu.jsonl" 2>&1 | grep -v -i warn \
    | tee "$OUT/bench_kernels.log"
fi
if stage bench; then
echo "== pipeline: peers and torch-cuda"
# PM_OURS: which of our variants (gpu_ours.ALL); the default: the step-time questions (this session's
# fusions against the default before them and one by one, the GroupNorm implementations, the
# standalone modules, cuDNN attention, the profiles), the per-stage memory and one in-process
# low-memory image; the memory variants proper (int8 too) run in the new-process stage below. Left
# out: the ablations already recorded in benchmarks/results (no-kv-tables, the untiled 1024 decode).
OURS=${PM_OURS:-reference,torch-cuda,torch-cuda-pre-fusion,torch-cuda-gn-auto,torch-cuda-gn-grouped,torch-cuda-unfused-epilogues,torch-cuda-no-time-tables,torch-cuda-no-step-kernels,torch-cuda-no-te-graph,torch-cuda-hf-modules,torch-cuda-cudnn-attention,torch-cuda-low-memory,torch-cuda-phases,profile,profile-gn-auto}
timeout ${PM_BENCH_TIMEOUT:-360} python3 benchmarks/bench_gpu.py --work /tmp/pm-gpu --out "$OUT/gpu.jsonl" --compile \
    --ours "$OURS" 2>&1 | grep -v -i "warn" | tee "$OUT/bench_gpu.log"
fi
if stage start; then
echo "== start-up: new process to first image (warm caches), standalone modules vs diffusers/transformers"
if [ -f /tmp/pm-gpu/bundle-sd15-torch/bundle.json ]; then
    timeout ${PM_START_TIMEOUT:-90} python3 benchmarks/bench_start.py --bundle /tmp/pm-gpu/bundle-sd15-torch \
        --device cuda --size 512 --steps 50 --runs 1 --variants standalone,cold \
        --out "$OUT/start-gpu.jsonl" 2>&1 | grep -v -i "warn" | tee "$OUT/bench_start.log"
fi
fi
if stage fresh; then
echo "== memory variants, each in a new process (default allocator, then expandable segments)"
FRESH=${PM_FRESH:-torch-cuda-low-memory-1024,torch-cuda-low-memory-1024-cudnn-heuristics,torch-cuda-low-memory-1024-no-ff-chunk,torch-cuda-lean-bands-no-kv,torch-cuda,torch-cuda-low-memory,torch-cuda-low-memory-int8-1024,torch-cuda-low-memory-int8,torch-cuda-int8,torch-cuda-lean-bands}
FRESH_EXPANDABLE=${PM_FRESH_EXPANDABLE:-torch-cuda-low-memory-1024,torch-cuda-lean-bands-no-kv,torch-cuda-low-memory-int8-1024}
for conf in default expandable; do
    list=$FRESH; [ $conf = expandable ] && list=$FRESH_EXPANDABLE
    for v in ${list//,/ }; do
        if [ $conf = expandable ]; then export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True; out=gpu-fresh-expandable
        else unset PYTORCH_CUDA_ALLOC_CONF; out=gpu-fresh; fi
        timeout ${PM_FRESH_TIMEOUT:-60} python3 benchmarks/bench_gpu.py --work /tmp/pm-gpu --out "$OUT/$out.jsonl" \
            --only ours --ours "$v" 2>&1 | grep "^  torch-cuda" | sed "s/^/[$conf] /" | tee -a "$OUT/bench_gpu_fresh.log"
    done
done
unset PYTORCH_CUDA_ALLOC_CONF
fi
if stage extra; then  # last: what matters less if the time runs out
echo "== our memory variants again with the allocator's expandable segments (reserved vs allocated)"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout ${PM_ALLOC_TIMEOUT:-80} python3 benchmarks/bench_gpu.py \
    --work /tmp/pm-gpu --out "$OUT/gpu-expandable.jsonl" --only ours \
    --ours torch-cuda-lean,torch-cuda-low-memory,torch-cuda-low-memory-1024 2>&1 | grep -v -i "warn" \
    | tee "$OUT/bench_gpu_expandable.log"
echo "== and with cuDNN's workspace capped at 256 MiB per allocation (first-image peak of cuDNN's algorithm timing)"
CUDNN_CONV_WSCAP_DBG=256 timeout ${PM_WSCAP_TIMEOUT:-80} python3 benchmarks/bench_gpu.py \
    --work /tmp/pm-gpu --out "$OUT/gpu-wscap256.jsonl" --only ours \
    --ours torch-cuda,torch-cuda-phases,torch-cuda-low-memory 2>&1 | grep -v -i "warn" \
    | tee "$OUT/bench_gpu_wscap256.log"
fi
echo "== the GPU issue's goals against these records (benchmarks/gpu_goals.py)"
python3 benchmarks/gpu_goals.py "$OUT" | tee "$OUT/goals.md"
