"""pm-export's work: concept.pt + model folder -> bundle folder; or concept.pt -> a table in a bundle.

The full export writes everything into a hidden temporary folder beside OUT
(`.OUT.tmp-XXXX`), writes bundle.json last and renames the folder to OUT at the end: a failure
or an interrupt leaves nothing that looks like a bundle. Each network is exported in fp32,
validated against PyTorch, then (fp16) converted and validated again; TensorRT plans, when
asked for, are built from the fp32 graphs.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from pm_runtime import formats as F
from pm_runtime.bundle import editing_bundle, file_entry, manifest_lock, sha256_file, write_manifest
from pm_runtime.concept_table import save_table
from pm_runtime.errors import UserError
from pm_runtime.interrupts import caused_by_interrupt, noticing_interrupts
from pm_runtime.specs import NETWORKS, OPTIONAL_NETWORKS, SAFETY_CHECKER, STEP, UNET, VAE_DECODER, network_specs

Log = Callable[[str], None]
TARGETS = ("onnx", "tensorrt", "torch")  # --target: a comma-separated list of these, or "all"
# int8 UNet modes pm-export offers (export/quantize.py). static-qdq is calibrated: after the fp32
# bundle is complete, its own pipeline records UNet feeds (CALIBRATION_PROMPTS), see _static_int8_unet.
INT8_MODES = ("dynamic-matmul", "nbits8", "weight-only-qdq", "static-qdq")
STATIC_INT8 = ("static-qdq",)
# static-qdq calibration: per prompt CALIBRATION_STEPS DPM-Solver++ steps at CALIBRATION_SIZE px; the
# UNet feeds of the first prompts calibrate, those of the last one validate (held out). The whole
# SD-1.5-shaped export peaks at 12.4 GB with them (STATIC_INT8_PEAK_PER_UNET_BYTE below).
CALIBRATION_PROMPTS = ("a portrait photo of {word} in a park", "a close-up photo of {word}, studio light",
                       "{word} as a knight in armour, oil painting")
CALIBRATION_STEPS = 5
CALIBRATION_SIZE = 256
VALIDATION_FEEDS = 3  # of the held-out prompt's feeds: first, middle, last step


def parse_targets(target: str) -> frozenset[str]:
    parts = {t.strip() for t in str(target).split(",") if t.strip()}
    if parts == {"all"}:
        return frozenset(TARGETS)
    if not parts or not parts <= set(TARGETS):
        raise UserError(f"--target must be a comma-separated list of {', '.join(TARGETS)} (or all), got {target!r}")
    return frozenset(parts)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class ExportConfig:
    concept: Path
    model: Path | None = None  # full export: the base model folder
    out: Path | None = None  # full export: the bundle to write
    bundle: Path | None = None  # concept-only export: the bundle to add to
    name: str | None = None  # concept name in the bundle [default: the concept file's stem]
    precision: str = "fp32"  # fp32 | fp16 (ONNX graphs; TensorRT plans are always built with FP16)
    target: str = "onnx"  # comma-separated TARGETS or "all": onnx graphs, TensorRT plans, torch fp16 weights
    force: bool = False
    reference_image: Path | None = None
    image_encoder: Path | None = None
    opset: int = 17
    external_data: str = "auto"  # auto | always | never
    timing_cache: Path | None = None
    optimize: str = "auto"  # auto: onnxruntime graph optimisation for the CPU provider (export/optimize.py) | none
    int8: str | None = None  # an INT8_MODES mode: the shipped UNet graph is int8 (fp32 bundles, ONNX target)
    int8_vae: bool = False  # the shipped VAE decoder graph is int8 (static, calibrated; fp32 bundles, ONNX target)

    @property
    def concept_name(self) -> str:
        name = self.name if self.name is not None else Path(self.concept).stem
        if not _NAME.match(name):
            raise UserError(f"concept name {name!r} must be letters, digits, '.', '_' or '-' (use --name)")
        return name


def tool_versions(extra: dict | None = None) -> dict:
    out = {"python": platform.python_version()}
    for dist in ("personamagic-runtime", "torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {**out, **(extra or {})}


def _load_concept_and_reference(cfg: ExportConfig, model_dir: Path | None, log: Log):
    from pm_runtime.modeling.loading import find_image_encoder
    from pm_runtime.train.concept_file import load_concept

    from .bake import concept_reference, embed_reference_photo

    try:
        concept = load_concept(Path(cfg.concept))
    except UserError:
        raise
    except Exception as e:  # torch's weights-only unpickler raises e.g. KeyError on junk; nothing ran
        raise UserError(f"{cfg.concept} is not a concept file (unreadable: {type(e).__name__})") from None
    if cfg.reference_image is None:
        if cfg.image_encoder is not None:
            raise UserError("--image-encoder is only used with --reference-image")
        return concept, concept_reference(concept)
    if model_dir is None and cfg.image_encoder is None:
        raise UserError("--reference-image needs --image-encoder DIR (the CLIP model the concept was trained with)")
    enc = find_image_encoder(model_dir, cfg.image_encoder) if model_dir else Path(cfg.image_encoder)
    ref = embed_reference_photo(concept, Path(cfg.reference_image), enc, lambda m: log(f"warning: {m}"))
    log(f"  re-baking B with {ref.name} (sha256 {ref.sha256[:12]}...)")
    return concept, ref


def _bake(cfg: ExportConfig, concept, reference, dest: Path) -> dict:
    from .bake import bake_table

    table = bake_table(concept, reference, source_sha256=sha256_file(Path(cfg.concept)))
    save_table(table, dest)
    return {F.QK_NAME: cfg.concept_name, F.QK_CONCEPT_WORD: table.concept_word,
            F.QK_STAGE: [table.stage_lo, table.stage_hi], F.QK_NUM_TOKENS: table.num_tokens}


def _check_out(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise UserError(f"{out} exists; use --force to replace it")
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; refusing to replace it")
    if any(out.iterdir()) and not (out / F.BUNDLE_MANIFEST).is_file():
        raise UserError(f"{out} is a non-empty folder that is not a bundle; refusing to replace it even with --force")


def _swap_into_place(tmp: Path, out: Path, log: Log | None = None) -> None:
    """Rename the finished bundle `tmp` to `out`; an existing bundle there is moved aside first and
    deleted after. The old bundle's edit lock is held across the two renames, so a concept edit
    (pm-export --bundle, pm-bundle remove-concept) in progress finishes first, and one waiting goes on
    in the new bundle (manifest_lock)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    with manifest_lock(out, log):
        os.replace(out, old / "bundle")
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / "bundle", out)  # the old bundle back in its place
            shutil.rmtree(old, ignore_errors=True)
            raise
    shutil.rmtree(old, ignore_errors=True)


def export_bundle(cfg: ExportConfig, log: Log = print) -> Path:
    """The full export. Returns the bundle folder."""
    from pm_runtime.modeling.loading import check_sd_layout, load_base_model

    targets = parse_targets(cfg.target)
    if cfg.precision not in ("fp32", "fp16"):
        raise UserError("--precision must be fp32 or fp16")
    if cfg.optimize not in ("auto", "none"):
        raise UserError("--optimize must be auto or none")
    if cfg.int8 is not None:
        if cfg.int8 not in INT8_MODES:
            raise UserError(f"--int8 must be one of {', '.join(INT8_MODES)}")
        if cfg.precision != "fp32" or "onnx" not in targets:
            raise UserError("--int8 quantizes the fp32 ONNX UNet: use it with --precision fp32 and an onnx target")
    if cfg.int8_vae and (cfg.precision != "fp32" or "onnx" not in targets):
        raise UserError("--int8-vae quantizes the fp32 ONNX VAE decoder: use it with --precision fp32 and an onnx "
                        "target")
    out = Path(cfg.out).absolute()
    _check_out(out, cfg.force)
    name = cfg.concept_name
    builder = None
    if "tensorrt" in targets:
        from .tensorrt_build import PlanBuilder

        builder = PlanBuilder(cfg.timing_cache, log=log)  # install hint / no-GPU error before any work
    model_dir = Path(cfg.model)
    check_sd_layout(model_dir)
    steps = 6
    t0 = time.perf_counter()
    log(f"[1/{steps}] loading {cfg.concept} and the base model {model_dir}")
    concept, reference = _load_concept_and_reference(cfg, model_dir, log)
    base = load_base_model(model_dir, with_safety_checker=True)
    if concept.fingerprint != base.fingerprint:
        raise UserError(f"{cfg.concept} was trained on a different base model than {model_dir} (fingerprint mismatch)")
    from pm_runtime.modeling.graphs import graph_modules, model_dims

    dims = model_dims(base)
    facts = {F.BK_FINGERPRINT: base.fingerprint, F.BK_BASE_MODEL: _base_info(cfg, base, dims),
             F.BK_SCHEDULER: dict(base.scheduler_config)}
    modules = graph_modules(base)
    checker_settings = base.checker_settings
    del base  # from here the modules hold the networks; each is freed once exported
    _warn_disk_space(out, estimated_bundle_bytes(modules, cfg, targets), log)
    if cfg.int8 in STATIC_INT8 or cfg.int8_vae:
        _warn_static_int8_memory(modules[UNET] if cfg.int8 in STATIC_INT8 else None,
                                 modules[VAE_DECODER] if cfg.int8_vae else None, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        concepts_dir = tmp / F.BUNDLE_CONCEPTS_DIR
        table_rel = f"{F.BUNDLE_CONCEPTS_DIR}/{name}{F.TABLE_SUFFIX}"
        log(f"[2/{steps}] baking the concept table {table_rel}")
        concepts_dir.mkdir()
        entry = _bake(cfg, concept, reference, tmp / table_rel)
        concept_entries = [{**entry, **file_entry(tmp, table_rel)}]
        specs = network_specs(dims)
        components = _torch_weights(modules, specs, tmp, log, checker_settings) if "torch" in targets else []
        trt_details = {}
        if targets & {"onnx", "tensorrt"}:
            onnx_components, trt_details = _export_networks(cfg, modules, specs, tmp, steps, builder, log,
                                                            checker_settings)
            components += onnx_components
        log(f"[{steps}/{steps}] writing the tokenizer and {F.BUNDLE_MANIFEST}")
        tok_files = _copy_tokenizer(model_dir, tmp)
        manifest = _manifest(facts, components, tok_files, concept_entries, trt_details)
        write_manifest(tmp, manifest)  # last: a folder without bundle.json is not a bundle
        if cfg.int8 in STATIC_INT8 or cfg.int8_vae:  # calibrated on the complete bundle (still in tmp), swapped in
            write_manifest(tmp, _calibrated_int8(cfg, tmp, model_dir, manifest, specs, log))
        _share(tmp)
        _swap_into_place(tmp, out, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_gib():.2f} GiB")
    return out


def peak_rss_gib() -> float:
    from pm_runtime.resources import peak_rss_bytes

    return (peak_rss_bytes() or 0) / 2**30


def _share(root: Path) -> None:
    """mkdtemp makes 0700 and onnx writes external data 0600; a bundle is shared data."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _export_networks(cfg: ExportConfig, modules: dict, specs: dict, tmp: Path, steps: int, builder, log: Log,
                     checker_settings: dict | None = None):
    """ONNX (and TensorRT) files for every network, validated; returns manifest component entries.
    The optional networks (when `modules` has them: the VAE encoder, the safety checker) ship as fp32
    ONNX, unoptimised (the checker's preprocessing settings in its details), and an fp32 plan.

    `modules` is emptied as it goes: each PyTorch network is released after its export (peak RAM)."""
    from . import fp16
    from .onnx_export import export_network, save_onnx
    from .optimize import not_optimized, optimize_graph, passes_for
    from .validate import validate

    work = tmp / ".work"  # fp32 graphs that do not ship (fp16 bundles, TensorRT-only bundles)
    work.mkdir()
    ship_onnx = "onnx" in parse_targets(cfg.target)
    components, trt_details = [], {}
    for i, net in enumerate([*NETWORKS, *(n for n in OPTIONAL_NETWORKS if n in modules)]):
        spec, module = specs[net], modules.pop(net)
        t0 = time.perf_counter()
        if net in OPTIONAL_NETWORKS:  # fp32 ONNX (shipped or in work/) and an fp32 plan
            root = tmp if ship_onnx else work
            comp = _optional_onnx(cfg, net, module, spec, root, log, checker_settings)
            if ship_onnx:
                components.append(comp)
            if builder is not None:
                components.append(_plan(builder, root / comp[F.CK_FILE], spec, tmp, fp16=False,
                                        details=comp[F.CK_DETAILS])[0])
            del module
            continue
        fp32_in_bundle = ship_onnx and cfg.precision == "fp32"
        fp32_path = (tmp if fp32_in_bundle else work) / f"{net}.onnx"
        # Graph optimisation (export/optimize.py) only for shipped ONNX; TensorRT parses standard ONNX
        # only, so it is built from the plain graph, which is then kept (and validated) beside.
        passes = passes_for(net, "cpu", cfg.precision) if ship_onnx and cfg.optimize == "auto" else ()
        plain_path = work / f"{net}.plain.onnx" if passes else fp32_path
        log(f"[{i + 3}/{steps}] {net}: exporting ONNX (opset {cfg.opset})")
        files = export_network(module, spec, plain_path, opset=cfg.opset, external_data=cfg.external_data)
        details: dict = {"opset": cfg.opset}
        if passes:
            if builder is not None:
                validate(module, spec, plain_path, "fp32", log)
            try:
                with noticing_interrupts() as interrupted:
                    res = optimize_graph(plain_path, fp32_path, net, provider="cpu", precision=cfg.precision,
                                         external_data=cfg.external_data)
                fused = ", ".join(f"{k} {v}" for k, v in res.fused.items()) or "nothing"
                log(f"  onnxruntime graph optimisation (CPU: {', '.join(passes)}): fused {fused}; "
                    f"{res.nodes_before} -> {res.nodes_after} nodes in {res.seconds:.1f} s")
                details["graph_optimization"] = res.to_dict()
            except Exception as e:  # onnxruntime's fusion code on a graph it does not expect: ship it plain
                if interrupted or caused_by_interrupt(e):  # Ctrl-C inside a C extension's import comes back
                    raise KeyboardInterrupt from e            # as an ImportError, chained or not
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log(f"warning: onnxruntime graph optimisation of {net} failed ({why}); shipping it as exported")
                res = optimize_graph(plain_path, fp32_path, net, external_data=cfg.external_data, passes=())
                details["graph_optimization"] = {**not_optimized(net, "cpu", cfg.precision, cfg.optimize),
                                                 "reason": f"optimiser failed: {why}"}
            files = res.files
            if builder is None:
                _unlink_onnx(plain_path)  # disk: the plain graph is no longer needed
        else:
            details["graph_optimization"] = not_optimized(net, "cpu", cfg.precision, cfg.optimize, ship_onnx)
        checks = validate(module, spec, fp32_path, "fp32", log)  # the graph that ships (optimised or not)
        # the plan from the plain fp32 graph, before the int8 graph replaces fp32_path (the same file
        # where nothing was optimised: TensorRT would parse the int8 graph's onnxruntime-only ops)
        plan = _plan(builder, plain_path, spec, tmp, fp16=True) if builder is not None else None
        if net == UNET and cfg.int8 and cfg.int8 not in STATIC_INT8:  # static: after the bundle is complete
            files, int8_checks, details["int8"] = _int8_unet(cfg, lambda m=module: m, spec, fp32_path, work, log)
            checks += int8_checks
        if ship_onnx and cfg.precision == "fp16":
            half, kept = fp16.to_fp16(fp32_path)
            details["fp32_timestep_path_nodes"] = len(kept)
            files = save_onnx(half, tmp / f"{net}.onnx", cfg.external_data)
            details["fp32_ops"] = fp16.fp32_op_counts(half)
            details["fp32_op_types"] = fp16.block_list_description()
            del half
            checks += validate(module, spec, tmp / f"{net}.onnx", "fp16", log)
        if ship_onnx:
            precision = "int8" if net == UNET and cfg.int8 else cfg.precision
            components.append(_component(tmp, net, net, "onnx", files, precision, spec, checks, details))
        if plan is not None:
            comp, trt = plan
            components.append(comp)
            trt_details = {k: trt[k] for k in ("tensorrt_version", "gpu", "compute_capability")}
        del module
        gc.collect()
        for p in work.iterdir():  # fp32 graphs that do not ship: done with (disk space)
            p.unlink()
        log(f"  {net} done in {time.perf_counter() - t0:.1f} s (peak RSS so far {peak_rss_gib():.2f} GiB)")
    if ship_onnx or builder is not None:  # the loop's guidance + scheduler update: GPU loops stay on the device
        from .step_graph import validate_step_graph, write_step_graph

        log(f"  {STEP}: the guidance + scheduler update graph (fp32, export/step_graph.py)")
        step_onnx = write_step_graph(specs[STEP], (tmp if ship_onnx else work) / "step.onnx")
        checks = validate_step_graph(specs[STEP], step_onnx, log)
        details = {"graph": "export/step_graph.py"}
        if ship_onnx:
            components.append(_component(tmp, STEP, STEP, "onnx", [step_onnx], "fp32", specs[STEP], checks, details))
        if builder is not None:
            components.append(_plan(builder, step_onnx, specs[STEP], tmp, fp16=False, details=details)[0])
    shutil.rmtree(work)
    return components, trt_details


def _plan(builder, onnx_path: Path, spec, tmp: Path, fp16: bool, details: dict | None = None) -> tuple[dict, dict]:
    """TensorRT plan `<network>.plan` in the bundle folder `tmp` from `onnx_path`: (component entry,
    build facts). Plans carry no validation entries (they are built on the GPU, not checked here)."""
    path = tmp / f"{spec.name}.plan"
    trt = builder.build(onnx_path, spec, path, fp16=fp16)
    comp = _component(tmp, path.name, spec.name, "tensorrt", [path], "fp16" if fp16 else "fp32", spec, [],
                      {**trt, **(details or {})})
    return comp, trt


def _int8_unet(cfg: ExportConfig, load_module: Callable, spec, fp32_path: Path, work: Path, log: Log, calibration=None,
               holdout=None):
    """Replace the shipped fp32 UNet graph by its int8 version (export/quantize.py), validated
    against PyTorch with the int8 tolerance (on random inputs, or on the `holdout` feeds for the
    calibrated modes). `load_module()` gives the PyTorch UNet; it is called after the quantization,
    so the two need not share the memory. Returns (files, checks, facts)."""
    from .quantize import quantize_unet_int8
    from .validate import validate

    staged = work / "int8" / fp32_path.name  # same file name: an external data file keeps its location
    # per-output-channel weights: same speed, less drift (benchmarks/results/int8-cpu.jsonl); static:
    # percentile activation ranges (less drift than min..max at the same speed, same records)
    static = cfg.int8 in STATIC_INT8
    facts = quantize_unet_int8(fp32_path, staged, mode=cfg.int8, external_data=cfg.external_data,
                               per_channel=cfg.int8 in ("dynamic-matmul", *STATIC_INT8),
                               calibration=calibration, calibrate="percentile" if static else "minmax")
    checks = validate(load_module(), spec, staged, "int8-static" if static else "int8", log, feeds=holdout)
    files = _swap_staged(staged, fp32_path)
    log(f"  int8 UNet ({cfg.int8}): {facts.get('quantized_nodes', '?')} nodes quantized, "
        f"{facts.get('bytes_before', 0) / 2**20:.1f} -> {facts.get('bytes_after', 0) / 2**20:.1f} MiB")
    return files, checks, facts


def _swap_staged(staged: Path, fp32_path: Path) -> list[Path]:
    """The int8 graph (and its external data file) in `staged`'s folder replaces the fp32 one under
    its usual name; returns the shipped files, graph first."""
    _unlink_onnx(fp32_path)
    files = [fp32_path]
    data = staged.with_name(staged.name + ".data")
    if data.is_file():
        os.replace(data, fp32_path.with_name(data.name))
        files.append(fp32_path.with_name(data.name))
    os.replace(staged, fp32_path)
    staged.parent.rmdir()
    return files


# pm-export --int8 static-qdq's whole-export peak RSS per byte of fp32 UNet weights: 11.55 GiB
# (12.4 GB) for the SD-1.5-shaped UNet's 3.44 GB (benchmarks/results/export-cpu.jsonl, VmHWM).
STATIC_INT8_PEAK_PER_UNET_BYTE = 3.6
# --int8-vae: the VAE quantizer's peak RSS per byte of fp32 decoder weights, calibrating at CALIBRATION_SIZE
# (the calibrator holds every intermediate activation): 6.1 GB for the SD-1.5-shaped decoder's 0.198 GB
# (one-off /usr/bin/time of onnxruntime's quantize_static on two 256 px latents, not a record).
STATIC_INT8_VAE_PEAK_PER_BYTE = 31.0


def _return_freed_memory() -> None:
    """glibc keeps freed heap pages mapped; give them back (measured before the static int8 step of
    an SD-1.5-shaped export: RSS 3.04 -> 0.78 GiB). No-op where malloc_trim does not exist."""
    import ctypes
    import ctypes.util

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def estimated_bundle_bytes(modules: dict, cfg: ExportConfig, targets: set[str]) -> int:
    """About how many bytes the export writes beside --out: each network's parameters at the precision of
    each target (ONNX: --precision, int8 where quantized, the optional networks fp32; torch weights fp16;
    TensorRT plans fp16, the optional networks' fp32), plus the fp32 UNet graph an int8 UNet is quantized
    from."""
    total = 0
    for name, module in modules.items():
        if name == VAE_DECODER:  # the graph holds the whole VAE; only its decoder is exported
            parts = [module.vae.decoder, getattr(module.vae, "post_quant_conv", None)]
        else:
            parts = [module]
        n = sum(p.numel() for m in parts if m is not None for p in m.parameters())
        optional = name in OPTIONAL_NETWORKS
        if "onnx" in targets:
            b = 4 if cfg.precision == "fp32" or optional else 2
            if (name == UNET and cfg.int8) or (name == VAE_DECODER and cfg.int8_vae):
                total += n * 4  # the fp32 graph, until its int8 version replaces it
                b = 1
            total += n * b
        total += n * 2 * ("torch" in targets) + n * (4 if optional else 2) * ("tensorrt" in targets)
    return total


def _warn_disk_space(out: Path, need: int, log: Log) -> None:
    """A warning before minutes of work when the bundle will likely not fit (a full disk later is a clean
    error that leaves nothing behind, but only after that work)."""
    where = out.parent
    while not where.exists() and where != where.parent:  # --out's folder may not exist yet
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if free < need:
        size = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"  # noqa: E731
        log(f"warning: {size(free)} free in {where}; this export writes about {size(need)} there "
            "(if the disk fills, it stops and leaves nothing behind)")


def _warn_static_int8_memory(unet_module, vae_module, log: Log) -> None:
    """A warning before minutes of work when the calibrated int8 steps (run one after the other:
    the larger need counts) will likely not fit."""
    def weight_bytes(m):
        return sum(p.numel() * 4 for p in m.parameters()) if m is not None else 0

    need = max(STATIC_INT8_PEAK_PER_UNET_BYTE * weight_bytes(unet_module),
               STATIC_INT8_VAE_PEAK_PER_BYTE * weight_bytes(vae_module))
    have = available_memory_bytes()
    if have is not None and have < need:
        what = " and ".join(w for w, m in (("--int8 static-qdq", unet_module), ("--int8-vae", vae_module))
                            if m is not None)
        log(f"warning: the calibration and quantization of {what} need about {need / 1e9:.1f} GB of memory "
            f"for this model; {have / 1e9:.1f} GB is available now")


def _calibrated_int8(cfg: ExportConfig, root: Path, model_dir: Path, manifest: dict, specs: dict, log: Log) -> dict:
    """The calibrated int8 steps: record feeds from the complete fp32 bundle in `root` (its own
    onnxruntime pipeline, the bundle's concept in the prompts), then
    - --int8 static-qdq: quantize the UNet with the first prompts' feeds, validate it against the
      PyTorch UNet (reloaded from `model_dir`) on the last prompt's;
    - --int8-vae: quantize the VAE decoder with the first prompts' finished latents, validate its
      image (PSNR) against the PyTorch decoder on the last prompt's;
    each swapped in under its usual file name. Returns the manifest with the components updated."""
    from pm_runtime.modeling.loading import load_base_model

    from .quantize import record_calibration

    word = manifest[F.BK_CONCEPTS][0][F.QK_CONCEPT_WORD]
    prompts = [p.format(word=word) for p in CALIBRATION_PROMPTS]
    what = " and ".join(w for w, on in (("UNet", cfg.int8 in STATIC_INT8), ("VAE decoder", cfg.int8_vae)) if on)
    log(f"  int8 ({what}): recording calibration feeds ({len(prompts)} prompts x {CALIBRATION_STEPS} fp32 "
        f"steps at {CALIBRATION_SIZE} px)")
    t0 = time.perf_counter()
    vae_feeds: list[dict] | None = [] if cfg.int8_vae else None
    from tqdm import tqdm

    with tqdm(total=len(prompts) * CALIBRATION_STEPS, desc="  calibration", unit="step", file=sys.stderr,
              disable=None, leave=False) as bar:
        feeds = record_calibration(root, prompts=prompts, steps=CALIBRATION_STEPS, resolution=CALIBRATION_SIZE,
                                   vae_feeds=vae_feeds, callback=lambda done, total: bar.update(done - bar.n))
    record_s = time.perf_counter() - t0
    about = dict(calibration_prompts=prompts[:-1], validation_prompt=prompts[-1], calibration_steps=CALIBRATION_STEPS,
                 calibration_size=CALIBRATION_SIZE, record_s=round(record_s, 1))
    work = root / ".work"
    work.mkdir()
    try:
        if cfg.int8 in STATIC_INT8:
            per = len(feeds) // len(prompts)
            calibration, rest = feeds[:-per], feeds[-per:]
            holdout = [rest[0], rest[len(rest) // 2], rest[-1]][:VALIDATION_FEEDS]
            del feeds
            _return_freed_memory()  # the fp32 export's freed heap: the quantizer is the peak of this step

            def load_unet():  # after the quantization (peak memory): the PyTorch UNet the int8 graph is checked against
                from pm_runtime.modeling.attention import install_split_kv
                from pm_runtime.modeling.graphs import UNetGraph

                base = load_base_model(model_dir, with_vae=False)
                install_split_kv(base.unet)
                return UNetGraph(base.unet).eval()

            comp = _onnx_component(manifest, UNET)
            files, checks, facts = _int8_unet(cfg, load_unet, specs[UNET], root / comp[F.CK_FILE], work, log,
                                              calibration=calibration, holdout=holdout)
            _int8_into_manifest(root, comp, files, checks, {**facts, **about})
            del calibration, holdout, load_unet
        if cfg.int8_vae:
            _return_freed_memory()
            comp = _onnx_component(manifest, VAE_DECODER)
            files, checks, facts = _int8_vae(cfg, model_dir, specs[VAE_DECODER], root / comp[F.CK_FILE], work, log,
                                             calibration=vae_feeds[:-1], holdout=vae_feeds[-1:])
            _int8_into_manifest(root, comp, files, checks, {**facts, **about})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _onnx_component(manifest: dict, network: str) -> dict:
    return next(c for c in manifest[F.BK_COMPONENTS] if c[F.CK_NETWORK] == network and c[F.CK_FORMAT] == "onnx")


def _int8_into_manifest(root: Path, comp: dict, files: list[Path], checks, facts: dict) -> None:
    comp.update({**file_entry(root, files[0].relative_to(root).as_posix()),
                 F.CK_DATA_FILES: [file_entry(root, p.relative_to(root).as_posix()) for p in files[1:]],
                 F.CK_PRECISION: "int8",
                 F.CK_VALIDATION: comp[F.CK_VALIDATION] + [c.to_dict() for c in checks],
                 F.CK_DETAILS: {**comp[F.CK_DETAILS], "int8": facts}})


def _int8_vae(cfg: ExportConfig, model_dir: Path, spec, fp32_path: Path, work: Path, log: Log, calibration: list,
              holdout: list):
    """Replace the shipped fp32 VAE decoder graph by its int8 version (quantize_vae_int8), its image
    validated against the PyTorch decoder (reloaded from `model_dir` after the quantization) on the
    `holdout` latents (PSNR_MIN["int8-vae"]). Returns (files, checks, facts)."""
    from pm_runtime.modeling.graphs import VaeDecoderGraph
    from pm_runtime.modeling.loading import load_base_model

    from .quantize import quantize_vae_int8
    from .validate import validate

    staged = work / "int8-vae" / fp32_path.name
    facts = quantize_vae_int8(fp32_path, staged, calibration=calibration, external_data=cfg.external_data)
    base = load_base_model(model_dir, with_unet=False)
    checks = validate(VaeDecoderGraph(base.vae).eval(), spec, staged, "int8-vae", log, feeds=holdout)
    del base
    files = _swap_staged(staged, fp32_path)
    log(f"  int8 VAE decoder: {facts.get('quantized_nodes', '?')} convolutions quantized, "
        f"{facts.get('bytes_before', 0) / 2**20:.1f} -> {facts.get('bytes_after', 0) / 2**20:.1f} MiB")
    return files, checks, facts


def _optional_onnx(cfg: ExportConfig, net: str, module, spec, root: Path, log: Log,
                   checker_settings: dict | None) -> dict:
    """An optional network (the VAE encoder, the safety checker): fp32 ONNX written into `root`,
    validated; its component entry (optional; the checker's with the preprocessing settings the runtime
    applies)."""
    from .onnx_export import export_network
    from .validate import validate

    log(f"  {net} (optional): exporting ONNX (fp32, opset {cfg.opset})")
    files = export_network(module, spec, root / f"{net}.onnx", opset=cfg.opset, external_data=cfg.external_data)
    checks = validate(module, spec, root / f"{net}.onnx", "fp32", log)
    details = {"opset": cfg.opset, "optional": True}
    if net == SAFETY_CHECKER:
        details["preprocess"] = checker_settings or {}
    return _component(root, net, net, "onnx", files, "fp32", spec, checks, details)


def _torch_weights(modules: dict, specs: dict, tmp: Path, log: Log, checker_settings: dict | None = None) -> list[dict]:
    """The fp16 PyTorch weights of every network (the torch-cuda backend's input), as components."""
    from pm_runtime.modeling.bundle_weights import FORMAT, save_weights

    folder = tmp / "torch"
    folder.mkdir()
    out = []
    for net in [*NETWORKS, *(n for n in OPTIONAL_NETWORKS if n in modules)]:
        path = folder / f"{net}.fp16.safetensors"
        details = save_weights(net, modules[net], path, "fp16")
        if net in OPTIONAL_NETWORKS:
            details = {**details, "optional": True}
        if net == SAFETY_CHECKER:
            details["preprocess"] = checker_settings or {}
        log(f"  torch weights: {path.relative_to(tmp).as_posix()} ({path.stat().st_size / 2**20:.1f} MiB, fp16)")
        out.append(_component(tmp, f"{net}.torch", net, FORMAT, [path], "fp16", specs[net], [], details))
    return out


def _unlink_onnx(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def _component(root: Path, name: str, net: str, fmt: str, files: list[Path], precision: str, spec, checks,
               details: dict) -> dict:
    rel = [p.relative_to(root).as_posix() for p in files]
    spec_d = spec.to_dict()
    return {F.CK_NAME: name, F.CK_NETWORK: net, F.CK_FORMAT: fmt, **file_entry(root, rel[0]),
            F.CK_DATA_FILES: [file_entry(root, r) for r in rel[1:]], F.CK_PRECISION: precision,
            F.CK_INPUTS: spec_d["inputs"], F.CK_OUTPUTS: spec_d["outputs"], F.CK_AXES: spec_d["axes"],
            F.CK_DERIVED_AXES: spec_d["derived_axes"], F.CK_VALIDATION: [c.to_dict() for c in checks],
            F.CK_DETAILS: details}


TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json",
                   "added_tokens.json")


def _copy_tokenizer(model_dir: Path, root: Path) -> list[dict]:
    src, dst = model_dir / "tokenizer", root / F.BUNDLE_TOKENIZER_DIR
    dst.mkdir()
    entries = []
    for fname in TOKENIZER_FILES:
        if (src / fname).is_file():
            shutil.copyfile(src / fname, dst / fname)
            entries.append(file_entry(root, f"{F.BUNDLE_TOKENIZER_DIR}/{fname}"))
    if not any(e[F.FK_FILE].endswith(("vocab.json", "tokenizer.json")) for e in entries):
        raise UserError(f"{src} holds no tokenizer vocabulary (vocab.json / tokenizer.json)")
    return entries


def _base_info(cfg: ExportConfig, base, dims) -> dict:
    from pm_runtime.modeling.loading import has_safety_checker

    has_checker = has_safety_checker(Path(cfg.model))
    return {**dims.to_dict(), F.BM_PREDICTION_TYPE: base.prediction_type,
            F.BM_VAE_SCALING_FACTOR: float(base.vae.config.scaling_factor),
            F.BM_VAE_DECODER_APPLIES_SCALING: True, F.BM_MODEL_FOLDER: Path(cfg.model).absolute().name,
            F.BM_SAFETY_CHECKER: "exported" if has_checker else "none in the model folder"}


def _manifest(facts: dict, components, tok_files, concepts, trt_details) -> dict:
    return {
        F.BK_FORMAT: F.BUNDLE_FORMAT, F.BK_VERSION: F.BUNDLE_VERSION,
        F.BK_CREATED: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        F.BK_FINGERPRINT: facts[F.BK_FINGERPRINT], F.BK_BASE_MODEL: facts[F.BK_BASE_MODEL],
        F.BK_COMPONENTS: components, F.BK_SCHEDULER: facts[F.BK_SCHEDULER],
        F.BK_TOKENIZER: {F.BK_TOKENIZER_FILES: tok_files}, F.BK_CONCEPTS: concepts,
        F.BK_TOOLS: tool_versions(trt_details),
    }


def add_concept(cfg: ExportConfig, log: Log = print) -> Path:
    """Concept-only export: bake a table into an existing bundle; the networks are not touched."""
    t0 = time.perf_counter()
    with editing_bundle(Path(cfg.bundle), log) as bundle:  # read, bake, rewrite: no other edit in between
        return _add_concept(cfg, bundle, log, t0)


def _add_concept(cfg: ExportConfig, bundle, log: Log, t0: float) -> Path:
    name = cfg.concept_name
    others = [c for c in bundle.concepts if c[F.QK_NAME] != name]
    if len(others) != len(bundle.concepts) and not cfg.force:
        raise UserError(f"the bundle already has a concept named {name!r}; use --name or --force")
    log(f"[1/2] loading {cfg.concept}")
    concept, reference = _load_concept_and_reference(cfg, None, log)
    if concept.fingerprint != bundle.fingerprint:
        raise UserError(f"{cfg.concept} was trained on a different base model than the bundle {cfg.bundle} "
                        "(fingerprint mismatch)")
    if concept.mapper.config.dim != bundle.dims.text_dim:
        raise UserError(f"{cfg.concept} has {concept.mapper.config.dim}-wide tokens; the bundle's text encoder "
                        f"is {bundle.dims.text_dim}-wide")
    rel = f"{F.BUNDLE_CONCEPTS_DIR}/{name}{F.TABLE_SUFFIX}"
    log(f"[2/2] baking {rel} into {cfg.bundle}")
    entry = _bake(cfg, concept, reference, bundle.root / rel)
    manifest = dict(bundle.manifest)
    manifest[F.BK_CONCEPTS] = others + [{**entry, **file_entry(bundle.root, rel)}]
    write_manifest(bundle.root, manifest)
    log(f"added concept {name!r} to {cfg.bundle} in {time.perf_counter() - t0:.1f} s")
    # int8 graphs with fixed activation ranges (--int8 static-qdq, --int8-vae) were calibrated on fp32 runs
    # of the concept the bundle was exported with: their facts count the calibration feeds
    calibrated = [f"{c[F.CK_NETWORK]} ({c[F.CK_DETAILS]['int8'].get('mode', 'int8')})" for c in bundle.components
                  if c[F.CK_FORMAT] == "onnx" and c[F.CK_DETAILS].get("int8", {}).get("calibration_feeds")]
    if calibrated:
        log(f"warning: the bundle's int8 {' and '.join(calibrated)} {'was' if len(calibrated) == 1 else 'were'} "
            f"calibrated on the concept it was exported with, not on {name!r}; the images may drift more from "
            "fp32 (re-export with this concept to calibrate)")
    return bundle.root / rel
