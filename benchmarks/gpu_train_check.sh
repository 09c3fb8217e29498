#!/usr/bin/env bash
# One device run for the trainer issue: the six-variant training-step benchmark on SD-1.5-shaped
# random weights, an SDPA backend probe for fp32, then a REAL 1000-step pm-train run (bf16, CUDA
# graphs) timed end to end. Usage: bash benchmarks/gpu_train_check.sh OUTDIR COMMIT
set -u
OUT=${1:?outdir}; COMMIT=${2:?commit}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
timeout 260 python3 benchmarks/bench_train.py --model sd15 --device cuda --model-dir /tmp/sd15 \
    --commit "$COMMIT" --out "$OUT/train-gpu.jsonl" 2>&1 | grep -v -i warn | tee "$OUT/bench.log" | tail -16
python3 - <<'PY' 2>&1 | tee "$OUT/sdpa.log"
import torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
q, k, v = (torch.randn(1, 8, 4096, 40, device="cuda", requires_grad=True) for _ in range(3))
for name, be in [("default", None), ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)]:
    torch.cuda.reset_peak_memory_stats()
    try:
        if be is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel([be]):
                o = F.scaled_dot_product_attention(q, k, v)
        o.sum().backward()
        torch.cuda.synchronize()
        print(f"sdpa fp32 {name}: ok, peak {torch.cuda.max_memory_allocated()/2**20:.0f} MiB")
    except Exception as e:
        print(f"sdpa fp32 {name}: {type(e).__name__}: {str(e)[:200]}")
PY
python3 -c "from pm_runtime.train.tiny_model import write_demo_photos; write_demo_photos('/tmp/ph', n=4, size=512)"
start=$(date +%s.%N)
timeout 170 python3 -c "
import sys; from pm_runtime.train.cli import train_main
sys.argv = ['pm-train', '--model', '/tmp/sd15', '--images', '/tmp/ph', '--out', '/tmp/c1000.pt', '--steps', '1000',
            '--device', 'cuda', '--precision', 'bf16', '--cuda-graph', '--quiet']
train_main()" 2>&1 | grep -v -i warn | tee "$OUT/train1000.log"
echo "pm-train 1000 steps bf16 --cuda-graph: exit ${PIPESTATUS[0]}, wall $(python3 -c "import time;print(round(time.time()-$start,1))") s (model load + setup + capture + 1000 steps)" | tee -a "$OUT/train1000.log"
