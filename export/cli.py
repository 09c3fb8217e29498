"""`pm-export`: a concept and a model folder -> a validated bundle; or a concept -> a table in a bundle."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import click

from pm_runtime.errors import UserError

HELP = """Bake CONCEPT.pt into a table and export the networks into a bundle folder.

\b
Full export (networks + tokenizer + the concept table):
  pm-export alice.pt --model SD_FOLDER --out BUNDLE [--precision fp16]
Concept-only export (adds a table to an existing bundle in seconds; networks untouched):
  pm-export bob.pt --bundle BUNDLE

Every exported network is run under onnxruntime (CPU) against PyTorch on fresh random inputs;
the differences are printed and recorded in bundle.json, and a difference over tolerance fails
the export. The shipped graphs are optimised for onnxruntime's CPU provider (fused attention,
SkipLayerNorm, Gelu; --optimize none keeps them as exported) and validated AFTER optimisation.
The bundle is written to a hidden temporary folder and renamed at the end, so a
failed export leaves no bundle behind. One set of networks serves every concept of the same
base model. --precision fp16 keeps a fixed list of overflow-prone ops in fp32 (export/fp16.py);
overflow with real weights is not verified by this check (CPU onnxruntime computes in fp32).
When the model folder has safety_checker/ (real SD folders do), it is exported too: fp32 ONNX
(and torch weights with --target torch), validated, an optional component that pm-run runs by
default. The VAE's encoder half is exported the same way (fp32, validated): img2img's encoder
(pm-run --init-image).
--target takes a comma-separated list: onnx (the graphs, default), tensorrt (plans; needs
TensorRT >= 10 and the GPU that will run them), torch (the fp16 PyTorch weights that pm-run's
torch-cuda backend runs: seconds to write, no ONNX export), or all. E.g. --target onnx,torch.
"""


def _log(msg: str) -> None:
    click.echo(msg, err=msg.startswith("warning:"))


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("concept", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Local Stable Diffusion 1.x/2.x folder (diffusers layout) the concept was trained on "
                   "[default: the folder pm-train recorded in CONCEPT, found from here or from CONCEPT's folder; "
                   "its fingerprint must match].")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Bundle folder to write.")
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help="Concept-only export: add CONCEPT's table to this existing bundle.")
@click.option("--name", default=None, help="Concept name in the bundle [default: CONCEPT's file stem].")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of the ONNX graphs (inputs/outputs stay float32).")
@click.option("--target", default="onnx", show_default=True, metavar="LIST",
              help="What to build, comma-separated: onnx, tensorrt, torch (fp16 weights for --backend torch-cuda), "
                   "or all.")
@click.option("--force", is_flag=True, help="Replace an existing OUT bundle (or a concept of the same name).")
@click.option("--reference-image", type=click.Path(path_type=Path), default=None,
              help="Re-bake B with this photo instead of the concept's reference photo (no retraining).")
@click.option("--image-encoder", type=click.Path(path_type=Path), default=None,
              help="CLIP image encoder folder for --reference-image [default: MODEL/image_encoder].")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 20), help="ONNX opset.")
@click.option("--external-data", type=click.Choice(["auto", "always", "never"]), default="auto",
              show_default=True, help="ONNX external data files: auto = only for graphs over 2 GB.")
@click.option("--optimize", type=click.Choice(["auto", "none"]), default="auto", show_default=True,
              help="onnxruntime graph optimisation of the shipped ONNX graphs: auto = the fusions measured to "
                   "help on the CPU provider (export/optimize.py), recorded in bundle.json; none = as exported.")
@click.option("--int8", type=click.Choice(["dynamic-matmul", "nbits8", "weight-only-qdq", "static-qdq"]),
              default=None,
              help="Ship the UNet as an int8 graph (fp32 bundles): dynamic-matmul (int8 MatMuls, activations "
                   "quantized per call), nbits8 (MatMulNBits, 8-bit weights), weight-only-qdq (int8 weights, fp32 "
                   "compute, ~4x smaller), static-qdq (int8 Conv and MatMul with fixed activation ranges "
                   "calibrated on a few fp32 denoising runs of the finished bundle with its concept; the fastest "
                   "on CPUs and the most drift; ~12 GB of RAM for SD 1.5; a concept added later with --bundle "
                   "was not calibrated for). "
                   "Validated with a looser tolerance (static-qdq on held-out recorded inputs); speed, memory and "
                   "image drift of each mode on a 2-core CPU: benchmarks/results/int8-cpu.jsonl.")
@click.option("--int8-vae", is_flag=True,
              help="Ship the VAE decoder as an int8 graph too (fp32 bundles; with or without --int8): int8 "
                   "convolutions with fixed activation ranges calibrated on the finished latents of a few fp32 runs "
                   "of the bundle (the first and last convolutions stay fp32), checked on a held-out latent: its "
                   "image must stay >= 30 dB PSNR from the PyTorch decoder's (a concept added later with --bundle was "
                   "not calibrated for). On a 2-core CPU the decode ran 2.0x "
                   "(256 px) to 2.4x (512 px) faster (SD-1.5-shaped random decoder, benchmarks/results/run-cpu.jsonl);"
                   " ~6 GB of RAM for SD 1.5's decoder. Drift on real weights not measured yet.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="TensorRT timing cache file to read and update (speeds up rebuilds).")
def main(concept: Path, model, out, bundle, **kw) -> None:
    from pm_export.build import ExportConfig, add_concept, export_bundle

    try:
        if bundle is not None:
            if model is not None or out is not None:
                raise UserError("--bundle (concept-only export) takes neither --model nor --out")
            if (kw["precision"] != "fp32" or kw["target"] != "onnx" or kw["optimize"] != "auto" or kw["int8"]
                    or kw["int8_vae"]):
                raise UserError("--precision, --target, --optimize, --int8 and --int8-vae apply to a full export, "
                                "not to --bundle")
            add_concept(ExportConfig(concept=concept, bundle=bundle, **_concept_only(kw)), log=_log)
        else:
            if out is None:
                raise UserError("give --model DIR --out BUNDLE (full export) or --bundle BUNDLE (concept only)")
            if model is None:  # the folder pm-train recorded; the export checks its fingerprint against the concept
                from pm_runtime.train.concept_file import trained_on

                model = trained_on(concept)
                _log(f"--model not given: {model}, the model folder {concept} was trained on")
            export_bundle(ExportConfig(concept=concept, model=model, out=out, **kw), log=_log)
    except UserError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a full disk, a folder that became unwritable: one line, not a traceback
        where = f" ({e.filename or out or bundle})"
        hint = ": free some space (the bundle is written beside --out first, then renamed)" if e.errno in (
            errno.ENOSPC, errno.EDQUOT) else ""
        raise click.ClickException(f"{e.strerror or e}{where}{hint}; the export stopped and removed its temporary "
                                   "files: nothing was written") from None
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)


def _concept_only(kw: dict) -> dict:
    keep = ("name", "force", "reference_image", "image_encoder")
    return {k: kw[k] for k in keep}


if __name__ == "__main__":
    main()
