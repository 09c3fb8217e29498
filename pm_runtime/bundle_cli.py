"""`pm-bundle`: look inside a bundle, check it, remove a concept. No torch, no onnxruntime."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import formats as F
from .bundle import (check_file, component_files, editing_bundle, inside, listed_files, open_bundle, sha256_file,
                     write_manifest)
from .errors import UserError
from .specs import VAE_ENCODER, prompt_chunks

HELP = """Inspect and manage a bundle written by pm-export.

\b
  pm-bundle info BUNDLE              what it holds: base model, networks (format, precision, size,
                                     validation), image sizes, concepts, safety checker
  pm-bundle verify BUNDLE            hash every file against bundle.json (pm-run checks only the
                                     files it loads)
  pm-bundle remove-concept BUNDLE NAME   delete a person's concept table from the bundle
"""


def _files(b) -> list[tuple[dict, str]]:
    """(file entry, description) of every file bundle.json lists: networks (with their data files),
    tokenizer, concept tables."""
    return [(e, what) for e, what, _ in listed_files(b.manifest)]


def _size(root: Path, entries) -> int:
    return sum(inside(root, e[F.FK_FILE]).stat().st_size for e, _ in entries)


def _mib(n: int) -> str:
    return (f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB" if n < 2**30 else
            f"{n / 2**30:.2f} GiB")


def _table_facts(path: Path) -> dict:
    """The super-class word and the reference photo's name from a concept table's header (the arrays are
    not read); empty where the header cannot be read (verify says why)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - a damaged table: info still lists the rest
        return {}
    return {"super_class": meta.get(F.TM_SUPER_CLASS), "reference_photo": meta.get(F.TM_REFERENCE_NAME) or None}


def describe(root: Path) -> dict:
    """The facts `pm-bundle info` prints (and --json writes)."""
    b = open_bundle(Path(root), verify=False)
    m = b.manifest
    networks = []
    for c in b.components:
        validation = c.get(F.CK_VALIDATION) or []
        rel = [v["max_rel"] for v in validation if isinstance(v.get("max_rel"), (int, float))]
        psnr = [v["psnr_db"] for v in validation if isinstance(v.get("psnr_db"), (int, float))]
        networks.append({
            "name": c[F.CK_NAME], "network": c[F.CK_NETWORK], "format": c[F.CK_FORMAT],
            "precision": c.get(F.CK_PRECISION), "bytes": _size(b.root, component_files(c)),
            "validated": (all(v.get("passed", True) for v in validation) if validation else None),
            "max_rel": max(rel) if rel else None, "min_psnr_db": min(psnr) if psnr else None,
            # a TensorRT plan runs only with its TensorRT version on its GPU model
            "built_for": ({k: details[k] for k in ("tensorrt_version", "gpu", "compute_capability") if k in details}
                          if c[F.CK_FORMAT] == "tensorrt" and isinstance(details := c.get(F.CK_DETAILS), dict)
                          else None)})
    sizes = None
    unet = [c for c in b.components if c[F.CK_NETWORK] == "unet" and "latent_height" in c.get(F.CK_AXES, {})]
    if unet:
        axis, f = unet[0][F.CK_AXES]["latent_height"], b.dims.vae_scale_factor
        sizes = {"min": axis["min"] * f, "max": axis["max"] * f, "multiple_of": axis.get("multiple_of", 1) * f}
    base = m[F.BK_BASE_MODEL]
    concepts = [{"name": q[F.QK_NAME], "concept_word": q.get(F.QK_CONCEPT_WORD), "stage": q.get(F.QK_STAGE),
                 "num_tokens": q.get(F.QK_NUM_TOKENS), "sha256": q[F.FK_SHA256][:12],
                 **_table_facts(inside(b.root, q[F.FK_FILE]))} for q in b.concepts]
    return {"bundle": str(b.root), "created": m.get(F.BK_CREATED), "version": m[F.BK_VERSION],
            "model": base.get(F.BM_MODEL_FOLDER), "prediction_type": base.get(F.BM_PREDICTION_TYPE),
            "text_dim": base.get("text_dim"), "safety_checker": base.get(F.BM_SAFETY_CHECKER),
            "img2img": sorted({c[F.CK_FORMAT] for c in b.components if c[F.CK_NETWORK] == VAE_ENCODER}),
            "fingerprint": b.fingerprint, "image_sizes": sizes, "prompt_chunks": prompt_chunks(b.dims.context_chunks),
            "networks": networks, "concepts": concepts,
            "bytes": _size(b.root, _files(b)) + (b.root / F.BUNDLE_MANIFEST).stat().st_size, "tools": m.get(F.BK_TOOLS, {})}


def _print_info(d: dict) -> None:
    echo = click.echo
    echo(f"bundle {d['bundle']}: {_mib(d['bytes'])}, written {d['created']} (format version {d['version']})")
    echo(f"base model: {d['model']} ({d['prediction_type']}, {d['text_dim']}-wide text), fingerprint "
         f"{str(d['fingerprint']).split(':')[-1][:12]}")
    if d["image_sizes"]:
        s = d["image_sizes"]
        echo(f"image sizes: {s['min']} to {s['max']} px, multiples of {s['multiple_of']}")
    chunks = d["prompt_chunks"]
    echo(f"prompts: up to {chunks} chunk{'s' if chunks > 1 else ''} of 75 tokens"
         + (" (AUTOMATIC1111's long prompts)" if chunks > 1 else " (a bundle from before pm-export 0.3)"))
    echo("networks:")
    for n in d["networks"]:
        check = ("not validated" if n["validated"] is None else "validated" if n["validated"] else "FAILED validation")
        if n["max_rel"] is not None:
            check += f", max rel {n['max_rel']:.2g}"
        if n["min_psnr_db"] is not None:
            check += f", {n['min_psnr_db']:.1f} dB"
        if n["built_for"]:
            b = n["built_for"]
            check += f"; built with TensorRT {b.get('tensorrt_version', '?')} for {b.get('gpu', '?')} (compute " \
                     f"{b.get('compute_capability', '?')})"
        echo(f"  {n['network']:<15} {n['format']:<9} {str(n['precision'] or '-'):<5} {_mib(n['bytes']):>11}  {check}")
    echo(f"safety checker: {d['safety_checker']}")
    echo("img2img (pm-run --init-image): " + (f"yes, a VAE encoder ({', '.join(d['img2img'])})" if d["img2img"] else
                                              "no VAE encoder (a bundle from before pm-export 0.5: export it again)"))
    if not d["concepts"]:
        echo("concepts: none (pm-export CONCEPT.pt --bundle BUNDLE adds one)")
    else:
        echo("concepts:")
        for q in d["concepts"]:
            lo, hi = q["stage"] or ("?", "?")
            facts = "".join(f", {label} {q[k]}" for k, label in (("super_class", "super-class"),
                                                                   ("reference_photo", "reference photo")) if q.get(k))
            echo(f"  {q['name']:<20} word {q['concept_word']}{facts}, {q['num_tokens']} tokens, stage {lo}-{hi}, "
                 f"hash {q['sha256']}")
    tools = ", ".join(f"{k} {v}" for k, v in d["tools"].items())
    if tools:
        echo(f"written with: {tools}")


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    pass


def _run(fn):
    try:
        return fn()
    except UserError as e:
        raise click.ClickException(str(e)) from None


@main.command(help="Show what a bundle holds (nothing is hashed: see verify).")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON on stdout.")
def info(bundle: Path, as_json: bool) -> None:
    d = _run(lambda: describe(bundle))
    if as_json:
        click.echo(json.dumps(d, ensure_ascii=False))
    else:
        _print_info(d)


@main.command(help="Hash every file of the bundle (networks of every format, tokenizer, concepts) against "
                   "bundle.json, reading each in full (pm-run skips files it hashed before and that are unchanged "
                   "since). Exit status 1 at the first file that is missing or modified.")
@click.argument("bundle", type=click.Path(path_type=Path))
def verify(bundle: Path) -> None:
    from tqdm import tqdm

    def work():
        b = open_bundle(Path(bundle), verify=False)
        files = _files(b)
        total = _size(b.root, files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="hashing", file=sys.stderr, disable=None,
                  leave=False) as bar:
            for entry, what in files:
                path = check_file(b.root, entry, what, verify=False)  # inside the bundle, present
                if sha256_file(path) != entry[F.FK_SHA256]:  # read in full: no "unchanged since" shortcut
                    raise UserError(f"bundle file {entry[F.FK_FILE]} ({what}) fails its checksum: modified or "
                                    "corrupted")
                bar.update(path.stat().st_size)
        return len(files), total

    n, total = _run(work)
    click.echo(f"{bundle}: all {n} files match bundle.json ({_mib(total)})")


@main.command("remove-concept", help="Remove concept NAME from the bundle: bundle.json is rewritten atomically "
                                     "without it, then its table file is deleted. The networks and other concepts "
                                     "are untouched.")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("name")
def remove_concept(bundle: Path, name: str) -> None:
    def work():
        with editing_bundle(Path(bundle), log=lambda m: click.echo(m, err=True)) as b:
            return remove(b)

    def remove(b):
        entry = b.concept(name)  # UserError naming the bundle's concepts
        table = inside(b.root, entry[F.FK_FILE])
        manifest = dict(b.manifest)
        manifest[F.BK_CONCEPTS] = [q for q in b.concepts if q[F.QK_NAME] != name]
        write_manifest(b.root, manifest)  # first: a bundle never lists a file that is gone
        shared = any(q[F.FK_FILE] == entry[F.FK_FILE] for q in manifest[F.BK_CONCEPTS])
        if not shared:
            table.unlink(missing_ok=True)
        return len(manifest[F.BK_CONCEPTS])

    left = _run(work)
    click.echo(f"removed concept {name!r} from {bundle} ({left} concept{'s' if left != 1 else ''} left)")


__all__ = ["describe", "main"]
