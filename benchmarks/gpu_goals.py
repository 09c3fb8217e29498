"""The GPU issue's goals against the records of one gpu_check run: a markdown table, one row per
goal and measured setting, with the figure, the goal and a verdict. Not a benchmark: it reads
records (gpu.jsonl, start-gpu.jsonl, gpu-fresh*.jsonl (a new process per variant) and the extra runs'
files in the check's output folder) and
judges nothing that is not in them; a goal without a record says "not measured".

Memory goals are stated in GB (10^9 bytes); records hold GiB (2^30): converted here. Each memory
row shows the steady state (later images) and the first image (load, captures, warm-ups), as
allocated and reserved by PyTorch's allocator; the verdict uses the STRICTEST of them (reserved,
first image) and says so, with the lenient one (allocated, steady) beside it.

  python benchmarks/gpu_goals.py OUTDIR            # the folder gpu_check.sh wrote
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

GIB = 2**30 / 1e9  # GB per GiB
STEP_MS, COMPILE_RATIO, IMAGE_S, PSNR_DB, START_S = 6.0, 1.4, 0.35, 30.0, 10.0
PEAK_GB, LOW_GB, LOW_INT8_GB = 2.5, 2.0, 1.2
PIPELINE = ("torch-cuda", "torch-cuda-offload-te", "torch-cuda-vae-graph", "torch-cuda-vae-bands", "torch-cuda-lean",
            "torch-cuda-lean-bands", "torch-cuda-lean-bands-no-kv", "torch-cuda-int8", "torch-cuda-hf-modules", "torch-cuda-no-kv-tables",
            "torch-cuda-cudnn-heuristics", "torch-cuda-shared-pool", "torch-cuda-shared-pool-offload-te",
            "torch-cuda-shared-pool-one-stream")
LOW = ("torch-cuda-low-memory", "torch-cuda-low-memory-batched", "torch-cuda-low-memory-cudnn-heuristics",
       "torch-cuda-low-memory-1024", "torch-cuda-low-memory-1024-no-ff-chunk", "torch-cuda-low-memory-1024-untiled",
       "torch-cuda-low-memory-1024-bands", "torch-cuda-low-memory-1024-cudnn-heuristics",
       "torch-cuda-low-memory-1024-one-stream")
LOW_INT8 = ("torch-cuda-low-memory-int8", "torch-cuda-low-memory-int8-1024")
COMPILE = "torch-compile-reduce-overhead"
# other ways of computing the same step (the ablations of the default too: where one is faster, the
# default's change it undoes did not pay)
STEP_VARIANTS = ("torch-cuda-untuned", "torch-cuda-kv-tables", "torch-cuda-generic-sizes", "torch-cuda-geglu-gemm", "torch-cuda-pdl", "torch-cuda-gn-auto", "torch-cuda-gn-grouped", "torch-cuda-cudnn-attention",
                 "torch-cuda-pre-fusion",
                 "torch-cuda-unfused-epilogues", "torch-cuda-no-time-tables", "torch-cuda-no-step-kernels",
                 "torch-cuda-no-te-graph", "torch-cuda-shared-pool", "torch-cuda-vae-nchw")


def load(folder: pathlib.Path) -> dict[str, list[dict]]:
    """file stem -> its records, the latest of each variant (a file can hold several runs: gpu_check's
    new-process stage appends one run per variant; an older record of the same variant is superseded)."""
    out = {}
    for path in sorted(folder.glob("*.jsonl")):
        latest: dict = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except ValueError:  # a line cut short (a process stopped while writing it): skipped, said
                    print(f"gpu_goals: {path.name}:{n} is not a whole JSON record; skipped", file=sys.stderr)
                    continue
                key = r.get("variant") or len(latest)
                latest.pop(key, None)  # re-inserted last: the file's order of the latest records
                latest[key] = r
        out[path.stem] = list(latest.values())
    return out


def _ok(r: dict | None) -> bool:
    return bool(r) and r.get("status", "ok") == "ok"


def psnr_field(rec, key: str) -> tuple[float | None, str]:
    """(value, text) of a record's PSNR field: absent (or a failed record) is not measured; None is
    identical images (records.psnr_db), infinitely many dB; NaN (records.append_jsonl writes it as
    "NaN") is an image holding NaN or inf, which meets no floor."""
    if not _ok(rec) or key not in rec:
        return None, "not measured"
    value = rec[key]
    if value is None:
        return float("inf"), "identical images"
    if isinstance(value, str) or not math.isfinite(value):
        return float("-inf"), "no PSNR: an image holds NaN or inf"
    return value, f"{value} dB"


def verdict(value, goal, lower_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    met = value <= goal if lower_is_better else value >= goal
    return "**met**" if met else "not met"


# record field -> the environment variable a run set it from (allocator, cuDNN / cuBLAS workspaces,
# pm_kernels' A/B switch): named beside a memory figure, since each changes peaks
SETTINGS = (("cuda_alloc_conf", "PYTORCH_CUDA_ALLOC_CONF"), ("cudnn_conv_wscap_dbg", "CUDNN_CONV_WSCAP_DBG"),
            ("cublas_workspace_config", "CUBLAS_WORKSPACE_CONFIG"),
            ("cublaslt_workspace_size", "CUBLASLT_WORKSPACE_SIZE"), ("kernels_generic_sizes", "PM_KERNELS_GENERIC_SIZES"))


def settings(r: dict) -> str:
    """" [VAR=value, ...]" for the SETTINGS record `r` ran with ("" for none)."""
    named = [f"{var}={r[field]}" for field, var in SETTINGS if r.get(field)]
    return f" [{', '.join(named)}]" if named else ""


def memory_row(label: str, r: dict, goal_gb: float) -> tuple:
    """(setting, figure text, goal text, verdict) for one variant's peaks."""
    first = (r.get("peak_alloc_gib"), r.get("peak_reserved_gib"))
    steady = (r.get("steady_peak_alloc_gib"), r.get("steady_peak_reserved_gib"))
    gb = lambda v: None if v is None else round(v * GIB, 2)  # noqa: E731
    strict = gb(first[1])
    lenient = gb(steady[0]) if steady[0] is not None else gb(first[0])
    later = "no later image" if steady[0] is None else f"later images {gb(steady[0])} / {gb(steady[1])} GB"
    figure = f"first image {gb(first[0])} / {gb(first[1])} GB, {later} (allocated / reserved)"
    if r.get("tuning_s"):  # its candidates' outputs and timing graphs were in this first image's peak
        figure += f"; the first image tuned kernels in this process ({r['tuning_s']} s)"
    v = verdict(strict, goal_gb)
    if v != "**met**" and lenient is not None and lenient <= goal_gb:
        v = "met only as steady allocated" if steady[0] is not None else "met only as allocated"
    return (label + settings(r), figure, f"<= {goal_gb} GB", v)


def rows(records: dict[str, list[dict]]) -> list[tuple]:
    # (record, where): gpu-fresh* files hold one new process per variant (nothing earlier in it)
    gpu = [(r, ", new process" if "fresh" in stem else "") for stem, recs in records.items()
           if stem.startswith("gpu") and stem != "gpu-goals" for r in recs]
    main = {r["variant"]: r for r in records.get("gpu", []) if "variant" in r}
    out = []
    ours, comp = main.get("torch-cuda"), main.get(COMPILE)
    step = ours["unet_step_ms"]["p50"] if _ok(ours) and "unet_step_ms" in ours else None
    # the check caps kernel tuning per session: calls it did not reach ran their untuned default
    cut = (f" ({ours['tuning_cut']} kernel calls untuned: the tuning budget ran out)"
           if _ok(ours) and ours.get("tuning_cut") else "")
    out.append(("UNet step p50, torch-cuda", "not measured" if step is None else f"{step:.2f} ms{cut}",
                f"<= {STEP_MS} ms", verdict(step, STEP_MS)))
    if step is not None and _ok(comp) and "unet_step_ms" in comp:
        ratio = comp["unet_step_ms"]["p50"] / step
        out.append(("vs torch.compile (same run)", f"{ratio:.2f}x ({comp['unet_step_ms']['p50']:.2f} ms)",
                    f">= {COMPILE_RATIO}x", verdict(ratio, COMPILE_RATIO, lower_is_better=False)))
    else:
        out.append(("vs torch.compile (same run)", "not measured", f">= {COMPILE_RATIO}x", "not measured"))
    image = ours["image_ms"]["p50"] / 1000 if _ok(ours) and "image_ms" in ours else None
    out.append(("50-step image p50, torch-cuda", "not measured" if image is None else f"{image:.3f} s",
                f"<= {IMAGE_S} s", verdict(image, IMAGE_S)))
    # a step variant from the shared run, else from its own new process (the variants whose first real
    # run it is), shown beside torch-cuda's own new-process step where that ran
    fresh_runs = {r.get("variant"): r for r in records.get("gpu-fresh", [])}
    fresh_ours = fresh_runs.get("torch-cuda")
    for name in STEP_VARIANTS:
        r, where = main.get(name), ""
        if not (_ok(r) and "unet_step_ms" in r):
            r, where = fresh_runs.get(name), " (new process)"
        if _ok(r) and "unet_step_ms" in r:
            v = r["unet_step_ms"]["p50"]
            ratio = (f", {comp['unet_step_ms']['p50'] / v:.2f}x torch.compile"
                     if _ok(comp) and "unet_step_ms" in comp else "")
            if where and _ok(fresh_ours) and "unet_step_ms" in fresh_ours:
                ratio += f"; torch-cuda in a new process {fresh_ours['unet_step_ms']['p50']:.2f} ms"
            out.append((f"UNet step p50, {name}{where}", f"{v:.2f} ms{ratio}", f"<= {STEP_MS} ms", verdict(v, STEP_MS)))
            if "image_ms" in r:
                im = r["image_ms"]["p50"] / 1000
                out.append((f"50-step image p50, {name}{where}", f"{im:.3f} s", f"<= {IMAGE_S} s",
                            verdict(im, IMAGE_S)))
    # the size-specialisation A/B: the default step in a new process with PM_KERNELS_GENERIC_SIZES=1
    # (pm_kernels' 2-byte accesses, as before the rule) against the default's new-process record
    # (or, where that process did not run, the shared run's)
    generic = {r.get("variant"): r for r in records.get("gpu-fresh-generic-sizes", [])}.get("torch-cuda")
    fresh = {r.get("variant"): r for r in records.get("gpu-fresh", [])}.get("torch-cuda")
    if _ok(generic) and "unet_step_ms" in generic:
        v = generic["unet_step_ms"]["p50"]
        peer, where = (fresh, "new process") if _ok(fresh) and "unet_step_ms" in fresh else (ours, "shared run")
        than = f" (default, {where}: {peer['unet_step_ms']['p50']:.2f} ms)" if _ok(peer) and "unet_step_ms" in peer \
            else ""
        out.append(("UNet step p50, torch-cuda with PM_KERNELS_GENERIC_SIZES=1 (new process)", f"{v:.2f} ms{than}",
                    f"<= {STEP_MS} ms", verdict(v, STEP_MS)))
    psnr, text = psnr_field(ours, "psnr_vs_reference_db")
    out.append(("image PSNR vs the fp32 reference", text, f">= {PSNR_DB} dB",
                verdict(psnr, PSNR_DB, lower_is_better=False)))
    drift, text = psnr_field(main.get("torch-cuda-int8"), "psnr_vs_torch-cuda_db")
    out.append(("int8 weights: image PSNR against the fp16 torch-cuda image", text, "reported (no threshold)",
                "not measured" if drift is None else "reported"))
    for names, goal, what in ((PIPELINE, PEAK_GB, "whole-pipeline peak"), (LOW, LOW_GB, "low-memory peak"),
                              (LOW_INT8, LOW_INT8_GB, "low-memory int8 peak")):
        found = False
        for r, where in gpu:
            if r.get("variant") in names and _ok(r) and "peak_reserved_gib" in r:
                out.append(memory_row(f"{what}, {r['variant']} ({r.get('size', '?')} px{where})", r, goal))
                found = True
        if not found:
            out.append((what, "not measured", f"<= {goal} GB", "not measured"))
    start = {r.get("variant"): r for r in records.get("start-gpu", [])}
    warm = start.get("standalone")
    # the goal: bundle load to first image (Pipeline.load + the first generate) in a new process with
    # warm caches; the whole process (interpreter + imports) is shown beside it
    load_first = None
    if warm and warm.get("load_s_p50") is not None and warm.get("first_image_s_p50") is not None:
        load_first = warm["load_s_p50"] + warm["first_image_s_p50"]
    # a tuning cache the earlier stages left incomplete (their sessions cut by the check's budgets): the
    # "warm" child measured kernels in its first image, so its cache was not warm; said beside the figure
    still_tuning = (f"; of it, kernel tuning {warm['tuning_s_p50']} s: the tuning cache was not complete"
                    if warm and warm.get("tuning_s_p50") else "")
    out.append(("bundle load to first image, new process, warm caches (standalone)",
                "not measured" if load_first is None else
                f"{load_first:.1f} s (load {warm['load_s_p50']} + first image {warm['first_image_s_p50']}; whole "
                f"process {warm.get('process_wall_s_p50')} s with import {warm.get('import_s_p50')}{still_tuning})",
                f"<= {START_S} s", verdict(load_first, START_S)))
    cold = start.get("cold")  # reported beside the goal, not judged: empty Triton and tuning caches, files hashed
    what = "cold first start: bundle load to first image, new process, empty Triton and tuning caches, files hashed"
    if cold and cold.get("load_s_p50") is not None and cold.get("first_image_s_p50") is not None:
        tuned = ""
        if cold.get("tuning_s_p50") is not None:  # what its first image spent measuring kernels, and within what
            cut = max((r.get("tuning_cut") or 0 for r in cold.get("per_run", [])), default=0)
            tuned = (f"; of it, kernel tuning {cold['tuning_s_p50']} s (budget {cold.get('tune_budget_s')} s"
                     + (f", {cut} calls left to the next run)" if cut else ", every call measured)"))
        out.append((what, f"{cold['load_s_p50'] + cold['first_image_s_p50']:.1f} s (load {cold['load_s_p50']} + first "
                          f"image {cold['first_image_s_p50']}; whole process {cold.get('process_wall_s_p50')} s{tuned})",
                    "reported (no threshold)", "reported"))
    elif cold:  # bench_start's --child-timeout cut it: longer than that, the figure it has
        limits = [r.get("timed_out_s") for r in cold.get("per_run", []) if r.get("timed_out_s")]
        if limits:
            out.append((what, f"over {max(limits):.0f} s (no first image within the time the check gave it)",
                        "reported (no threshold)", "reported"))
    return out


def kernel_ab_lines(records: dict[str, list[dict]]) -> list[str]:
    """The kernels' size-specialisation A/B, op by op: each memory-bound kernel's p50 (in a CUDA graph
    where the record has it) as compiled by default (16-byte accesses) and with
    PM_KERNELS_GENERIC_SIZES=1 (2-byte), from the same check's kernel stage. Empty without both files."""
    def times(stem):
        out = {}
        for r in records.get(stem, []):
            if _ok(r) and "op" in r:
                ms = (r.get("ours_graph_ms") or r.get("ours_ms") or {}).get("p50")
                if ms:
                    out[(r["op"], tuple(r.get("shape", ())))] = ms
        return out

    default, generic = times("kernels-gpu"), times("kernels-gpu-generic-sizes")
    both = [k for k in generic if k in default]
    if not both:
        return []
    out = ["", "Kernels, sizes specialised (default: 16-byte accesses) vs PM_KERNELS_GENERIC_SIZES=1 (2-byte), p50 ms",
           "", "| op | shape | default | generic sizes | generic / default |", "|---|---|---|---|---|"]
    out += [f"| {op} | {list(shape)} | {default[(op, shape)]:.4f} | {generic[(op, shape)]:.4f} | "
            f"{generic[(op, shape)] / default[(op, shape)]:.2f}x |" for op, shape in both]
    return out


def phases_lines(records: dict[str, list[dict]]) -> list[str]:
    """Each -phases record (gpu_ours.measure_phases): per network stage of its first image, the peaks
    while loading and while running and what stays allocated after, in GB: where a variant's peak is."""
    gb = lambda v: "-" if v is None else f"{v * GIB:.2f}"  # noqa: E731
    out = []
    for stem, recs in records.items():
        for r in recs:
            if not (stem.startswith("gpu") and str(r.get("variant", "")).endswith("-phases") and _ok(r)):
                continue
            where = ", new process" if "fresh" in stem else ""
            out += ["", f"Memory by stage, first image: {r['variant']} ({r.get('size', '?')} px{where}){settings(r)}, GB "
                        "(allocated / reserved)", "",
                    "| stage | load peak | run peak | after |", "|---|---|---|---|"]
            for name, st in (r.get("first_image") or {}).items():
                out.append(f"| {name} | {gb(st.get('load_peak_alloc_gib'))} / {gb(st.get('load_peak_reserved_gib'))} | "
                           f"{gb(st.get('run_peak_alloc_gib'))} / {gb(st.get('run_peak_reserved_gib'))} | "
                           f"{gb(st.get('after_alloc_gib'))} / {gb(st.get('after_reserved_gib'))} |")
    return out


def sweep_lines(records: dict[str, list[dict]]) -> list[str]:
    """sweep_kernels.py's table (kernel-sweep-gpu.jsonl): per attention / geglu_linear shape, the
    PyTorch peer, the Triton kernel's current configuration and its best candidate. Empty without it."""
    recs = records.get("kernel-sweep-gpu", [])
    if not recs:
        return []
    here = str(pathlib.Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from sweep_kernels import summary_lines

    return ["", "Triton attention and geglu_linear: launch configurations against their PyTorch peer, p50 ms in a "
                "CUDA graph (sweep_kernels.py; current = the configuration the code takes now)", ""] + summary_lines(recs)


def tuning_lines(records: dict[str, list[dict]]) -> list[str]:
    """torch-cuda's kernel choices (pm_kernels.tuning, gpu_ours' kernel_choices): per tuned call, the
    untuned default's and the chosen candidate's microseconds per call (a CUDA graph's) and the
    runner-up; then what the measuring cost the first process. Empty without them."""
    ours = next((r for r in records.get("gpu", []) if r.get("variant") == "torch-cuda" and _ok(r)), None)
    found = (ours or {}).get("kernel_choices")
    if not found:
        return []
    out = ["", f"Kernel choices of torch-cuda (pm_kernels.tuning, measured on this GPU: {len(found)} calls; "
               f"{ours.get('tuning_s', 0)} s spent measuring in this process"
               + (f"; {ours['tuning_cut']} calls left at their default, the budget spent" if ours.get("tuning_cut") else "")
               + "), us per call in a CUDA graph", "",
           "| call | default | chosen | runner-up | default / chosen |", "|---|---|---|---|---|"]
    saved = 0.0
    for key, e in sorted(found.items()):
        us, choice, default = e.get("us", {}), e.get("choice"), e.get("default")
        if choice not in us:
            continue
        rest = sorted((t, n) for n, t in us.items() if n != choice)
        base = us.get(default)
        saved += (base - us[choice]) if base is not None else 0.0
        out.append(f"| {key} | {default} {base if base is not None else '-'} | {choice} {us[choice]} | "
                   f"{f'{rest[0][1]} {rest[0][0]}' if rest else '-'} | "
                   f"{f'{base / us[choice]:.2f}x' if base else '-'} |")
    out.append(f"| sum over the calls (each once; a step makes several of some) | | | | {saved:.1f} us saved |")
    return out


def profile_lines(records: dict[str, list[dict]]) -> list[str]:
    """Where one step's GPU time goes (gpu_ours.profile_step's record: one eager step's kernels by
    class), beside the graphed step's p50: the difference is what launching and the gaps between
    kernels cost inside the graph. Empty without a profile record."""
    main = {r.get("variant"): r for r in records.get("gpu", [])}
    prof = main.get("profile-eager-2-steps")
    if not _ok(prof) or "step_ms_by_class" not in prof:
        return []
    kernel_ms = prof["step_gpu_ms"]
    out = ["", f"One step's kernels (eager profile: (4-step image - 2-step image) / 2): {kernel_ms:.3f} ms of GPU "
                f"time in {prof['step_launches']:.0f} launches", "", "| kernels | ms per step | share |", "|---|---|---|"]
    out += [f"| {cls} | {ms:.3f} | {100 * ms / max(kernel_ms, 1e-9):.1f}% |" for cls, ms in prof["step_ms_by_class"].items()]
    ours = main.get("torch-cuda")
    if _ok(ours) and "unet_step_ms" in ours:
        graph = ours["unet_step_ms"]["p50"]
        out.append(f"| graphed step p50 less the kernels' time: launches and gaps | {graph - kernel_ms:.3f} | "
                   f"{100 * (graph - kernel_ms) / graph:.1f}% of {graph:.2f} ms |")
    return out


def table(records: dict[str, list[dict]]) -> str:
    lines = ["| goal, setting | measured | goal | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(records)]
    lines += profile_lines(records)
    lines += tuning_lines(records)
    lines += kernel_ab_lines(records)
    lines += sweep_lines(records)
    lines += phases_lines(records)
    device = next((r.get("device_name") for recs in records.values() for r in recs if r.get("device_name")), "?")
    commits: dict = {}  # commit -> the files measured at it
    for stem, recs in records.items():
        for c in dict.fromkeys(str(r["commit"])[:12] for r in recs if r.get("commit")):
            commits.setdefault(c, []).append(stem)
    at = "; ".join(f"{c} ({', '.join(stems)})" for c, stems in commits.items()) or "?"
    return f"Device: {device}; commit {at}\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=pathlib.Path, help="gpu_check.sh's output folder")
    a = ap.parse_args(argv)
    if not a.folder.is_dir():
        ap.error(f"{a.folder}: not a folder")
    print(table(load(a.folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
