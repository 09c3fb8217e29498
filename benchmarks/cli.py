"""`pm-bench`: one command for the project's benchmark records (benchmarks/README.md).

    pm-bench [OPTIONS]            pm-run's CPU benchmark: onnxruntime vs diffusers (bench_run.py)
    pm-bench --gpu [OPTIONS]      one GPU, one process: diffusers eager / CUDA graph / torch.compile
                                  (--compile) against the torch-cuda backend (bench_gpu.py)
    pm-bench --kernels [OPTIONS]  pm_kernels vs PyTorch at SD 1.5's shapes (bench_kernels.py)
    pm-bench --train [OPTIONS]    the training step vs the published way (bench_train.py)

OPTIONS go to the chosen benchmark: `pm-bench --gpu --help` lists them. Every run appends JSON
records (commit, device, versions, p20/p50/p80, peak memory, the peer measured in the same run)
to its --out file. Nothing here asserts a time: benchmarks are records, not tests.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
MODES = {"--gpu": "bench_gpu", "--kernels": "bench_kernels", "--train": "bench_train"}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    chosen = [a for a in args if a in MODES]
    if len(chosen) > 1:
        print(f"pm-bench: choose one of {', '.join(MODES)} (got {' '.join(chosen)})", file=sys.stderr)
        return 2
    module = MODES[chosen[0]] if chosen else "bench_run"
    rest = [a for a in args if a not in MODES]
    if str(HERE) not in sys.path:  # the scripts import each other by file name
        sys.path[:0] = [str(HERE.parent), str(HERE)]
    sys.argv = [f"pm-bench {chosen[0] if chosen else ''}".strip(), *rest]
    try:
        return int(importlib.import_module(module).main(rest) or 0)
    except ModuleNotFoundError as e:
        print(f"pm-bench: {e.name} is not installed (pip install 'personamagic-runtime[dev]'; GPU: the CUDA build "
              "of torch and the 'kernels' extra)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
