"""Tiled VAE decoding (pm_runtime/vae_tiles.py) against the one-piece decode, onnxruntime CPU: time,
the decoder's peak memory and the difference between the two images. One JSON line per (size,
mode), schema pm-bench-vae-tiles/1, appended to --out. Not a test: nothing here asserts.

Each (size, mode) runs in a fresh interpreter: the bundle's vae_decoder.onnx in a session with the
onnxruntime backend's own options, a warm-up decode at 256 px, then one decode of standard-normal
latents (seed 0) at the size, one-piece or through decode_tiled. `decode_peak_rss_bytes` is the
child's VmHWM after the decode minus its RSS before it (what the decode added on top of the
loaded session); `peak_rss_bytes` is the VmHWM itself. The parent compares the tiled image with the
one-piece one (uint8 after the pipeline's conversion): psnr_vs_full_db, max_abs_diff_vs_full.

  python benchmarks/bench_vae_tiles.py --bundle /tmp/pm-bench-run/bundle-sd15-fp32 \\
      --sizes 768 1024 --out benchmarks/results/vae-tiles-cpu.jsonl          # a few minutes
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
if __package__:
    from .records import append_jsonl, environment, proc_status_kib, psnr_db
else:
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    from records import append_jsonl, environment, proc_status_kib, psnr_db

SCHEMA = "pm-bench-vae-tiles/1"
TAG = "@@VAE_TILES@@ "


def child(bundle: str, size: int, mode: str, work: str) -> dict:
    import numpy as np

    from pm_runtime import vae_tiles
    from pm_runtime.backends.onnxruntime import OnnxRuntimeBackend
    from pm_runtime.bundle import open_bundle
    from pm_runtime.specs import VAE_DECODER

    b = open_bundle(pathlib.Path(bundle), verify=False)
    backend = OnnxRuntimeBackend(b)
    f = b.dims.vae_scale_factor
    with backend.network(VAE_DECODER) as vae:
        run = lambda lat: vae.run({"latent": lat})["image"]  # noqa: E731
        run(np.zeros((1, b.dims.latent_channels, 32, 32), np.float32))  # warm-up
        lat = np.random.default_rng(0).standard_normal((1, b.dims.latent_channels, size // f, size // f))
        lat = lat.astype(np.float32)
        before = proc_status_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        image, calls = vae_tiles.decode_tiled(run, lat, f) if mode == "tiled" else (run(lat), 1)
        seconds = time.perf_counter() - t0
        hwm = proc_status_kib("VmHWM") * 1024
    img = np.round(np.clip(image / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    np.save(pathlib.Path(work) / f"vae-{size}-{mode}.npy", img)
    return {"decode_s": round(seconds, 3), "decoder_calls": calls, "peak_rss_bytes": hwm,
            "decode_peak_rss_bytes": hwm - before, "tile": vae_tiles.TILE * f, "overlap_px": vae_tiles.OVERLAP * f}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[768, 1024])
    ap.add_argument("--work", default="/tmp/pm-vae-tiles")
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=None)
    a = ap.parse_args(argv)
    import numpy as np

    pathlib.Path(a.work).mkdir(parents=True, exist_ok=True)
    base = {"schema": SCHEMA, **environment("cpu", a.commit), "command": " ".join(["python", *sys.argv]),
            "bundle": a.bundle}
    records = []
    for size in a.sizes:
        got = {}
        for mode in ("full", "tiled"):
            r = subprocess.run([sys.executable, __file__, "_child", a.bundle, str(size), mode, a.work],
                               capture_output=True, text=True)
            line = next((x for x in r.stdout.splitlines() if x.startswith(TAG)), None)
            rec = {**base, "size": size, "mode": mode}
            if line is None:
                rec.update(status="error", error=(r.stderr or r.stdout).strip().splitlines()[-3:])
            else:
                rec.update(status="ok", **json.loads(line[len(TAG):]))
                got[mode] = np.load(pathlib.Path(a.work) / f"vae-{size}-{mode}.npy").astype(np.float64)
            records.append(rec)
        if len(got) == 2:
            records[-1]["psnr_vs_full_db"] = psnr_db(got["tiled"], got["full"])
            records[-1]["max_abs_diff_vs_full"] = int(np.abs(got["tiled"] - got["full"]).max())
    for rec in records:
        print(json.dumps({k: rec.get(k) for k in ("size", "mode", "status", "decode_s", "decoder_calls",
                                                  "decode_peak_rss_bytes", "peak_rss_bytes", "psnr_vs_full_db",
                                                  "max_abs_diff_vs_full", "error")}))
    append_jsonl(pathlib.Path(a.out), records)
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        print(TAG + json.dumps(child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])), flush=True)
    else:
        sys.exit(main())
