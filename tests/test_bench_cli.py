"""pm-bench: the command line, the GPU benchmark's plumbing on the CPU (tiny model; CUDA graph and
torch.compile skipped), its records, table and error handling. The GPU figures need a GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pm_bench import bench_gpu, cli
from pm_bench.records import append_jsonl, psnr_db, slug

ROOT = Path(__file__).resolve().parent.parent


def pm_bench(*args):
    return subprocess.run([sys.executable, "-m", "pm_bench.cli", *args], capture_output=True, text=True)


def test_help_names_every_benchmark():
    r = pm_bench("--help")
    assert r.returncode == 0
    for needle in ("--gpu", "--kernels", "--train", "--compile", "--device", "pm-bench-gpu/1", "pm-bench-run/1"):
        assert needle in r.stdout


def test_each_mode_has_its_own_help():
    for mode, needle in (("--gpu", "--compile"), ("--kernels", "--reps"), ("--train", "--grad-accum")):
        r = pm_bench(mode, "--help")
        assert r.returncode == 0 and needle in r.stdout, (mode, r.stderr)


def test_scripts_still_run_as_scripts():
    for script, needle in (("bench_run.py", "--cache"), ("bench_gpu.py", "--compile"), ("random_models.py", "--tiny")):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                           text=True)
        assert r.returncode == 0 and needle in r.stdout, (script, r.stderr)


def test_two_modes_are_refused():
    r = pm_bench("--gpu", "--kernels")
    assert r.returncode == 2 and "choose one" in r.stderr


def test_options_of_the_other_mode_are_refused_in_one_line():
    runner = CliRunner()
    for args, needle in ((["--compile"], "--compile: needs --gpu"), (["--gpu", "--seed", "1"], "--seed: not an option"),
                         (["--resolution", "100"], "multiple of 8")):
        r = runner.invoke(cli.bench, args)
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, (args, r.output)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_modes_refuse_cleanly_without_cuda():
    for mode in ("--gpu", "--kernels"):
        r = pm_bench(mode)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(err) == 1, err


def _fake_ours(ctx):
    """An entry that returns several records and times something with the context's timer."""
    import torch

    x = torch.ones(4, 4, device=ctx.device)
    return [{"variant": "fake-fast", "unet_step_ms": ctx.timed(lambda: x @ x, reps=2), "image_ms": {"p50": 250.0}},
            {"variant": "fake-broken-inside", "status": "error", "error": "ValueError: bad"}]


def _boom(ctx):
    raise RuntimeError("boom\nsecond line")


def _absent(ctx):
    raise bench_gpu.NotAvailable("pm_runtime.backends.fake: ImportError: no fake")


def test_gpu_path_on_the_cpu_writes_records(tiny_model, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    work, out = tmp_path / "work", tmp_path / "gpu.jsonl"
    work.mkdir()
    (work / "model-tiny").symlink_to(tiny_model)  # reused as the tiny model (no rebuild)
    monkeypatch.setattr(bench_gpu, "OURS", {"boom": _boom, "absent": _absent, "fake": _fake_ours})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded 2-core machine makes multi-threaded CPU ops very slow
    try:
        args = ["--gpu", "--device", "cpu", "--model", "tiny", "--steps", "2", "--reps", "2", "--runs", "1",
                "--warmup", "1", "--compile", "--work", str(work), "--out", str(out)]
        r = CliRunner().invoke(cli.bench, args, obj=args)
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 1, r.output  # errors were recorded: exit status 1 after the whole run
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    by = {rec["variant"]: rec for rec in recs}
    # torch.compile after the other peers, before ours (a run cut by its time limit loses ours' tail)
    assert list(by) == ["diffusers-eager", "diffusers-cuda-graph", "diffusers-text-encoder-b2", "diffusers-vae-decode",
                        "diffusers-pipeline-eager", "torch-compile-reduce-overhead", "boom", "absent", "fake-fast",
                        "fake-broken-inside"]
    for rec in recs:
        assert rec["schema"] == "pm-bench-gpu/1" and rec["device_name"].startswith("cpu")
        for key in ("commit", "date", "torch", "diffusers", "transformers", "run_id", "options", "resolution", "steps",
                    "precision", "wall_s", "command"):
            assert key in rec, key
        assert "host" not in rec  # records are shared: no host name
    assert len({rec["run_id"] for rec in recs}) == 1 and recs[0]["options"]["reps"] == 2
    assert recs[0]["command"].startswith("pm-bench --gpu --device cpu")
    for name in ("diffusers-eager", "fake-fast"):
        assert by[name]["status"] == "ok" and set(by[name]["unet_step_ms"]) == {"p20", "p50", "p80"}
    for name, key in (("diffusers-text-encoder-b2", "call_ms"), ("diffusers-vae-decode", "call_ms"),
                      ("diffusers-pipeline-eager", "image_ms")):
        assert by[name]["status"] == "ok" and by[name][key]["p50"] > 0, by[name]
    assert by["diffusers-eager"]["load_s"] is not None
    assert by["diffusers-cuda-graph"]["status"] == "skipped" and "CUDA" in by["diffusers-cuda-graph"]["reason"]
    assert by["torch-compile-reduce-overhead"]["status"] == "skipped"
    assert by["boom"]["status"] == "error" and by["boom"]["error"] == "RuntimeError: boom"
    assert by["absent"]["status"] == "not available" and "no fake" in by["absent"]["reason"]
    assert by["fake-broken-inside"]["status"] == "error"
    assert "diffusers-eager" in r.output and "not available: pm_runtime.backends.fake" in r.output
    assert "total" in r.output


def test_unknown_ours_is_refused(tmp_path):
    r = CliRunner().invoke(cli.bench, ["--gpu", "--device", "cpu", "--model", "tiny", "--ours", "nope",
                                       "--work", str(tmp_path)])
    assert r.exit_code == 2 and "--ours nope: unknown" in r.output


def test_gpu_table_ratios():
    recs = [{"variant": "diffusers-eager", "status": "ok", "unet_step_ms": {"p50": 24.0}},
            {"variant": "diffusers-cuda-graph", "status": "ok", "unet_step_ms": {"p50": 12.0}},
            {"variant": "torch-compile-reduce-overhead", "status": "ok", "unet_step_ms": {"p50": 8.0}},
            {"variant": "torch-cuda", "status": "ok", "unet_step_ms": {"p50": 6.0}, "image_ms": {"p50": 350.0},
             "peak_alloc_gib": 2.25, "peak_reserved_gib": 2.4},
            {"variant": "diffusers-vae-decode", "status": "ok", "call_ms": {"p50": 21.5}},
            {"variant": "broken", "status": "error", "error": "RuntimeError: boom"},
            {"variant": "torch-cuda-x", "status": "not available", "reason": "ImportError: triton"}]
    lines = bench_gpu.table(recs).splitlines()
    ours = next(line for line in lines if line.startswith("torch-cuda "))
    assert ours.split()[1:7] == ["6.00", "4.00", "2.00", "1.33", "0.350", "2.25/2.40"]
    eager = next(line for line in lines if line.startswith("diffusers-eager"))
    assert eager.split()[1:5] == ["24.00", "1.00", "0.50", "0.33"]
    assert any(line.startswith("diffusers-vae-decode") and "call p50 21.50 ms" in line for line in lines)
    assert any("broken" in line and "error: RuntimeError: boom" in line for line in lines)
    assert any("not available: ImportError: triton" in line for line in lines)


def test_records_helpers(tmp_path):
    assert slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3" and slug("cpu: AMD EPYC x2") == "cpu-amd-epyc-x2"
    append_jsonl(tmp_path / "a" / "r.jsonl", [{"x": 1}, {"y": Path("/p")}])
    append_jsonl(tmp_path / "a" / "r.jsonl", [{"z": 3}])
    assert [json.loads(line) for line in (tmp_path / "a" / "r.jsonl").read_text().splitlines()] == [
        {"x": 1}, {"y": "/p"}, {"z": 3}]
    # non-finite floats become strings: bare NaN / Infinity is not JSON (strict readers refuse the line)
    append_jsonl(tmp_path / "n.jsonl", [{"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}}])
    line = (tmp_path / "n.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line}")) == {
        "a": "NaN", "b": ["Infinity", 1.5], "c": {"d": "-Infinity"}}
    # psnr_db: None only for identical images; NaN (not None) when an input holds NaN
    assert psnr_db([1.0, 2.0], [1.0, 2.0]) is None
    assert psnr_db([0, 0], [0, 1]) == round(10 * math.log10(255**2 / 0.5), 2)
    assert math.isnan(psnr_db([float("nan"), 0.0], [0.0, 0.0]))


def test_stage_memory_recorder_wraps_and_unwraps(run_bundle):
    """gpu_ours.stage_memory's bookkeeping (the GPU numbers themselves come from torch.cuda on a GPU):
    here torch.cuda is a stand-in whose allocated-bytes counter the stages move, so the recorder's
    before/peak/after fields and its clean-up are checked on a CPU pipeline."""
    pytest.importorskip("torch")
    import types

    mem = {"now": 0, "peak": 0}
    cuda = types.SimpleNamespace(synchronize=lambda *a: None, memory_allocated=lambda *a: mem["now"],
                                 memory_reserved=lambda *a: mem["now"] + 2**30,
                                 max_memory_allocated=lambda *a: mem["peak"],
                                 max_memory_reserved=lambda *a: mem["peak"] + 2**30,
                                 reset_peak_memory_stats=lambda *a: mem.update(peak=mem["now"]))
    fake_torch = types.SimpleNamespace(cuda=cuda)
    import pm_kernels

    pm_kernels.set_enabled(False)  # the kernels' references (the interpreter is slow)
    try:
        _check_stage_memory(run_bundle, fake_torch, mem)
    finally:
        pm_kernels.set_enabled(True)


def _check_stage_memory(run_bundle, fake_torch, mem):
    import gpu_ours
    from pm_runtime.pipeline import Pipeline

    def bump(n):
        mem["now"] += n
        mem["peak"] = max(mem["peak"], mem["now"])

    pipe = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", low_memory=True)
    backend = pipe.backend
    load = backend._load

    def load_and_grow(name):  # a stage that allocates 1 GiB while loading and gives it back when freed
        bump(2**30)
        return load(name)

    free = backend._free
    backend._load = load_and_grow
    backend._free = lambda net: (free(net), bump(-(2**30)))
    stages = gpu_ours.stage_memory(backend, fake_torch)
    pipe.generate("a photo of <persona> as a knight", seed=1, steps=2, height=256, width=256)
    assert {"text_encoder", "unet", "vae_decoder"} <= set(stages)
    for name, d in stages.items():
        assert d["before_alloc_gib"] == 0.0 and d["load_peak_alloc_gib"] == 1.0 and d["after_alloc_gib"] == 0.0, d
        assert d["run_peak_alloc_gib"] == 1.0 and d["load_peak_reserved_gib"] == 2.0
    del backend.network
    assert backend.network.__func__ is type(backend).network


def test_pool_map_groups_segments_by_pool():
    """gpu_ours.pool_map on a stand-in allocator snapshot (the layout torch.cuda.memory_snapshot
    returns): segments summed per pool, the general pool and named / unnamed private pools, the
    largest free (inactive) block; nothing where torch.cuda has no snapshot."""
    import types

    import gpu_ours

    mib = 2**20

    def seg(pool, total, allocated, free_blocks=()):
        blocks = [{"size": allocated, "state": "active_allocated"}] + [{"size": f, "state": "inactive"}
                                                                       for f in free_blocks]
        return {"segment_pool_id": pool, "total_size": total, "allocated_size": allocated, "blocks": blocks}

    snap = [seg((0, 0), 20 * mib, 12 * mib, [8 * mib]), seg((0, 0), 2 * mib, 2 * mib),
            seg((0, 7), 256 * mib, 0, [128 * mib, 128 * mib]), seg((3, 0), 4 * mib, 1 * mib, [3 * mib])]
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(memory_snapshot=lambda: snap))
    got = gpu_ours.pool_map(fake, {(0, 7): "step+vae_decoder"})
    assert got == {"general": {"reserved_mib": 22.0, "allocated_mib": 14.0, "segments": 2, "largest_free_mib": 8.0},
                   "step+vae_decoder": {"reserved_mib": 256.0, "allocated_mib": 0.0, "segments": 1,
                                        "largest_free_mib": 128.0},
                   "pool 3:0": {"reserved_mib": 4.0, "allocated_mib": 1.0, "segments": 1, "largest_free_mib": 3.0}}
    assert gpu_ours.pool_map(types.SimpleNamespace(cuda=types.SimpleNamespace())) == {}


def test_launch_count_at_sd15_shapes():
    """benchmarks/launch_count.py on the meta device: every GroupNorm the UNet calls is counted once
    among the fused calls and launches what group_norm.launches() says per implementation (three
    each when tiled); views are not counted as kernels. The fused epilogues and time tables take
    kernels out of a UNet call (no time embedding inside it, fewer cuDNN bias passes), and a whole
    step graph step adds only a handful to its UNet call (per-step values read from device tables,
    the arithmetic around the UNet in two kernels, the step's own K/V in two GEMMs)."""
    pytest.importorskip("torch")
    import launch_count

    recs = launch_count.count(sizes=(512,))
    rec = recs[0]  # the UNet call as torch-cuda runs it
    unfused = next(r for r in recs if r["network"] == "unet-call" and "unfused" in r["variant"])
    batched, sequential = (next(r for r in recs if r["network"] == "step" and kind in r["variant"])
                           for kind in ("batched", "sequential"))
    norms = rec["fused_calls"]["group_norm_silu"]
    assert norms == 61 and rec["group_norm_launches"]["tiled"] == 3 * norms
    assert norms <= rec["group_norm_launches"]["grouped"] < rec["group_norm_launches"]["auto"] < 3 * norms
    assert not set(rec["aten_by_op"]) & launch_count.NO_KERNEL and rec["aten_by_op"]["conv2d"] > 0
    assert rec["kernels_total"]["tiled"] - rec["kernels_total"]["grouped"] == \
        rec["group_norm_launches"]["tiled"] - rec["group_norm_launches"]["grouped"]
    assert "fused epilogues" in rec["variant"] and rec["kernels_total"]["tiled"] < unfused["kernels_total"]["tiled"] - 100
    assert not {"sin", "cos", "exp"} & set(rec["aten_by_op"]) and {"sin", "cos"} <= set(unfused["aten_by_op"])
    assert rec["aten_by_op"]["cudnn_bias_add"] < unfused["aten_by_op"]["cudnn_bias_add"] == 66
    extra = batched["kernels_total"]["tiled"] - rec["kernels_total"]["tiled"]
    # (+5 of them: the step's own cross-attention K/V, kv_step: 3 row gathers and 2 GEMMs)
    assert 0 < extra <= 11 and batched["aten_by_op"]["mm"] == 2, batched["aten_by_op"]
    assert sequential["kernels_total"]["tiled"] <= 2 * rec["kernels_total"]["tiled"] + 11
    te = launch_count.count_text_encoder(rows=3)  # what te_graph replays: 12 layers of a few kernels each
    assert te["aten_by_op"]["scaled_dot_product_attention"] == 12 and te["aten_kernels"] > 12 * 10


def test_live_memory_counts_created_tensors_not_views():
    """benchmarks/live_memory.py's counter on the meta device: new tensors count from creation until
    freed, views and in-place results of existing tensors (weights) do not."""
    torch = pytest.importorskip("torch")
    import live_memory

    with torch.device("meta"):
        x = torch.empty(1024, 1024)  # 4 MiB that exists before: not counted
        with live_memory.live_bytes_mode() as m:
            y = x * 2  # +4
            x.t()  # a view of x: +0
            z = y + 1  # +4 -> 8 (the peak)
            del y  # -> 4
            z.view(-1).relu_()  # in place on z: +0
            w = z.sum()  # +4 bytes
            del z
    assert m.peak == 8 * 2**20 and m.now == 4 and w.shape == ()
    q = torch.empty(1, 2, 4096, 40, device="meta", dtype=torch.float16)
    peak, kept = live_memory.peak_of(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert peak == q.numel() * 2  # the output only: no (4096 x 4096) score matrix


def test_meta_convolutions_keep_the_cuda_layout(monkeypatch):
    """live_memory.cuda_conv_layout: on the meta device a convolution returns channels-last where its
    input or weight is, as cuDNN's does on CUDA (PyTorch's meta convolution returns NCHW), so a
    FastUNet call on meta hands every GroupNorm the layout the GPU's does (compile_check compiles
    the kernel variants the GPU runs; before this, all but the first took the NCHW ones)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    import live_memory

    import pm_kernels

    cl = torch.channels_last
    before = F.conv2d
    x = torch.empty(2, 32, 16, 16, device="meta", dtype=torch.float16)
    w = torch.empty(64, 32, 3, 3, device="meta", dtype=torch.float16)
    with live_memory.cuda_conv_layout():
        assert F.conv2d(x.contiguous(memory_format=cl), w, None, 1, 1).is_contiguous(memory_format=cl)
        assert F.conv2d(x, w.contiguous(memory_format=cl), None, 2, 1).is_contiguous(memory_format=cl)
        plain = F.conv2d(x, w, None, 1, 1)
        assert plain.is_contiguous() and not plain.is_contiguous(memory_format=cl)
        assert torch.nn.Conv2d(32, 64, 3, device="meta", dtype=torch.float16).to(memory_format=cl)(x).is_contiguous(
            memory_format=cl)
    assert F.conv2d is before  # restored

    unet, _, _ = live_memory.sd15_networks(torch.float16)
    unet.to(memory_format=cl)
    fast = live_memory.sd15_fast_unet(unet)
    seen = []
    real = pm_kernels.group_norm_silu
    monkeypatch.setattr(pm_kernels, "group_norm_silu",
                        lambda x, *a, **k: seen.append(x.is_contiguous(memory_format=cl)) or real(x, *a, **k))
    with torch.inference_mode(), live_memory.cuda_conv_layout():
        live_memory.fast_unet_call(fast, 256, 2, torch.float16)()
    assert len(seen) == 61 and all(seen)


# the variants the assertions below read, and those whose CPU code path no other variant takes: the default
# run; the other variants differ in GPU-only settings (cuDNN heuristics, streams, GroupNorm flavours, ...)
# and run with -m slow (before a GPU session: python -m pytest -m slow tests/test_bench_cli.py)
PLUMBING = {"torch-cuda", "torch-cuda-pre-fusion", "torch-cuda-unfused-epilogues", "torch-cuda-no-time-tables",
            "torch-cuda-no-step-kernels", "torch-cuda-no-te-graph", "torch-cuda-offload-te", "torch-cuda-lean-bands",
            "torch-cuda-generic-sizes", "torch-cuda-untuned", "torch-cuda-geglu-gemm", "torch-cuda-pdl",
            "torch-cuda-hf-modules", "torch-cuda-kv-tables", "torch-cuda-low-memory-1024",
            "torch-cuda-low-memory-1024-untiled", "torch-cuda-low-memory-batched", "torch-cuda-int8",
            "torch-cuda-low-memory-int8", "torch-cuda-low-memory-int8-1024", "torch-cuda-shared-pool-offload-te",
            "torch-cuda-phases", "torch-cuda-low-memory-phases", "torch-cuda-low-memory-1024-phases"}


@pytest.mark.parametrize("which", ["plumbing", pytest.param("all", marks=pytest.mark.slow)])
def test_every_gpu_variant_runs_on_the_cpu(cuda_bundle, monkeypatch, which):
    """gpu_check's variants (gpu_ours.run_ours) wired end to end on the tiny bundle, on the CPU: the
    memory helpers (torch.cuda) are stubbed out, so only the plumbing is checked here (options,
    image comparisons, per-stage records); the figures come from a GPU run. Default run: PLUMBING;
    -m slow: every variant."""
    pytest.importorskip("torch")
    import types

    import gpu_ours
    import pm_kernels

    bundle = cuda_bundle  # one concept, torch weights: what gpu_check's bundle is
    zero = types.SimpleNamespace(cuda=types.SimpleNamespace(
        synchronize=lambda *a: None, memory_allocated=lambda *a: 0, memory_reserved=lambda *a: 0,
        max_memory_allocated=lambda *a: 0, max_memory_reserved=lambda *a: 0, reset_peak_memory_stats=lambda *a: None))
    stage_memory = gpu_ours.stage_memory
    monkeypatch.setattr(gpu_ours, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_ours, "BIG_SIZE", 320)  # the large-image variants' plumbing, at a CPU's pace
    monkeypatch.setattr(gpu_ours, "_reset", lambda torch: None)
    monkeypatch.setattr(gpu_ours, "_peak", lambda torch: {})
    monkeypatch.setattr(gpu_ours, "_restart_peak", lambda torch: None)
    monkeypatch.setattr(gpu_ours, "_allocated_gib", lambda torch: None)
    monkeypatch.setattr(gpu_ours, "stage_memory", lambda backend, torch: stage_memory(backend, zero))
    skip = {"reference", "torch-cuda-warm-start", "profile", "profile-gn-auto"}  # CUDA-only (profiler, a CUDA child)
    variants = [v for v in gpu_ours.ALL if v not in skip and (which == "all" or v in PLUMBING)]
    assert which == "all" or len(variants) == len(PLUMBING)  # every name there is a variant
    pm_kernels.set_enabled(False)  # the kernels' references: the interpreter is slow
    streamed = []  # what bench_gpu writes as each variant finishes (a run cut short keeps these)
    try:
        recs = gpu_ours.run_ours(bundle, None, steps=2, reps=2, images=1, size=256, log=lambda m: None,
                                 variants=variants, on_record=streamed.append)
    finally:
        pm_kernels.set_enabled(True)
    assert streamed == recs and all(r["wall_s"] >= 0 for r in recs)
    by = {r["variant"]: r for r in recs}
    assert list(by) == variants and all(r["status"] == "ok" for r in recs), [r for r in recs if r["status"] != "ok"]
    assert "UNet weights int8" in by["torch-cuda-int8"]["backend"]
    assert by["torch-cuda-int8"]["psnr_vs_torch-cuda_db"] > 20 and "unet_step_ms" in by["torch-cuda"]
    assert by["torch-cuda-low-memory-int8-1024"]["size"] == 320
    for name in ("torch-cuda-pre-fusion", "torch-cuda-unfused-epilogues", "torch-cuda-no-time-tables",
                 "torch-cuda-no-step-kernels", "torch-cuda-no-te-graph", "torch-cuda-geglu-gemm", "torch-cuda-pdl",
                 "torch-cuda-untuned", "torch-cuda-kv-tables"):
        db = by[name]["psnr_vs_torch-cuda_db"]  # None: identical (records.psnr_db)
        assert db is None or db > 60, name  # the same image, the sums in another order (fp32)
    json.dumps(recs, allow_nan=False)  # strict JSON: an identical image's PSNR is null, never Infinity
    assert by["torch-cuda-low-memory-1024-untiled"]["timings_last_image"]["vae_calls"] == 1
    assert by["torch-cuda-low-memory-1024"]["timings_last_image"]["vae_calls"] == 1  # 320 px: no tiles either
    assert "psnr_vs_torch-cuda-low-memory-1024_db" in by["torch-cuda-low-memory-1024-untiled"]
    assert "psnr_vs_torch-cuda_db" in by["torch-cuda-low-memory-int8"]
    # the size-rule A/B ran with the switch set in the process: its record says so, the others' do not
    assert by["torch-cuda-generic-sizes"]["kernels_generic_sizes"] == "1"
    assert not by["torch-cuda"].get("kernels_generic_sizes")
    assert by["torch-cuda-pdl"]["kernels_pdl"] == "1" and not by["torch-cuda"].get("kernels_pdl")
    # kernel tuning: on by default (no session on the CPU: nothing measured), off in its A/B
    assert by["torch-cuda"]["kernel_tuning"] == "on" and by["torch-cuda"]["tuning_s"] == 0
    assert by["torch-cuda"]["tuning_cut"] == 0
    assert by["torch-cuda-untuned"]["kernel_tuning"] == "off"
    for name in ("torch-cuda-phases", "torch-cuda-low-memory-phases", "torch-cuda-low-memory-1024-phases"):
        assert {"text_encoder", "unet", "vae_decoder"} <= set(by[name]["second_image"])
    assert by["torch-cuda-low-memory-1024-phases"]["size"] == 320  # BIG_SIZE
    assert by["torch-cuda-low-memory-phases"]["second_image"]["unet"]["load_peak_alloc_gib"] == 0.0
    assert "unet" not in by["torch-cuda-phases"]["second_image"] or \
        "load_peak_alloc_gib" not in by["torch-cuda-phases"]["second_image"]["unet"]  # resident: loaded once


def test_step_replays_stay_inside_the_step_tables(cuda_bundle, monkeypatch):
    """gpu_ours.replay_ms after a whole 50-step image: the step counter stands at 50 and the graph's
    tables hold 64 rows, so 30 replays from there would index past them (an IndexError here, a
    device-side assert on a GPU that poisons the process). It restarts the counter and never
    replays past the tables, and leaves the counter at 0. (The image runs 2 steps, whose tables
    also hold 64 rows, and the counter is then set where a 50-step image leaves it: the same state,
    48 CPU UNet calls fewer.)"""
    torch = pytest.importorskip("torch")
    import gpu_ours
    import pm_kernels
    from pm_runtime.pipeline import Pipeline

    monkeypatch.setattr(gpu_ours, "DEVICE", "cpu")
    pm_kernels.set_enabled(False)  # the kernels' references: the interpreter is slow
    try:
        pipe = Pipeline.load(cuda_bundle, backend="torch-cuda", device="cpu", concept="alice")
        pipe.generate(gpu_ours.PROMPT, seed=1, steps=2, height=256, width=256)
        loop = next(iter(pipe.backend._loops.values()))
        assert loop.max_steps == 64 and int(loop.step) == 2
        loop.step.fill_(50)  # where a 50-step image leaves it (its tables: the same 64 rows)
        short = gpu_ours.replay_ms(torch, loop, 30)
        assert short["reps"] == 30 and int(loop.step) == 0
        long = gpu_ours.replay_ms(torch, loop, 200)  # more replays than rows: cut to the rows (less the CPU's warm-up)
        assert long["reps"] == 63 and int(loop.step) == 0 and long["p50"] > 0
    finally:
        pm_kernels.set_enabled(True)


def test_cpu_run_table():
    """pm-bench's CPU summary: ratios against diffusers as the records hold them, drift against ort-fp32's
    image (identical, or dB and the largest pixel difference), a failed variant with its error."""
    import bench_run

    recs = [{"variant": "diffusers-fp32", "status": "ok", "image_s_p50": 20.0, "peak_rss_bytes": 6 * 2**30,
             "speedup_vs_peer_p50": 1.0, "peak_mem_vs_peer": 1.0},
            {"variant": "ort-fp32", "status": "ok", "image_s_p50": 10.0, "peak_rss_bytes": 3 * 2**30,
             "speedup_vs_peer_p50": 2.0, "peak_mem_vs_peer": 0.5},
            {"variant": "ort-fp32-lowmem", "status": "ok", "image_s_p50": 11.0, "peak_rss_bytes": 2**30,
             "speedup_vs_peer_p50": 1.818, "peak_mem_vs_peer": 0.167, "psnr_vs_ort_fp32_db": None,
             "max_abs_diff_vs_ort_fp32": 0},
            {"variant": "ort-int8", "status": "ok", "image_s_p50": 5.0, "peak_rss_bytes": 2**30,
             "speedup_vs_peer_p50": 4.0, "peak_mem_vs_peer": 0.167, "psnr_vs_ort_fp32_db": 38.24,
             "max_abs_diff_vs_ort_fp32": 21},
            {"variant": "torch-bf16", "status": "error", "error": "RuntimeError: no"}]
    lines = bench_run.table(recs).splitlines()
    assert lines[0].split()[:4] == ["variant", "image", "p50", "s"] and len(lines) == 7
    assert lines[2].split() == ["ort-fp32", "10.000", "2.00", "3.00", "0.50"]
    assert lines[3].split()[1:] == ["11.000", "1.82", "1.00", "0.17", "identical", "(max", "0", "of", "255)"]
    assert lines[4].split()[1:] == ["5.000", "4.00", "1.00", "0.17", "38.2", "dB", "(max", "21", "of", "255)"]
    assert lines[5] == "torch-bf16               error: RuntimeError: no"


def test_gpu_goals_psnr_fields():
    """A PSNR field: a number; None (records.psnr_db: identical images) meets any floor; absent or in a
    failed record, not measured."""
    import gpu_goals

    assert gpu_goals.psnr_field({"k": 41.0}, "k") == (41.0, "41.0 dB")
    assert gpu_goals.psnr_field({"k": None}, "k") == (float("inf"), "identical images")
    assert gpu_goals.verdict(gpu_goals.psnr_field({"k": None}, "k")[0], 30.0, lower_is_better=False) == "**met**"
    for rec in ({}, {"status": "error", "k": 50.0}, None):
        assert gpu_goals.psnr_field(rec, "k") == (None, "not measured")
    for bad in ("NaN", float("nan")):  # as append_jsonl writes it, and as psnr_db returns it
        value, text = gpu_goals.psnr_field({"k": bad}, "k")
        assert "NaN" in text and gpu_goals.verdict(value, 30.0, lower_is_better=False) == "not met"


def test_gpu_goals_report(tmp_path):
    """benchmarks/gpu_goals.py judges the records it is given: met / not met / met only as steady
    allocated / not measured, GiB converted to GB, the latest run of a file only."""
    import gpu_goals

    def rec(variant, run="b", **kw):
        return json.dumps({"run_id": run, "variant": variant, "status": "ok", "device_name": "NVIDIA H200",
                           "commit": "abc", "size": 512, **kw})

    gib = lambda gb: gb / gpu_goals.GIB  # noqa: E731
    (tmp_path / "gpu.jsonl").write_text("\n".join([
        rec("torch-cuda", run="a", unet_step_ms={"p50": 99.0}),  # an older run in the same file: ignored
        rec("torch-cuda", unet_step_ms={"p50": 5.5}, image_ms={"p50": 360.0}, psnr_vs_reference_db=41.0,
            peak_alloc_gib=gib(2.6), peak_reserved_gib=gib(2.7), steady_peak_alloc_gib=gib(2.4),
            steady_peak_reserved_gib=gib(2.6)),
        rec("torch-cuda-lean", peak_alloc_gib=gib(2.2), peak_reserved_gib=gib(2.3)),
        rec(gpu_goals.COMPILE, unet_step_ms={"p50": 8.0}),
        rec("torch-cuda-gn-auto", unet_step_ms={"p50": 6.4}, image_ms={"p50": 340.0}),
        rec("torch-cuda-int8", **{"psnr_vs_torch-cuda_db": 37.5}),
        rec("torch-cuda-low-memory", peak_alloc_gib=gib(1.9), peak_reserved_gib=gib(2.1), status="error"),
    ]) + "\n")
    (tmp_path / "start-gpu.jsonl").write_text(json.dumps({"variant": "standalone", "process_wall_s_p50": 12.2,
                                                          "import_s_p50": 4.0, "load_s_p50": 1.5,
                                                          "first_image_s_p50": 6.0}) + "\n"
                                              + json.dumps({"variant": "cold", "process_wall_s_p50": 41.0,
                                                            "load_s_p50": 2.5, "first_image_s_p50": 34.0}) + "\n")
    (tmp_path / "gpu-fresh.jsonl").write_text("\n".join([  # one new process (run) per variant: all count
        rec("torch-cuda-low-memory", run="p1", peak_alloc_gib=gib(1.8), peak_reserved_gib=gib(2.2)),
        rec("torch-cuda-low-memory", run="p2", peak_alloc_gib=gib(1.7), peak_reserved_gib=gib(1.9)),  # re-run
        rec("torch-cuda-low-memory-int8", run="p3", peak_alloc_gib=gib(1.0), peak_reserved_gib=gib(1.1)),
    ]) + "\n")
    (tmp_path / "gpu-fresh-smallws.jsonl").write_text(rec(  # the allocator / cuBLAS settings it ran with
        "torch-cuda-low-memory", run="p4", size=1024, peak_alloc_gib=gib(1.85), peak_reserved_gib=gib(1.95),
        cuda_alloc_conf="expandable_segments:True", cublas_workspace_config=":4096:1",
        cublaslt_workspace_size="4096") + "\n")
    with open(tmp_path / "gpu-fresh.jsonl", "a") as f:  # step variants run only in a new process of their own
        f.write(rec("torch-cuda-pdl", run="p5", unet_step_ms={"p50": 5.9}, image_ms={"p50": 330.0}) + "\n")
        f.write(rec("torch-cuda", run="p6", unet_step_ms={"p50": 6.1}) + "\n")
    got = {r[0]: r for r in gpu_goals.rows(gpu_goals.load(tmp_path))}
    assert got["UNet step p50, torch-cuda-pdl (new process)"][1:] == (
        "5.90 ms, 1.36x torch.compile; torch-cuda in a new process 6.10 ms", "<= 6.0 ms", "**met**")
    assert got["50-step image p50, torch-cuda-pdl (new process)"][3] == "**met**"
    assert got["low-memory peak, torch-cuda-low-memory (1024 px, new process) [PYTORCH_CUDA_ALLOC_CONF="
               "expandable_segments:True, CUBLAS_WORKSPACE_CONFIG=:4096:1, CUBLASLT_WORKSPACE_SIZE=4096]"][3] == "**met**"
    assert got["low-memory peak, torch-cuda-low-memory (512 px, new process)"][3] == "**met**"  # the later record
    assert got["low-memory int8 peak, torch-cuda-low-memory-int8 (512 px, new process)"][3] == "**met**"
    assert got["UNet step p50, torch-cuda"][1:] == ("5.50 ms", "<= 6.0 ms", "**met**")
    assert got["vs torch.compile (same run)"][3] == "**met**" and got["vs torch.compile (same run)"][1].startswith("1.45x")
    assert got["50-step image p50, torch-cuda"][3] == "not met"
    assert got["UNet step p50, torch-cuda-gn-auto"][1:] == ("6.40 ms, 1.25x torch.compile", "<= 6.0 ms", "not met")
    assert got["50-step image p50, torch-cuda-gn-auto"][3] == "**met**"
    assert got["whole-pipeline peak, torch-cuda (512 px)"][3] == "met only as steady allocated"
    assert got["whole-pipeline peak, torch-cuda-lean (512 px)"][3] == "**met**"
    assert not any(k.startswith("low-memory peak, torch-cuda-low-memory (512 px)") for k in got)  # an error
    assert got["int8 weights: image PSNR against the fp16 torch-cuda image"][1:] == (
        "37.5 dB", "reported (no threshold)", "reported")
    assert got["image PSNR vs the fp32 reference"][1:] == ("41.0 dB", ">= 30.0 dB", "**met**")
    warm = got["bundle load to first image, new process, warm caches (standalone)"]
    assert warm[3] == "**met**" and warm[1].startswith("7.5 s") and "12.2" in warm[1]  # load + first image judged
    cold = next(v for k, v in got.items() if k.startswith("cold first start"))
    assert cold[1].startswith("36.5 s") and cold[3] == "reported"  # reported beside the goal, not judged
    assert "tuning" not in cold[1]  # an older record without the tuning figures
    (tmp_path / "start-gpu.jsonl").write_text(json.dumps({
        "variant": "cold", "load_s_p50": 2.5, "first_image_s_p50": 34.0, "tuning_s_p50": 30.4, "tune_budget_s": 30.0,
        "per_run": [{"status": "ok", "tuning_cut": 12}]}) + "\n")
    cold = next(r for r in gpu_goals.rows(gpu_goals.load(tmp_path)) if r[0].startswith("cold first start"))
    assert "of it, kernel tuning 30.4 s (budget 30.0 s, 12 calls left to the next run)" in cold[1]
    assert "tuning" not in warm[1]  # its first image measured nothing: a warm cache
    with open(tmp_path / "start-gpu.jsonl", "a") as f:  # a "warm" child that still tuned: said beside its figure
        f.write(json.dumps({"variant": "standalone", "load_s_p50": 1.5, "first_image_s_p50": 20.0,
                            "tuning_s_p50": 14.2}) + "\n")
    warm = next(r for r in gpu_goals.rows(gpu_goals.load(tmp_path)) if r[0].endswith("warm caches (standalone)"))
    assert "of it, kernel tuning 14.2 s: the tuning cache was not complete" in warm[1] and warm[3] == "not met"
    assert "NVIDIA H200" in gpu_goals.table(gpu_goals.load(tmp_path))
    assert "One step's kernels" not in gpu_goals.table(gpu_goals.load(tmp_path))  # no profile record
    with open(tmp_path / "gpu.jsonl", "a") as f:
        f.write(rec("profile-eager-2-steps", step_gpu_ms=4.0, step_launches=525.0,
                    step_ms_by_class={"convolution (cuDNN)": 2.0, "GEMM (cuBLAS)": 1.0, "GroupNorm (Triton)": 1.0})
                + "\n")
    report = gpu_goals.table(gpu_goals.load(tmp_path))
    assert "| convolution (cuDNN) | 2.000 | 50.0% |" in report and "4.000 ms of GPU time in 525 launches" in report
    assert "launches and gaps | 1.500 | 27.3% of 5.50 ms |" in report  # the graphed step (5.5 ms) less 4.0 ms
    # the size-specialisation A/B: the step with generic sizes in a new process, against torch-cuda's own
    # new process (the shared run's where none ran); the kernels op by op (CUDA-graph p50 where recorded)
    assert "Kernels, sizes specialised" not in report
    (tmp_path / "gpu-fresh-generic-sizes.jsonl").write_text(
        rec("torch-cuda", run="g1", kernels_generic_sizes="1", unet_step_ms={"p50": 6.6}) + "\n")
    k = lambda ms, **kw: json.dumps({"op": "group_norm_silu", "shape": [2, 320, 64, 64], "status": "ok",  # noqa: E731
                                     "commit": "abc", "ours_ms": {"p50": 0.1}, "ours_graph_ms": {"p50": ms}, **kw})
    (tmp_path / "kernels-gpu.jsonl").write_text(k(0.010) + "\n")
    (tmp_path / "kernels-gpu-generic-sizes.jsonl").write_text(k(0.024, kernels_generic_sizes="1") + "\n")
    got = {r[0]: r for r in gpu_goals.rows(gpu_goals.load(tmp_path))}
    ab = got["UNet step p50, torch-cuda with PM_KERNELS_GENERIC_SIZES=1 (new process)"]
    assert ab[1:] == ("6.60 ms (default, new process: 6.10 ms)", "<= 6.0 ms", "not met")  # the fresh one first
    loaded = gpu_goals.load(tmp_path)
    loaded["gpu-fresh"] = [r for r in loaded["gpu-fresh"] if r["variant"] != "torch-cuda"]
    ab = {r[0]: r for r in gpu_goals.rows(loaded)}["UNet step p50, torch-cuda with PM_KERNELS_GENERIC_SIZES=1 (new process)"]
    assert ab[1] == "6.60 ms (default, shared run: 5.50 ms)"
    report = gpu_goals.table(gpu_goals.load(tmp_path))
    assert "| group_norm_silu | [2, 320, 64, 64] | 0.0100 | 0.0240 | 2.40x |" in report
    # a -phases record: its first image's stages, GiB shown as GB
    assert "Memory by stage" not in report
    (tmp_path / "gpu-fresh-expandable.jsonl").write_text(rec(
        "torch-cuda-low-memory-1024-phases", size=1024, cuda_alloc_conf="expandable_segments:True",
        first_image={"unet": {"load_peak_alloc_gib": gib(1.8), "load_peak_reserved_gib": gib(1.85),
                              "run_peak_alloc_gib": gib(1.95), "run_peak_reserved_gib": gib(2.05),
                              "after_alloc_gib": gib(0.01), "after_reserved_gib": gib(0.02)}}) + "\n")
    report = gpu_goals.table(gpu_goals.load(tmp_path))
    assert "Memory by stage, first image: torch-cuda-low-memory-1024-phases (1024 px, new process) " \
           "[PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True]" in report
    assert "| unet | 1.80 / 1.85 | 1.95 / 2.05 | 0.01 / 0.02 |" in report
    # the kernel sweep: per shape, the peer, the current configuration and the best candidate
    assert "Triton attention and geglu_linear" not in report
    s = lambda op, cand, ms, **kw: json.dumps({"op": op, "shape": [2, 4096, 320, 8], "candidate": cand,  # noqa: E731
                                               "peer": cand != "triton", "status": "ok", "commit": "abc",
                                               "ms": {"p50": ms}, "rel_err": 1e-3, **kw})
    cfg = dict(block_m=128, block_n=64, num_warps=4)
    gemm = dict(block_m=128, block_n=64, block_k=64, num_warps=8)
    (tmp_path / "kernel-sweep-gpu.jsonl").write_text("\n".join([
        s("self_attention", "sdpa", 0.15), s("self_attention", "triton", 0.2, **cfg, tiles=[64, 0], default=True),
        s("self_attention", "triton", 0.12, **cfg, tiles=[32, 16], default=False),
        s("self_attention", "triton", 0.01, **cfg, tiles=[32, 16], default=False, **{"rel_err": 0.5}),  # wrong values
        s("geglu_linear", "cublas_then_geglu", 0.056), s("geglu_linear", "triton", 0.07, **gemm, default=True)]) + "\n")
    report = gpu_goals.table(gpu_goals.load(tmp_path))
    assert "| self_attention [2, 4096, 320, 8] | sdpa | 0.1500 | 0.2000 | 0.1200 | 128x64, 4 warps, tiles [32, 16] | " \
           "1.25x |" in report
    assert "| geglu_linear [2, 4096, 320, 8] | cublas_then_geglu | 0.0560 | 0.0700 | 0.0700 | 128x64x64, 8 warps | " \
           "0.80x |" in report


def test_the_step_profile_isolates_one_step_and_names_its_kernels():
    """profile_step's arithmetic (the profiles themselves need a GPU): one step = (4-step image -
    2-step image) / 2, so the text encoder's and the decode's kernels cancel; kernels grouped into
    classes by name, cuDNN's implicit-GEMM convolutions not counted as GEMMs."""
    from pm_bench import gpu_ours

    names = {"_gn_apply": "GroupNorm (Triton)", "_attn": "cross-attention (Triton)",
             "sm90_xmma_fprop_implicit_gemm_indexed_f16f16_f16f32_f32_nhwckrsc_nhwc": "convolution (cuDNN)",
             "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNN": "GEMM (cuBLAS)",
             "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64": "GEMM (cuBLAS)",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>": "self-attention (SDPA)",
             "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<c10::Half>>": "elementwise / reduce (PyTorch)",
             "void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>": "cat / copies (PyTorch)",
             "_add_layer_norm": "fused epilogues (Triton)", "_guided_update": "step update (Triton)",
             "something_new": "other"}
    for name, cls in names.items():
        assert gpu_ours.kernel_class(name) == cls, name
    two = {"_gn_apply": (1.0, 40), "clip_te_kernel": (3.0, 100), "vae_conv_fprop": (9.0, 30)}
    four = {"_gn_apply": (2.0, 80), "clip_te_kernel": (3.0, 100), "vae_conv_fprop": (9.0, 30),
            "_guided_update": (0.02, 2)}
    step = gpu_ours.per_step(two, four, 2)
    assert step["ms"] == pytest.approx(0.51) and step["launches"] == 21
    assert step["ms_by_class"] == pytest.approx({"GroupNorm (Triton)": 0.5, "step update (Triton)": 0.01})
    assert [n for _, _, n in step["top"]] == ["_gn_apply", "_guided_update"]


def test_gpu_goals_tables_the_kernel_choices(tmp_path):
    """torch-cuda's kernel_choices (pm_kernels.tuning, gpu_ours._tuning_fields) as a table: the
    default's time, the chosen candidate's, the runner-up, and the sum saved per call."""
    import gpu_goals

    choices = {"attention|torch.float16|2|4096|4096|8|40|False": {
                   "choice": "sdpa-cudnn", "default": "sdpa", "us": {"sdpa": 150.0, "sdpa-cudnn": 100.0,
                                                                     "triton-m128-n64": 180.0}},
               "group_norm_silu|torch.float16|2|320|64|64|32|False|True|True": {
                   "choice": "tiled", "default": "tiled", "us": {"tiled": 24.0, "grouped": 30.0}}}
    (tmp_path / "gpu.jsonl").write_text(json.dumps({
        "variant": "torch-cuda", "status": "ok", "commit": "abc", "unet_step_ms": {"p50": 6.5},
        "kernel_tuning": "on", "tuning_s": 41.5, "kernel_choices": choices}) + "\n")
    lines = gpu_goals.tuning_lines(gpu_goals.load(tmp_path))
    text = "\n".join(lines)
    assert "2 calls; 41.5 s spent measuring" in text
    assert "| attention|torch.float16|2|4096|4096|8|40|False | sdpa 150.0 | sdpa-cudnn 100.0 | sdpa 150.0 | 1.50x |" in text
    assert "| group_norm_silu|torch.float16|2|320|64|64|32|False|True|True | tiled 24.0 | tiled 24.0 | grouped 30.0 | 1.00x |" \
        in text
    assert "50.0 us saved" in text and "budget spent" not in text
    (tmp_path / "gpu.jsonl").write_text(json.dumps({
        "variant": "torch-cuda", "status": "ok", "kernel_tuning": "on", "tuning_s": 120.2, "tuning_cut": 7,
        "kernel_choices": choices}) + "\n")
    assert "120.2 s spent measuring in this process; 7 calls left at their default, the budget spent" in \
        "\n".join(gpu_goals.tuning_lines(gpu_goals.load(tmp_path)))
    assert gpu_goals.tuning_lines({"gpu": [{"variant": "torch-cuda", "status": "ok"}]}) == []


def test_gpu_goals_memory_row_says_when_the_first_image_tuned():
    import gpu_goals

    r = {"peak_alloc_gib": 1.8, "peak_reserved_gib": 1.85}
    assert "tuned" not in gpu_goals.memory_row("x", r, 2.0)[1]
    assert "the first image tuned kernels in this process (12.5 s)" in \
        gpu_goals.memory_row("x", {**r, "tuning_s": 12.5}, 2.0)[1]


def test_bench_start_records_a_child_that_times_out(monkeypatch):
    """A new process slower than --child-timeout (a cold start on a slow machine) is recorded as timed
    out with the limit, instead of the whole benchmark being killed with every record lost."""
    import subprocess

    import bench_start

    def slow(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(bench_start.subprocess, "run", slow)
    r = bench_start.run_child("cold", "bundle", "cuda", 50, 512, "record", timeout=70)
    assert r == {"status": "error", "error": "timed out: no first image within 70 s", "timed_out_s": 70.0}


def test_bench_start_writes_each_record_as_it_ends_within_its_deadline(cuda_bundle, tmp_path, monkeypatch):
    """bench_start under the GPU check's stage limit: each variant's record is on disk as soon as its
    last run ends (the command killed later keeps it), and --deadline cuts a child's timeout to what
    is left, so a child that would outlast the stage is recorded as timed out instead of the whole
    command being killed with nothing written. Stand-in children (no processes) and clock."""
    import types

    import bench_start

    out = tmp_path / "start.jsonl"
    clock = [0.0]
    monkeypatch.setattr(bench_start, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))  # its clock only
    monkeypatch.setattr(bench_start, "environment", lambda device, commit: {"commit": "c", "device": device})
    seen = []

    def child(variant, bundle, device, steps, size, record, timeout=600, tune_budget=None):
        written = [json.loads(line)["variant"] for line in out.read_text().splitlines()] if out.exists() else []
        seen.append((variant, round(timeout, 1), written))
        if variant == "cold":  # slower than what is left: its own timeout stops it
            clock[0] += timeout
            return {"status": "error", "error": f"timed out: no first image within {timeout:.0f} s",
                    "timed_out_s": round(timeout, 1)}
        clock[0] += 10.0
        return {"status": "ok", "process_wall_s": 10.0, "import_s": 2.0, "load_s": 1.0, "first_image_s": 7.0,
                "tuning_s": 0.0, "imported": []}

    monkeypatch.setattr(bench_start, "run_child", child)
    rc = bench_start.main(["--bundle", str(cuda_bundle), "--device", "cuda", "--runs", "1", "--variants",
                           "standalone,cold", "--deadline", "60", "--child-timeout", "300", "--out", str(out)])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 1 and [r["variant"] for r in recs] == ["standalone", "cold"]
    # the cold child started with standalone's record already written, its timeout cut to the deadline
    # less the parent's margin (60 - 10 s spent - 5), not the 300 s asked for
    assert seen == [("standalone", 47.0, []), ("cold", 45.0, ["standalone"])]
    assert recs[1]["ok_runs"] == 0 and recs[1]["per_run"][0]["timed_out_s"] == 45.0
    assert recs[0]["process_wall_s_p50"] == 10.0


def test_bench_start_cold_child_reports_its_tuning_budget_and_time(cuda_bundle, tmp_path, monkeypatch):
    """A real cold child on the CPU: --cold-tune-budget reaches its pm_kernels (the budget it read comes
    back), with what it spent tuning; a warm child keeps the environment's budget."""
    import bench_start

    monkeypatch.setenv("PM_KERNELS_TUNE_BUDGET_S", "77")
    monkeypatch.setenv("PM_KERNELS", "0")  # the kernels' references in the children (not the slow interpreter)
    out = tmp_path / "start.jsonl"
    rc = bench_start.main(["--bundle", str(cuda_bundle), "--device", "cpu", "--size", "256", "--steps", "1", "--runs", "1",
                           "--variants", "cold,standalone-no-verify", "--cold-tune-budget", "0", "--out", str(out)])
    recs = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rc == 0 and recs["cold"]["tune_budget_s"] == 0.0 and recs["standalone-no-verify"]["tune_budget_s"] == 77.0
    run = recs["cold"]["per_run"][0]
    assert run["tuning_cut"] == 0 and run["tuned_calls"] == 0 and recs["cold"]["tuning_s_p50"] == 0.0  # CPU: no session


def test_tuning_budget_from_the_environment(monkeypatch):
    from pm_kernels import tuning

    for text, want in (("", 120.0), ("45.5", 45.5), ("-3", 0.0)):
        monkeypatch.setenv("PM_KERNELS_TUNE_BUDGET_S", text)
        assert tuning._budget_from_env() == want
    monkeypatch.setenv("PM_KERNELS_TUNE_BUDGET_S", "2 minutes")
    with pytest.warns(UserWarning, match="not a number"):
        assert tuning._budget_from_env() == 120.0


def test_gpu_goals_reports_a_timed_out_cold_start(tmp_path):
    import gpu_goals

    (tmp_path / "start-gpu.jsonl").write_text(json.dumps({
        "variant": "cold", "runs": 1, "ok_runs": 0, "load_s_p50": None, "first_image_s_p50": None,
        "per_run": [{"status": "error", "error": "timed out", "timed_out_s": 70.0}]}) + "\n")
    rows = {r[0]: r for r in gpu_goals.rows(gpu_goals.load(tmp_path))}
    cold = [r for k, r in rows.items() if k.startswith("cold first start")]
    assert cold and cold[0][1].startswith("over 70 s") and cold[0][3] == "reported"


def test_gpu_goals_skips_a_record_cut_short(tmp_path, capsys):
    """A records file whose last line was being written when its process was stopped: the whole
    records before it are read, the cut line is skipped and named (not a crash of the goals table)."""
    import gpu_goals

    whole = json.dumps({"variant": "standalone", "load_s_p50": 1.5, "first_image_s_p50": 3.0})
    (tmp_path / "start-gpu.jsonl").write_text(whole + "\n" + whole[:25])
    recs = gpu_goals.load(tmp_path)["start-gpu"]
    assert recs == [json.loads(whole)] and "start-gpu.jsonl:2 is not a whole JSON record" in capsys.readouterr().err


def test_gpu_goals_step_row_says_when_tuning_was_cut(tmp_path):
    """The check caps kernel tuning per session: a torch-cuda step measured with calls left at their
    untuned default says how many beside the figure (judged as measured)."""
    import gpu_goals

    (tmp_path / "gpu.jsonl").write_text(json.dumps({"variant": "torch-cuda", "status": "ok", "tuning_cut": 7,
                                                    "unet_step_ms": {"p50": 6.5}}) + "\n")
    row = next(r for r in gpu_goals.rows(gpu_goals.load(tmp_path)) if r[0] == "UNet step p50, torch-cuda")
    assert row[1:] == ("6.50 ms (7 kernel calls untuned: the tuning budget ran out)", "<= 6.0 ms", "not met")
