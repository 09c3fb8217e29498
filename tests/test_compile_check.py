"""benchmarks/compile_check.py: pm_kernels' Triton kernels compiled for NVIDIA GPUs without one.

Runs the check in a child process (the test session runs the kernels under TRITON_INTERPRET=1,
which replaces @triton.jit functions by interpreted ones at import) for a Hopper GPU (what the
H200 records ran) and a consumer Ampere one (99 KB of shared memory per block), at the 512 px
UNet call and step (--quick). Needs Triton with its NVIDIA backend (ptxas, cuobjdump), as the
Linux x86-64 wheels ship it; skipped elsewhere."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
triton = pytest.importorskip("triton")
pytest.importorskip("diffusers")

from pm_bench import compile_check  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = [pathlib.Path(compile_check._tool(name)) for name in ("ptxas", "cuobjdump")]
needs_tools = pytest.mark.skipif(not all(t.exists() for t in TOOLS),
                                 reason=f"Triton's NVIDIA tools (ptxas, cuobjdump) are not in {TOOLS[0].parent}")


@needs_tools
def test_kernels_compile_for_hopper_and_consumer_ampere(tmp_path):
    out = tmp_path / "compile.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "benchmarks/compile_check.py", "--arch", "90,86", "--quick", "--details", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and all(r["schema"] == "pm-compile-check/1" and r["ok"] for r in lines)
    summary = {r["arch"]: r for r in lines if r["record"] == "summary"}
    recs = [r for r in lines if r["record"] == "kernel"]
    assert set(summary) == {"sm_90", "sm_86"} and not summary["sm_90"]["over_limits"]
    assert [o["num_stages"] for o in summary["sm_86"]["over_limits"]] == [3]
    assert summary["sm_90"]["kernels"] == len([r for r in recs if r["arch"] == "sm_90"])
    by_arch = {a: [r for r in recs if r["arch"] == a] for a in ("sm_90", "sm_86")}
    names = {r["kernel"] for r in by_arch["sm_90"]}
    # what one step launches: GroupNorm (tiled, three passes), attention, GEGLU, the fused epilogues
    # and the step's own two kernels
    assert {"_gn_partial", "_gn_finalize", "_gn_apply", "_attn", "_geglu", "_add_layer_norm", "_add_bias_residual",
            "_scaled_copies", "_guided_update", "_geglu_mm"} <= names
    assert all(r["fits"] and r["shared_bytes"] <= r["max_shared_bytes"] and r["regs"] > 0 for r in by_arch["sm_90"])
    # the memory-bound kernels read and write fp16 in 16-byte vectors (eight values per access), in
    # the channels-last variants the GPU runs (GroupNorm's channel stride 1): with their sizes left
    # unspecialised Triton compiled every access to 2 bytes (PM_KERNELS_GENERIC_SIZES=1 still does)
    for r in by_arch["sm_90"]:
        acc = r["global_access_bytes"]
        if r["kernel"] in ("_gn_partial", "_gn_apply", "_add_bias_residual", "_add_layer_norm", "_geglu"):
            assert acc["loads"].get("16", 0) >= 2 and acc["loads"].get("2", 0) <= 1, (r["kernel"], acc)  # 1: a pivot
            assert "2" not in acc["stores"], (r["kernel"], acc)
        if r["kernel"] in ("_gn_partial", "_gn_apply"):
            assert r["constexprs"].get("s_c") == 1, r["constexprs"]  # channels-last
    assert summary["sm_90"]["two_byte_stores"] == ["_scaled_copies"]  # its NCHW -> NHWC scatter of the latent
    # the kernel benchmark's variants: the grouped GroupNorm's rows are one group's CPG channels (a
    # constexpr), its accesses as wide as 2 * CPG bytes are aligned (CPG 40, 80: 16 bytes; 20, 60: 8;
    # 10, 30: 4); the attention at head dim 40 (a constexpr: 80-byte head rows) reads 16 bytes at a time
    grouped = [r for r in by_arch["sm_90"] if r["kernel"] in ("_gn_grp_apply", "_gn_grp_stats")]
    assert {r["constexprs"]["CPG"] for r in grouped} == {10, 20, 30, 40, 60, 80}
    for r in grouped:
        cpg, acc = r["constexprs"]["CPG"], r["global_access_bytes"]
        width = str(min(16, (2 * cpg) & -(2 * cpg)))
        assert acc["loads"].get(width, 0) >= 2, (cpg, acc)
        if r["kernel"] == "_gn_grp_apply":
            assert list(acc["stores"]) == [width], (cpg, acc)
    # the GEGLU-in-the-GEMM kernel: Hopper's tensor-core instructions (wgmma: in its PTX), whole tiles
    # staged through shared memory, 16-byte stores of its output
    gemm = [r for r in by_arch["sm_90"] if r["kernel"] == "_geglu_mm"]
    assert gemm and all(r["fits"] and r["mma"] == "wgmma" and list(r["global_access_bytes"]["stores"]) == ["16"]
                        for r in gemm), gemm
    assert all(r["mma"] == "mma" for r in by_arch["sm_86"] if r["kernel"] == "_geglu_mm")  # Ampere: mma.sync
    d40 = [r for r in by_arch["sm_90"] if r["kernel"] == "_attn" and r["constexprs"]["D"] == 40]
    plain = [r for r in d40 if not r["constexprs"]["D_B"] and not r["constexprs"]["HAS_IDX"]]
    assert len(plain) == 2  # 77 keys, 4096 keys (a size divisible by 16: specialised)
    assert all(r["global_access_bytes"] == {"loads": {"16": 8}, "stores": {"16": 8}} for r in plain), plain
    # the tuning's candidates too (two head-dim tiles, K/V read by table row): q/k/v/out 16-byte, the
    # row index (int64) one 8-byte load
    assert {(r["constexprs"]["D_B"], r["constexprs"]["HAS_IDX"]) for r in d40} >= {(16, True), (16, False), (0, True)}
    for r in d40:
        index = {"8": 1} if r["constexprs"]["HAS_IDX"] else {}
        assert set(r["global_access_bytes"]["loads"].items()) - set(index.items()) <= {("16", 8), ("16", 6)}, r
        assert list(r["global_access_bytes"]["stores"]) == ["16"], r

    def attn(arch, stages):
        return [r for r in by_arch[arch] if r["kernel"] == "_attn" and r["constexprs"]["BLOCK_D"] == 256
                and r["num_stages"] == stages]

    # head dim 160: Triton's default 3 stages fit Hopper's 227 KB; a 99 KB GPU refuses it, 2 stages load
    assert attn("sm_90", 3) and all(r["fits"] for r in attn("sm_90", 3))
    assert attn("sm_86", 3) and not any(r["fits"] for r in attn("sm_86", 3))
    assert attn("sm_86", 2) and all(r["fits"] for r in attn("sm_86", 2))
    assert all(r["shared_bytes"] > r["max_shared_bytes"] for r in attn("sm_86", 3))


@pytest.mark.slow  # (10-15 s; an opt-in switch: -m slow)
@needs_tools
def test_generic_sizes_switch_compiles_two_byte_accesses(tmp_path):
    """PM_KERNELS_GENERIC_SIZES=1 (the GPU check's A/B of the size rule) compiles the kernels as they
    were: sizes unspecialised, the GroupNorm, residual and LayerNorm kernels' fp16 accesses 2 bytes
    wide, which the summary names; the record says the switch was on."""
    out = tmp_path / "generic.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PM_KERNELS_GENERIC_SIZES"] = "1"
    r = subprocess.run([sys.executable, "benchmarks/compile_check.py", "--arch", "90", "--quick", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (summary,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["kernels_generic_sizes"] == "1"
    assert {"_gn_apply", "_add_bias_residual", "_add_layer_norm", "_scaled_copies"} <= set(summary["two_byte_stores"])
    assert "_geglu" not in summary["two_byte_stores"]  # never had size arguments


@pytest.mark.slow  # (15 s; PDL is opt-in: -m slow)
@needs_tools
def test_pdl_kernels_wait_for_the_kernel_before_on_hopper_only(tmp_path):
    """--pdl: the kernels as pm_kernels.set_pdl(True) launches them. At sm_90 every kernel of the UNet
    call and step starts with programmatic dependent launch's wait (griddepcontrol.wait, in its PTX);
    at sm_86, which has no PDL, none does (the instruction would not assemble there)."""
    out = tmp_path / "pdl.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "benchmarks/compile_check.py", "--arch", "90,86", "--quick", "--pdl", "--details",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    summary = {r["arch"]: r for r in recs if r["record"] == "summary"}
    assert summary["sm_90"]["ok"] and summary["sm_86"]["ok"]
    assert summary["sm_90"]["pdl_kernels"] == summary["sm_90"]["kernels"] > 30
    assert summary["sm_86"]["pdl_kernels"] == 0


@needs_tools
def test_every_kernel_compiles_with_sizes_of_one(tmp_path):
    """Triton makes an integer argument equal to 1 a constant: GroupNorm and LayerNorm used theirs as
    tensors (HW.to(tl.float32)) and failed to compile at 1 x 1 pixels, one channel per group or one
    channel (found by this check once the sizes were specialised)."""
    out = tmp_path / "edge.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "benchmarks/compile_check.py", "--arch", "90", "--edge-sizes", "--details",
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs and all(rec["ok"] for rec in recs)
    names = {rec["kernel"] for rec in recs if rec["record"] == "kernel"}
    assert {"_gn_partial", "_gn_finalize", "_gn_apply", "_gn_grp_stats", "_gn_grp_apply", "_add_layer_norm",
            "_add_bias_residual", "_attn", "_geglu", "_dequant", "_scaled_copies", "_guided_update"} <= names


def test_register_and_thread_limits():
    cc = compile_check
    assert cc.max_threads(32) == 1024 and cc.max_threads(64) == 1024
    assert cc.max_threads(128) == 512 and cc.max_threads(255) == 256 and cc.max_threads(65) == 896
