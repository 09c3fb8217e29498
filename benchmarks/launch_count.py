"""Kernel launches of one FastUNet call at SD-1.5 shapes, counted on the meta device (no GPU): the
PyTorch ops that launch a kernel (views and allocations excluded), pm_kernels' fused calls, and
GroupNorm's launches under each of its implementations (pm_kernels.group_norm.launches). A CUDA
graph replays these kernels; the per-kernel cost of a replay is what this count multiplies. Not a
benchmark of time: nothing here is timed, and a cuBLAS / cuDNN call can launch more than one kernel
(counted as one here).

  python benchmarks/launch_count.py --out benchmarks/results/launch-count-meta.jsonl
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
if __package__:
    from .live_memory import gpu_footprints, sd15_networks
    from .records import environment, save_records
else:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from live_memory import gpu_footprints, sd15_networks
    from records import environment, save_records

SCHEMA = "pm-launch-count/1"
# ops that return a view or only allocate: no kernel
NO_KERNEL = {"view", "reshape", "_reshape_alias", "_unsafe_view", "permute", "transpose", "t", "slice", "select",
             "expand", "as_strided", "unsqueeze", "squeeze", "detach", "alias", "split", "chunk", "unbind", "empty",
             "empty_like", "empty_strided"}


def count(sizes=(512, 1024)) -> list[dict]:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import pm_kernels
    from pm_kernels import group_norm as gn
    from pm_runtime.modeling.fast_unet import FastUNet

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in NO_KERNEL:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    unet, _, _ = sd15_networks(torch.float16)
    fast = FastUNet(unet)
    fast.allocate_context_tables(32, 77)
    recs = []
    for size in sizes:
        lat = size // 8
        x = torch.empty(2, 4, lat, lat, device="meta", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        t = torch.full((2,), 500.0, device="meta")
        idx = torch.zeros(2, dtype=torch.long, device="meta")
        fused, norms = collections.Counter(), []
        with torch.inference_mode(), gpu_footprints():
            stand_ins = {name: getattr(pm_kernels, name) for name in ("group_norm_silu", "geglu", "attention")}

            def wrap(name, fn):
                def call(*a, **k):
                    fused[name] += 1
                    if name == "group_norm_silu":
                        norms.append((tuple(a[0].shape), a[3]))
                    return fn(*a, **k)
                return call

            for name, fn in stand_ins.items():
                setattr(pm_kernels, name, wrap(name, fn))
            try:
                mode = Ops()
                with mode:
                    fast(x, t, kv_index=idx)
            finally:
                for name, fn in stand_ins.items():
                    setattr(pm_kernels, name, fn)
        aten = sum(mode.ops.values())
        other_fused = fused["geglu"] + fused["attention"]
        by_impl = {impl: sum(gn.launches(shape, groups, impl) for shape, groups in norms) for impl in gn.IMPLS}
        rec = {"network": "unet-call", "variant": "FastUNet, K/V tables, batch 2", "size": size, "dtype": "float16",
               "aten_kernels": aten, "aten_by_op": dict(mode.ops.most_common()), "fused_calls": dict(fused),
               "group_norm_launches": by_impl, "fuse_max": gn.FUSE_MAX,
               "kernels_total": {impl: aten + other_fused + n for impl, n in by_impl.items()}}
        print(f"{size} px: {aten} PyTorch kernels + {other_fused} fused attention/GEGLU + GroupNorm "
              + ", ".join(f"{impl} {n}" for impl, n in by_impl.items())
              + " -> " + ", ".join(f"{impl} {n}" for impl, n in rec["kernels_total"].items()), flush=True)
        recs.append(rec)
    return recs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", type=pathlib.Path, default=None, help="append the records to this JSON-lines file")
    a = ap.parse_args(argv)
    recs = count(tuple(int(s) for s in a.sizes.split(",")))
    env = environment("meta", a.commit)
    command = "python benchmarks/launch_count.py " + " ".join(sys.argv[1:] if argv is None else argv)
    save_records(a.out, [{"schema": SCHEMA, **env, "command": command, **r} for r in recs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
