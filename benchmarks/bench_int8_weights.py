"""torch-cuda's int8_weights option against the same backend with the UNet in the run dtype, same
bundle, same process, same seed: the UNet's resident weight bytes, the drift of one UNet call and
of the whole image, and the time per step. Not a test: nothing here asserts.

Drift is measured on the bundle's own weights: SD-1.5-SHAPED RANDOM weights in the project's
benchmark bundles (real weights have outlier channels that per-channel int8 may treat worse:
re-measure on them). On a CPU the run dtype is fp32 (eager, the kernels' references); on a GPU
fp16 with the kernels (then the drift is against fp16, as the GPU issue asks).

  python benchmarks/bench_int8_weights.py --bundle /tmp/pm-bench-run/bundle-sd15-torch --device cpu \\
      --size 256 --steps 10 --out benchmarks/results/int8-weights-cpu.jsonl
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
if __package__:
    from .records import environment, psnr_db, save_records
else:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from records import environment, psnr_db, save_records

SCHEMA = "pm-bench-int8-weights/1"
PROMPT = "a photo of <persona> as a knight"


def measure(bundle, device: str, int8: bool, size: int, steps: int, probe) -> tuple[dict, object, object]:
    import numpy as np
    import torch

    from pm_runtime.modeling.int8_weights import tensor_bytes
    from pm_runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.load(bundle, backend="torch-cuda", device=device, int8_weights=int8)
    load_s = time.perf_counter() - t0
    backend = pipe.backend
    unet = backend.modules["unet"]
    fast = backend._fast_unet(unet) if not hasattr(unet, "kv_tables") else unet
    weights = tensor_bytes(fast.unet)
    x, t, ck, cv = probe
    with torch.inference_mode():
        dev = torch.device(device)
        out = fast(x.to(dev), t.to(dev), ck.to(dev), cv.to(dev)).float().cpu()
    g = pipe.generate(PROMPT, seed=233, steps=steps, height=size, width=size)
    g2 = pipe.generate(PROMPT, seed=233, steps=steps, height=size, width=size)
    rec = {"variant": "int8-weights" if int8 else "run-dtype-weights", "backend": g.backend,
           "unet_weight_bytes": weights, "load_s": round(load_s, 2),
           "unet_step_ms_image2": round(g2.timings["unet_step_ms"], 1),
           "image_s_image2": round(g2.timings["total_s"], 2),
           "repeatable": bool(np.array_equal(g.images, g2.images)),
           **({"int8_layers": backend.int8_stats["layers"]} if int8 else {})}
    pipe.close()
    return rec, out, g.images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", required=True, type=pathlib.Path, help="a bundle with torch weights")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--out", type=pathlib.Path, default=None, help="append the records to this JSON-lines file")
    a = ap.parse_args(argv)
    import torch

    from pm_runtime.bundle import open_bundle

    d = open_bundle(a.bundle).component("unet", "torch").get("details", {}).get("config", {})
    g = torch.Generator().manual_seed(0)
    lat = a.size // 8
    probe = (torch.randn(2, d.get("in_channels", 4), lat, lat, generator=g), torch.tensor([500.0, 500.0]),
             *torch.randn(2, 2, 77, d.get("cross_attention_dim", 768), generator=g))
    plain, ref_out, ref_img = measure(a.bundle, a.device, False, a.size, a.steps, probe)
    print(plain, flush=True)
    q, out, img = measure(a.bundle, a.device, True, a.size, a.steps, probe)
    q["unet_rel_err_max"] = float((out - ref_out).abs().max() / ref_out.abs().max())
    q["unet_rel_err_rms"] = float((out - ref_out).pow(2).mean().sqrt() / ref_out.pow(2).mean().sqrt())
    q["image_psnr_vs_run_dtype_db"] = psnr_db(img, ref_img)  # None: identical
    q["image_max_abs_diff"] = int(abs(img.astype(int) - ref_img.astype(int)).max())
    q["weight_bytes_ratio"] = round(q["unet_weight_bytes"] / plain["unet_weight_bytes"], 3)
    print(q, flush=True)
    env = environment(a.device, a.commit)
    command = "python benchmarks/bench_int8_weights.py " + " ".join(sys.argv[1:] if argv is None else argv)
    records = [{"schema": SCHEMA, **env, "bundle": a.bundle.name, "size": a.size, "steps": a.steps,
                "weights": "SD-1.5-shaped random" if "sd15" in a.bundle.name else "the bundle's", "command": command,
                **r} for r in (plain, q)]
    save_records(a.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
