"""Kernel launches of one FastUNet call at SD-1.5 shapes, counted on the meta device (no GPU): the
PyTorch ops that launch a kernel (views and allocations excluded), pm_kernels' fused calls, and
GroupNorm's launches under each of its implementations (pm_kernels.group_norm.launches). A CUDA
graph replays these kernels; the per-kernel cost of a replay is what this count multiplies. Not a
benchmark of time: nothing here is timed, and a cuBLAS / cuDNN call can launch more than one kernel
(counted as one here). A convolution with a bias counts one more: on CUDA, PyTorch runs cuDNN's
convolution and then adds the bias in a pass of its own (aten/src/ATen/native/Convolution.cpp,
ConvBackend::Cudnn: output.add_(reshape_bias(...))), which the meta device does not show.
Counted for FastUNet as the torch-cuda backend runs it (fused epilogues, time tables: one row read
per call) and without both (what it ran before them), and for a whole step of the step graph
(StepGraph._step: the UNet call plus the arithmetic around it, guidance batched and sequential);
and for one call of the equilibrium text encoder on the standalone CLIP text model (what torch-cuda's
te_graph replays as one CUDA graph).

  python benchmarks/launch_count.py --out benchmarks/results/launch-count-meta.jsonl
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
if __package__:
    from .live_memory import fast_unet_call, gpu_footprints, sd15_fast_unet, sd15_networks, sd15_step_graph
    from .records import environment, save_records
else:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from live_memory import fast_unet_call, gpu_footprints, sd15_fast_unet, sd15_networks, sd15_step_graph
    from records import environment, save_records

SCHEMA = "pm-launch-count/1"
# ops that return a view or only allocate: no kernel
NO_KERNEL = {"view", "reshape", "_reshape_alias", "_unsafe_view", "permute", "transpose", "t", "slice", "select",
             "expand", "as_strided", "unsqueeze", "squeeze", "detach", "alias", "split", "chunk", "unbind", "empty",
             "empty_like", "empty_strided"}


def _ops_mode():
    """A dispatch mode that counts the PyTorch ops that launch kernels (its .ops Counter)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in NO_KERNEL:
                self.ops[name] += 1
            if name in ("conv2d", "convolution") and (args[2] if len(args) > 2 else kwargs.get("bias")) is not None:
                self.ops["cudnn_bias_add"] += 1  # cuDNN's convolution, then PyTorch's own bias pass
            return func(*args, **(kwargs or {}))

    return Ops()


def count(sizes=(512, 1024)) -> list[dict]:
    import torch

    import pm_kernels
    from pm_kernels import group_norm as gn

    unet, _, _ = sd15_networks(torch.float16)
    fast = sd15_fast_unet(unet)
    recs = []
    for size, epilogues, step in ((s, f, st) for s in sizes for f, st in ((True, None), (False, None), (True, "batched"),
                                                                        (True, "sequential"))):
        fast.fused_epilogues = epilogues
        call = fast_unet_call(fast, size, 2, torch.float16)
        fused, norms = collections.Counter(), []
        with torch.inference_mode(), gpu_footprints():
            stand_ins = {name: getattr(pm_kernels, name) for name in ("group_norm_silu", "geglu", "geglu_linear",
                                                                       "attention",
                                                                       "add_bias_residual", "add_layer_norm",
                                                                       "scaled_copies", "guided_update")}

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
                loop = None
                if step:  # a whole step: n = 1 image, the UNet on [uncond; cond] or on each half
                    loop = sd15_step_graph(fast, size, torch.float16, sequential=step == "sequential", kv_step=True)
                mode = _ops_mode()
                with mode:
                    if loop is not None:
                        loop._step()
                    else:
                        call()
            finally:
                for name, fn in stand_ins.items():
                    setattr(pm_kernels, name, fn)
        aten = sum(mode.ops.values())
        other_fused = sum(n for name, n in fused.items() if name != "group_norm_silu")
        by_impl = {impl: sum(gn.launches(shape, groups, impl) for shape, groups in norms)
                   for impl in gn.IMPLS if impl != "tuned"}  # (tuned: tiled's or grouped's per shape, on a GPU)
        variant = ("FastUNet, K/V tables, time tables, fused epilogues, batch 2" if epilogues
                   else "FastUNet, K/V tables, batch 2 (no time tables, epilogues unfused)")
        if step:
            variant = f"one step graph step, guidance {step} (FastUNet as above; two-row K/V, the step's own by 2 GEMMs: kv_step)"
        rec = {"network": "step" if step else "unet-call", "variant": variant, "size": size, "dtype": "float16",
               "aten_kernels": aten, "aten_by_op": dict(mode.ops.most_common()), "fused_calls": dict(fused),
               "group_norm_launches": by_impl, "fuse_max": gn.FUSE_MAX,
               "kernels_total": {impl: aten + other_fused + n for impl, n in by_impl.items()}}
        label = f"step ({step})" if step else ("UNet call" if epilogues else "UNet call (unfused)")
        print(f"{size} px {label}: {aten} PyTorch kernels + {other_fused} other fused + GroupNorm "
              + ", ".join(f"{impl} {n}" for impl, n in by_impl.items())
              + " -> " + ", ".join(f"{impl} {n}" for impl, n in rec["kernels_total"].items()), flush=True)
        recs.append(rec)
    return recs


def count_text_encoder(rows: int = 23) -> dict:
    """Kernels of one EquilibriumTextEncoder call (SD 1.5's CLIP ViT-L/14 text model: 12 layers, width
    768) on the standalone modules, `rows` contexts of 77 tokens (the count does not depend on rows)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from pm_runtime.modeling import standalone
    from pm_runtime.modeling.text_encoder import EquilibriumTextEncoder

    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, vocab_size=49408)
    with torch.device("meta"):
        hf = CLIPTextModel(cfg).half()  # only for a state dict of the right shapes
    te = EquilibriumTextEncoder(standalone.CLIPText(hf.state_dict(), cfg.to_dict()))
    ids = torch.zeros(rows, 77, dtype=torch.long, device="meta")
    embeds = torch.zeros(rows, 77, 768, dtype=torch.float16, device="meta")
    mask = torch.zeros(rows, 77, dtype=torch.bool, device="meta")
    mode = _ops_mode()
    with torch.inference_mode(), mode:
        te(ids, embeds, embeds, mask)
    return {"network": "text-encoder-call", "variant": f"standalone CLIP text model, {rows} rows of 77 tokens",
            "dtype": "float16", "aten_kernels": sum(mode.ops.values()), "aten_by_op": dict(mode.ops.most_common())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", type=pathlib.Path, default=None, help="append the records to this JSON-lines file")
    a = ap.parse_args(argv)
    recs = count(tuple(int(s) for s in a.sizes.split(","))) + [count_text_encoder()]
    print(f"text encoder call: {recs[-1]['aten_kernels']} PyTorch kernels", flush=True)
    env = environment("meta", a.commit)
    command = "python benchmarks/launch_count.py " + " ".join(sys.argv[1:] if argv is None else argv)
    save_records(a.out, [{"schema": SCHEMA, **env, "command": command, **r} for r in recs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
