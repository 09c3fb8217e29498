"""pm-run through click's CliRunner on the tiny bundle: outputs, PNG parameters, --json, and the bad
input list of the issue (one-line error, non-zero exit, no traceback, no file written)."""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pm_runtime import formats as F
from pm_runtime.backends.base import CheckedNetwork
from pm_runtime.bundle import write_manifest
from pm_runtime.cli import main
from pm_runtime.errors import UserError
from pm_runtime.png import parse_parameters, read_parameters
from pm_runtime.specs import VAE_DECODER

from test_pipeline import PROMPT

FAST = ["--steps", "2", "--height", "256", "--width", "256", "--seed", "233"]


@pytest.fixture()
def bundle_copy(run_bundle, tmp_path):
    return shutil.copytree(run_bundle, tmp_path / "b")


def pm_run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, needle):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and needle in lines[0], result.output


def pngs(folder):
    return sorted(p for p in folder.rglob("*.png"))


# ---------------------------------------------------------------- what users get
def test_writes_a_png_with_its_parameters(run_bundle, tmp_path):
    out = tmp_path / "knight.png"
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", out, *FAST)
    assert r.exit_code == 0, r.output
    assert "backend: onnxruntime (auto" in r.output and f"wrote {out}" in r.output
    timing = [line for line in r.output.splitlines() if line.startswith("time:")]
    assert len(timing) == 1 and all(w in timing[0] for w in ("text encoder", "UNet 2 x", "VAE", "total"))
    im = Image.open(out)
    assert im.size == (256, 256) and im.mode == "RGB"
    p = parse_parameters(im.info["parameters"])
    assert p["Prompt"] == PROMPT
    assert p["Negative prompt"] == "monochrome, lowres, bad anatomy, worst quality, low quality"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"]) == ("2", "DPM++ 2M", "8.0", "233")
    assert p["Size"] == "256x256"
    assert p["Concept"] == "alice" and len(p["Concept hash"]) == 12 and p["Backend"].startswith("onnxruntime")
    assert p["Version"].startswith("personamagic-runtime ") and p["Model"] == "tiny-sd"
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp files left


def test_same_seed_same_bytes_and_engine_file(run_bundle, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", a, *FAST).exit_code == 0
    r = pm_run("--engine", run_bundle / "unet.onnx", "--prompt", PROMPT, "--concept", "alice", "--out", b, *FAST)
    assert r.exit_code == 0, r.output
    assert "auto, order onnxruntime" in r.output  # the named .onnx puts onnxruntime first
    assert a.read_bytes() == b.read_bytes()


def test_json_folder_and_several_images(run_bundle, tmp_path):
    out = tmp_path / "imgs"
    args = ("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice-photo2", "--out", out, "--num-images",
            "2", "--scheduler", "euler-a", "--json", *FAST)
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["files"] == [str(out / "00000-233.png"), str(out / "00001-233.png")]
    assert result["concept"] == "alice-photo2" and result["settings"]["scheduler"] == "euler-a"
    assert set(result["timings"]) >= {"text_encoder_s", "unet_s", "unet_step_ms", "vae_s", "total_s", "load_s"}
    assert "Batch pos: 1" in result["parameters"][1]
    assert result["device_memory"] is None and result["host_memory"]["peak_rss_gib"] > 0.05  # this process's RSS
    assert "host memory: peak resident" in r.stderr
    r = CliRunner().invoke(main, [str(a) for a in args])  # a second run numbers on, never overwrites
    assert json.loads(r.stdout)["files"][0] == str(out / "00002-233.png") and len(pngs(out)) == 4


def test_options_reach_the_pipeline(run_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "unset-below")  # restored (unset) after the test
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    out = tmp_path / "x.png"
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", out, "--late-stage",
               "super-class", "--concept-stage", "500", "700", "--guidance", "5.5", "--negative-prompt", "blurry",
               "--scheduler", "ddim", "--no-safety-checker", "--threads", "1", "--low-memory", *FAST)
    assert r.exit_code == 0, r.output
    p = parse_parameters(Image.open(out).info["parameters"])
    assert (p["Late stage"], p["Concept stage"], p["CFG scale"], p["Negative prompt"], p["Sampler"]) == \
        ("super-class", "500-700", "5.5", "blurry", "DDIM")
    assert "note: --no-safety-checker: the bundle has no safety checker" in r.output
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # --low-memory's allocator setting
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    assert pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", tmp_path / "y.png",
                  "--low-memory", *FAST).exit_code == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6"  # the user's own stays


def test_dtype_picks_a_pytorch_backend_on_the_cpu(run_bundle, tmp_path, monkeypatch):
    """--device cpu: onnxruntime by default; with --dtype, auto takes torch-cuda in that precision."""
    pytest.importorskip("torch")
    # the choice is what is tested here: the kernels' PyTorch references, not the Triton interpreter
    # (its kernels took ~45 s of this test at 256 px; they are tested in test_kernels / test_torch_cuda)
    # (pm_kernels.set_enabled(False), undone after the test; not TRITON_INTERPRET=0, which Triton may read
    # once for the whole process)
    monkeypatch.setattr(importlib.import_module("pm_kernels._dispatch"), "_ENABLED", False)
    from pm_runtime import resources

    monkeypatch.setattr(resources, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))  # no 16-bit units
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", tmp_path / "a.png",
               "--device", "cpu", "--json", *FAST)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["backend"].startswith("onnxruntime")
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", tmp_path / "b.png",
               "--device", "cpu", "--dtype", "bfloat16", "--json", *FAST)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["backend"].startswith("torch-cuda") and "bfloat16" in summary["backend"]
    assert summary["config"]["dtype"] == "bfloat16"
    # a CPU without bfloat16 units is told that bfloat16 runs emulated there, once, as a warning line
    assert r.stderr.count("warning: this CPU shows no bfloat16 units (amx_bf16 or avx512_bf16)") == 1, r.stderr


@pytest.mark.parametrize("flags,dtype,warned", [
    ({"avx2", "avx512f"}, "bfloat16", True), ({"avx2", "avx512f"}, "float16", True),
    ({"avx512f", "avx512_bf16"}, "bfloat16", False), ({"avx512f", "avx512_bf16"}, "float16", True),
    ({"amx_bf16", "amx_tile"}, "bfloat16", False), ({"avx512_fp16"}, "float16", False),
    ({"amx_fp16"}, "float16", False), ({"avx2"}, "float32", False), (None, "bfloat16", False)])
def test_cpu_16bit_note_only_where_the_units_are_missing(monkeypatch, flags, dtype, warned):
    """The emulation warning: where the x86 flags were read and none of the dtype's units is among them;
    never for float32 or where the flags are unknown (not x86 Linux: no claim)."""
    from pm_runtime import resources

    monkeypatch.setattr(resources, "cpu_flags", lambda: None if flags is None else frozenset(flags))
    note = resources.cpu_16bit_note(dtype)
    assert (note is not None) == warned
    if warned:
        assert note.startswith(f"this CPU shows no {dtype} units") and "slower than float32" in note
        assert all(u in note for u in resources.CPU_16BIT_UNITS[dtype])


@pytest.mark.parametrize("units,told", [(["amx_bf16", "avx512_bf16"], "AMX"), (["avx512_bf16"], "AVX512-BF16"),
                                        ([], None)])
def test_bf16_cpus_get_the_bfloat16_hint(run_bundle, tmp_path, monkeypatch, units, told):
    """auto on a CPU ran onnxruntime on a bundle with torch weights: a CPU with bfloat16 units is told
    about --dtype bfloat16 (with the figure measured on its kind); others are not."""
    from pm_runtime import resources

    monkeypatch.setattr(resources, "cpu_bf16_units", lambda: units)
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", tmp_path / "a.png", *FAST)
    assert r.exit_code == 0, r.output
    assert ("--device cpu --dtype bfloat16" in r.output) == (told is not None)
    if told:
        assert f"this CPU has {told}" in r.output


def test_no_bfloat16_hint_on_avx512_for_an_int8_unet(run_bundle, monkeypatch):
    """Without AMX the int8 bundle was as fast as bfloat16 or faster (README): no hint for an int8 UNet there;
    with AMX bfloat16 was faster than int8 too."""
    from types import SimpleNamespace

    from pm_runtime import resources
    from pm_runtime.cli import _bf16_hint
    from pm_runtime.pipeline import Pipeline

    cfg = SimpleNamespace(backend="auto", dtype=None, device=None)  # what the hint reads of a RunConfig
    with Pipeline.load(run_bundle, backend="onnxruntime", concept="alice") as pipe:
        pipe.backend.precision["unet"] = "int8"  # what an int8 bundle's manifest gives the backend
        monkeypatch.setattr(resources, "cpu_bf16_units", lambda: ["avx512_bf16"])
        assert _bf16_hint(cfg, pipe) is None
        monkeypatch.setattr(resources, "cpu_bf16_units", lambda: ["amx_bf16", "avx512_bf16"])
        assert "AMX" in _bf16_hint(cfg, pipe)


def test_cpu_bf16_units_reads_the_cpu_flags():
    from pm_runtime import resources

    units = resources.cpu_bf16_units()
    assert set(units) <= {"amx_bf16", "avx512_bf16"}
    if os.path.exists("/proc/cpuinfo"):
        flags = open("/proc/cpuinfo").read()
        assert ("amx_bf16" in units) == (" amx_bf16" in flags)


def test_long_unicode_and_repeated_concept_prompts(run_bundle, tmp_path):
    long = PROMPT + ", " + ", ".join(["very detailed"] * 40)  # over 75 tokens: read in chunks, nothing cut
    r = pm_run("--engine", run_bundle, "--prompt", long, "--concept", "alice", "--out", tmp_path / "l.png", *FAST)
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert re.search(r"long prompt: the prompt and negative prompt read in up to [234] chunks of 75 tokens", r.output)
    longer = PROMPT + ", " + ", ".join(["very detailed"] * 200)  # over 4 chunks of 75
    r = pm_run("--engine", run_bundle, "--prompt", longer, "--concept", "alice", "--out", tmp_path / "l.png", *FAST)
    assert r.exit_code == 0, r.output
    assert "warning: the prompt is" in r.output and "cut off at the same word" in r.output
    prompt = "<persona> und <persona> im Café, 東京の夜 🌃"
    r = pm_run("--engine", run_bundle, "--prompt", prompt, "--concept", "alice", "--out", tmp_path / "u.png",
               "--negative-prompt", "<persona> with glasses", *FAST)
    assert r.exit_code == 0, r.output
    assert "warning: the negative prompt's <persona> is read as plain text" in r.output  # silent before
    assert parse_parameters(Image.open(tmp_path / "u.png").info["parameters"])["Prompt"] == prompt  # iTXt chunk


def test_concept_file_given_as_a_table_says_to_bake_it(run_bundle, trained_concept, tmp_path):
    """--concept names a baked table; pm-train's concept.pt there gets the pm-export --bundle hint."""
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", trained_concept, "--out", tmp_path / "o.png",
               *FAST)
    assert_one_line_error(r, f"pm-export {trained_concept} --bundle BUNDLE")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", junk, "--out", tmp_path / "o.png", *FAST)
    assert_one_line_error(r, "is not a concept table")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.safetensors"]


def test_allow_no_concept(run_bundle, tmp_path):
    args = ["--engine", run_bundle, "--prompt", "a photo of a face", "--concept", "alice", "--out", tmp_path / "p.png",
            *FAST]
    assert_one_line_error(pm_run(*args), "does not contain the concept word '<persona>'")
    r = pm_run(*args, "--allow-no-concept")
    assert r.exit_code == 0, r.output
    assert "Concept:" not in Image.open(tmp_path / "p.png").info["parameters"]


# ---------------------------------------------------------------- bad input
def tamper(root):
    (root / "unet.onnx").write_bytes((root / "unet.onnx").read_bytes()[:-10] + b"0123456789")


def remove_file(root):
    (root / "vae_decoder.onnx").unlink()


def escape(root):
    m = json.loads((root / F.BUNDLE_MANIFEST).read_text())
    m[F.BK_COMPONENTS][1][F.CK_FILE] = "../unet.onnx"
    write_manifest(root, m)


@pytest.mark.parametrize("damage,needle", [(tamper, "unet.onnx (component unet) fails its checksum"),
                                           (remove_file, "bundle file missing: vae_decoder.onnx"),
                                           (escape, "leaves the bundle folder")])
def test_damaged_bundles_are_refused(bundle_copy, tmp_path, damage, needle):
    damage(bundle_copy)
    r = pm_run("--engine", bundle_copy, "--prompt", PROMPT, "--concept", "alice", "--out", tmp_path / "o.png", *FAST)
    assert_one_line_error(r, needle)
    assert not pngs(tmp_path)


BAD = [
    (["--concept", "bob"], PROMPT, "the bundle has no concept 'bob' (it has: alice, alice-photo2)"),
    (["--concept", "alice"], "a knight", "does not contain the concept word"),
    (["--concept", "alice"], "<persona> and <bob>", "two different concept words in one prompt"),
    ([], PROMPT, "the bundle has several concepts (alice, alice-photo2): choose one"),
    (["--concept", "alice", "--height", "300"], PROMPT, "unsupported size 256x300: height and width must be "
                                                        "multiples of 64 from 256 to 1024"),
    (["--concept", "alice", "--width", "2048"], PROMPT, "from 256 to 1024"),
    (["--concept", "alice", "--height", "0"], PROMPT, "unsupported size 256x0"),  # 0 is not "the default"
    (["--concept", "alice", "--steps", "0"], PROMPT, "--steps must be >= 1"),
    (["--concept", "alice", "--steps", "1001"], PROMPT, "steps must be at most the model's 1000 training timesteps"),
    (["--concept", "alice", "--guidance", "nan"], PROMPT, "--guidance must be a finite number"),
    (["--concept", "alice", "--guidance", "inf"], PROMPT, "--guidance must be a finite number"),
    (["--concept", "alice", "--concept-stage", "100", "800"], PROMPT, "inside the baked range 400..800"),
    (["--concept", "alice", "--backend", "tensorrt"], PROMPT, "backend tensorrt: "),
    (["--concept", "alice", "--backend", "torch"], PROMPT, "give --model"),
    (["--concept", "alice", "--device", "cuda"], PROMPT, "install onnxruntime-gpu"),
    (["--concept", "alice", "--backend", "onnxruntime", "--dtype", "bfloat16"], PROMPT,
     "backend onnxruntime: --dtype is for the PyTorch backends"),
]


@pytest.mark.parametrize("extra,prompt,needle", BAD)
def test_bad_input_one_line_error(run_bundle, tmp_path, extra, prompt, needle):
    args = ["--engine", run_bundle, "--prompt", prompt, "--out", tmp_path / "o.png", *FAST, *extra]
    assert_one_line_error(pm_run(*args), needle)
    assert not pngs(tmp_path)


def test_missing_backend_library_gives_install_hint(run_bundle, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", tmp_path / "o.png",
               "--backend", "onnxruntime", *FAST)
    assert_one_line_error(r, "pip install 'personamagic-runtime[onnx]'")


def test_tensorrt_missing_library_hint(run_bundle, tmp_path):
    """A bundle whose plans exist but TensorRT does not import: the install hint, one line."""
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    b = shutil.copytree(run_bundle, tmp_path / "b")
    m = json.loads((b / F.BUNDLE_MANIFEST).read_text())
    from pm_runtime.bundle import file_entry

    for net in ("text_encoder", "unet", "vae_decoder"):
        (b / f"{net}.plan").write_bytes(b"not really a plan")
        m[F.BK_COMPONENTS].append({**next(c for c in m[F.BK_COMPONENTS] if c[F.CK_NETWORK] == net),
                                   F.CK_NAME: f"{net}.plan", F.CK_FORMAT: "tensorrt", **file_entry(b, f"{net}.plan"),
                                   F.CK_DETAILS: {"tensorrt_version": "10.3.0", "compute_capability": "9.0"}})
    write_manifest(b, m)
    r = pm_run("--engine", b / "unet.plan", "--prompt", PROMPT, "--concept", "alice", "--out", tmp_path / "o.png",
               "--backend", "tensorrt", *FAST)
    assert_one_line_error(r, "pip install 'personamagic-runtime[tensorrt]'")
    r = pm_run("--engine", b / "unet.plan", "--prompt", PROMPT, "--concept", "alice", "--out", tmp_path / "o.png",
               *FAST)  # auto falls back to onnxruntime and says why
    assert r.exit_code == 0 and "skipped tensorrt: TensorRT is not installed" in r.output, r.output


def test_unwritable_output(run_bundle, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", blocker / "o.png", *FAST)
    assert_one_line_error(r, "cannot write to")
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", blocker, *FAST)
    assert_one_line_error(r, "exists and is not a folder")


def test_a_number_taken_meanwhile_is_never_overwritten(run_bundle, tmp_path, monkeypatch):
    """Two pm-runs into one folder: the name picked before generating may be taken by the other run by the
    time this one writes; the image then takes the next free number and the other run's file is untouched."""
    import pm_runtime.cli as cli

    out, theirs = tmp_path / "shots", b"the other run's image"
    check = cli.check_writable

    def other_run_writes_meanwhile(paths):
        check(paths)
        for p in paths:  # what a concurrent run, numbering from the same listing, writes first
            p.write_bytes(theirs)

    monkeypatch.setattr(cli, "check_writable", other_run_writes_meanwhile)
    r = CliRunner().invoke(main, [str(a) for a in ("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice",
                                                   "--out", out, "--num-images", "2", "--json", *FAST)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["files"] == [str(out / "00002-233.png"), str(out / "00003-233.png")]
    assert [(out / f"0000{i}-233.png").read_bytes() for i in (0, 1)] == [theirs, theirs]
    assert all(Image.open(out / f"0000{i}-233.png").size == (256, 256) for i in (2, 3))
    assert sorted(p.name for p in out.iterdir()) == [f"0000{i}-233.png" for i in range(4)]  # no temp files left


@pytest.mark.parametrize("hard_links", [True, False])
def test_exclusive_atomic_write(tmp_path, monkeypatch, hard_links):
    """atomic_write_bytes(exclusive=True) refuses an existing name and leaves nothing behind, with hard links
    and on filesystems without them (FAT, some network shares: os.link raises EPERM / ENOTSUP)."""
    import errno

    from pm_runtime.concept_table import atomic_write_bytes

    if not hard_links:
        def no_link(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "00000-1.png"
    atomic_write_bytes(b"first", target, exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_bytes(b"second", target, exclusive=True)
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == [target.name]
    atomic_write_bytes(b"replaced", target)  # not exclusive: a name the user gave is replaced
    assert target.read_bytes() == b"replaced" and len(list(tmp_path.iterdir())) == 1


def test_output_formats(run_bundle, tmp_path):
    """--out k.JPG writes a JPEG and a folder with --format webp lossless WebPs, each carrying the settings in
    EXIF UserComment (the PNG's text); --out k.bmp is an error, not a folder called k.bmp; a --format that
    contradicts --out's name is an error; an existing folder named shots.webp is still a folder."""
    args = ("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", *FAST)
    for out, extra, needle in ((tmp_path / "k.bmp", (), "pm-run writes PNG, JPEG or WebP files"),
                               (tmp_path / "k.jpg", ("--format", "png"), "--format png does not match --out")):
        assert_one_line_error(pm_run(*args, "--out", out, *extra), needle)
        assert not list(tmp_path.iterdir())
    (tmp_path / "shots.webp").mkdir()
    for out, extra in ((tmp_path / "k.png", ()), (tmp_path / "k.JPG", ()),
                       (tmp_path / "shots.webp", ("--format", "webp"))):
        r = pm_run(*args, "--out", out, *extra)
        assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "shots.webp").iterdir()] == ["00000-233.webp"]
    png, jpg, webp = (Image.open(p) for p in (tmp_path / "k.png", tmp_path / "k.JPG", tmp_path / "shots.webp" /
                                               "00000-233.webp"))
    assert (png.format, jpg.format, webp.format) == ("PNG", "JPEG", "WEBP")
    assert read_parameters(jpg) == read_parameters(webp) == read_parameters(png) == png.info["parameters"]
    assert parse_parameters(read_parameters(jpg))["Prompt"] == PROMPT
    pixels = np.asarray(png)
    assert np.array_equal(np.asarray(webp), pixels)  # lossless
    mse = ((np.asarray(jpg).astype(float) - pixels) ** 2).mean()
    assert 0 < mse and 10 * np.log10(255**2 / mse) > 30  # 36 dB: quality 95, 4:4:4, a noise image (random weights)


def test_settings_from_remakes_the_image(run_bundle, tmp_path):
    """--settings-from IMAGE makes the same file again (the second image of a euler-a batch, non-default
    guidance, size and concept stage: the batch is regenerated and that image kept); an option given wins
    over the image's value; a JPEG's EXIF settings read back the same."""
    shots = tmp_path / "shots"
    made = pm_run("--engine", run_bundle, "--prompt", PROMPT + ", smiling", "--concept", "alice-photo2", "--out", shots,
                  "--num-images", "2", "--scheduler", "euler-a", "--guidance", "6.5", "--concept-stage", "450", "750",
                  "--steps", "2", "--height", "256", "--width", "320", "--seed", "11")
    assert made.exit_code == 0, made.output
    original = shots / "00001-11.png"
    again = tmp_path / "again.png"
    r = pm_run("--engine", run_bundle, "--settings-from", original, "--out", again)
    assert r.exit_code == 0, r.output
    assert "image 2 of a batch of 2 (the whole batch is generated, that image kept)" in r.output
    assert again.read_bytes() == original.read_bytes() and "warning" not in r.output
    from pm_runtime import reproduce  # the same from Python
    from pm_runtime.pipeline import Pipeline

    settings = reproduce.load(original)
    with Pipeline.load(run_bundle, "onnxruntime") as pipe:
        pipe.use_concept(settings.values.get("concept"))
        made = pipe.generate(**settings.generate_kwargs())
    assert settings.batch_pos == 1 and made.encode(settings.batch_pos) == original.read_bytes()
    before = parse_parameters(read_parameters(Image.open(original)))
    r = pm_run("--engine", run_bundle, "--settings-from", original, "--seed", "12", "--out", tmp_path / "v.jpg",
               "--json")
    assert r.exit_code == 0, r.output
    after = parse_parameters(read_parameters(Image.open(tmp_path / "v.jpg")))
    assert after.pop("Seed") == "12" and before.pop("Seed") == "11"
    assert after == before  # everything else from the image: prompt, stage, guidance, size, batch position
    assert json.loads(r.stdout)["config"]["settings_from"]["image"] == str(original)
    for source, out in ((tmp_path / "v.jpg", tmp_path / "v.png"), (original, tmp_path / "w.png")):
        extra = ("--seed", "12") if source == original else ()
        r = pm_run("--engine", run_bundle, "--settings-from", source, *extra, "--out", out)
        assert r.exit_code == 0, r.output
    assert (tmp_path / "v.png").read_bytes() == (tmp_path / "w.png").read_bytes()  # the JPEG's settings read back


def test_settings_from_refuses_what_it_cannot_remake(run_bundle, tmp_path):
    src = tmp_path / "src.png"
    assert pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", src, *FAST).exit_code == 0
    text = read_parameters(Image.open(src))
    args = ("--engine", run_bundle, "--out", tmp_path / "o.png")

    def settings(old, new):  # the image's settings with one edit, in a text file of their own
        path = tmp_path / f"s{len(list(tmp_path.glob('s*.txt')))}.txt"
        path.write_text(text.replace(old, new), encoding="utf-8")
        return path

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    for source, extra, needle in (
            (tmp_path / "plain.png", (), "carries no generation settings"),
            (settings("Sampler: DPM++ 2M", "Sampler: DPM++ SDE Karras"), (), "is not one pm-run has"),
            (settings("Seed: 233", "Seed: latents given"), (), "not made from a seed): give --seed"),
            (settings("Concept: alice,", "Concept: carol,"), (), "was made with concept 'carol': give --concept"),
            (settings("Size: 256x256", "Size: big"), (), "is not WIDTHxHEIGHT"),
            (tmp_path / "missing.png", (), "No such file")):
        assert_one_line_error(pm_run(*args, "--settings-from", source, *extra), needle)
    assert not (tmp_path / "o.png").exists()
    assert_one_line_error(pm_run(*args), "give --prompt (or --prompts-file, or --settings-from")
    r = pm_run(*args, "--settings-from", settings("Sampler: DPM++ 2M", "Sampler: DPM++ SDE Karras"), "--scheduler",
               "ddim")  # an option given is not read from the image, nor checked
    assert r.exit_code == 0, r.output
    assert parse_parameters(read_parameters(Image.open(tmp_path / "o.png")))["Sampler"] == "DDIM"
    hash_ = parse_parameters(text)["Concept hash"]
    r = pm_run(*args, "--settings-from", settings(f"Concept hash: {hash_}", "Concept hash: 000000000000"))
    assert r.exit_code == 0 and "warning: concept alice here is not the table" in r.output, r.output
    r = pm_run(*args, "--settings-from", settings("Backend: onnxruntime", "Backend: TensorRT 10.3 fp16, was"))
    assert r.exit_code == 0 and "expect small differences" in r.output, r.output
    # a long prompt: pm-run before 0.3 cut it at 75 tokens, so its image is not remade
    version, long = parse_parameters(text)["Version"], text.replace(PROMPT, PROMPT + ", " + "photo " * 90, 1)
    for made_by, warned in ((version, False), ("personamagic-runtime 0.2.0", True)):
        (tmp_path / "long.txt").write_text(long.replace(version, made_by), encoding="utf-8")
        r = pm_run(*args, "--settings-from", tmp_path / "long.txt")
        assert r.exit_code == 0 and ("which cut prompts at 75 tokens (BREAK ignored); this run read 2 chunks"
                                     in r.output) == warned, r.output
    # prompt editing in the negative prompt: read as words before 0.3
    negative = parse_parameters(text)["Negative prompt"]
    edited = text.replace(f"Negative prompt: {negative}", "Negative prompt: [ugly:blurry:1]", 1)
    for made_by, warned in ((version, False), ("personamagic-runtime 0.2.0", True)):
        (tmp_path / "neg.txt").write_text(edited.replace(version, made_by), encoding="utf-8")
        r = pm_run(*args, "--settings-from", tmp_path / "neg.txt", "--steps", "3")  # ugly at steps 1-2, then blurry
        assert r.exit_code == 0 and ("which read the negative prompt's editing syntax as words" in r.output) == warned


def test_settings_parse_takes_only_what_was_not_given(tmp_path):
    from pm_runtime.reproduce import parse

    text = ("a <persona> portrait\nNegative prompt: blurry\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 5, "
            "Size: 512x768, Model hash: abc, Clip skip: 2, Batch size: 4, Batch pos: 3")
    s = parse(text, tmp_path / "x.png")
    assert s.values == {"prompt": "a <persona> portrait", "negative_prompt": "blurry", "steps": 30,
                        "scheduler": "euler-a", "guidance": 7.0, "seed": 5, "width": 512, "height": 768,
                        "allow_no_concept": True, "num_images": 4, "emphasis": "original"}
    assert s.batch_pos == 3 and s.ignored == ("Model hash", "Clip skip")
    assert "512x768" in s.describe()
    s = parse(text, tmp_path / "x.png", given={"seed", "num_images", "negative_prompt", "allow_no_concept"})
    assert "seed" not in s.values and "negative_prompt" not in s.values and s.batch_pos is None
    s = parse(text, tmp_path / "x.png", given={"height"})  # one side of the size given (was a KeyError)
    assert "height" not in s.values and "width 512" in s.describe()
    assert parse("p\nSteps: 3, Sampler: DDIM, Seed: 1", tmp_path / "x").values["negative_prompt"] == ""
    # Karras: in the sampler's name (A1111 before 1.9, and pm-run) or as the schedule type (1.9 and later, where
    # "Automatic" is the sampler's default: Karras for DPM++ 2M)
    for sampler, scheduler in (("DPM++ 2M Karras", "dpmpp-2m-karras"), ("Euler Karras", "euler-karras"),
                               ("DPM++ 2M, Schedule type: Karras", "dpmpp-2m-karras"),
                               ("DPM++ 2M, Schedule type: Automatic", "dpmpp-2m-karras"),
                               ("Euler, Schedule type: Automatic", "euler"),
                               ("Euler, Schedule type: Karras", "euler-karras"),
                               ("DPM++ 2M SDE", "dpmpp-2m-sde"), ("DPM++ 2M SDE Karras", "dpmpp-2m-sde-karras"),
                               ("DPM++ 2M SDE, Schedule type: Karras", "dpmpp-2m-sde-karras"),
                               ("DPM++ 2M SDE Exponential", "dpmpp-2m-sde-exponential"),
                               ("DPM++ 2M SDE, Schedule type: Exponential", "dpmpp-2m-sde-exponential"),
                               ("DPM++ 2M SDE, Schedule type: Automatic", "dpmpp-2m-sde-exponential"),
                               ("DPM++ 2M, Schedule type: Beta", "dpmpp-2m-beta"), ("Euler, Schedule type: Beta",
                                                                                   "euler-beta"),
                               ("DPM++ 2M SDE, Schedule type: Beta", "dpmpp-2m-sde-beta"),
                               ("DPM++ 2M, Schedule type: Uniform", "dpmpp-2m"), ("Euler a, Schedule type: Uniform",
                                                                                 "euler-a"),
                               ("DPM++ 2M, Schedule type: Exponential", "dpmpp-2m-exponential"),
                               ("Euler Exponential", "euler-exponential"),
                               ("DPM++ 2M, Schedule type: SGM Uniform", "dpmpp-2m-sgm-uniform"),
                               ("Euler, Schedule type: Normal", "euler-normal"),
                               ("DPM++ 2M SDE, Schedule type: Simple", "dpmpp-2m-sde-simple"),
                               ("DPM++ 2M, Schedule type: KL Optimal", "dpmpp-2m-kl-optimal"),
                               ("Euler, Schedule type: Align Your Steps", "euler-align-your-steps"),
                               ("DPM++ 2M SGM Uniform", "dpmpp-2m-sgm-uniform"),  # (A1111 1.9+ reads the suffix)
                               ("Euler a, Schedule type: Karras", "euler-a-karras"),
                               ("Euler a, Schedule type: SGM Uniform", "euler-a-sgm-uniform"),
                               ("Euler a, Schedule type: Automatic", "euler-a"),
                               # A1111's Polyexponential at its default rho 1: the exponential levels
                               ("DPM++ 2M, Schedule type: Polyexponential", "dpmpp-2m-exponential"),
                               ("Euler a, Schedule type: Polyexponential, Schedule rho: 1", "euler-a-exponential"),
                               ("DPM++ 2M, Schedule type: Karras, Schedule rho: 7", "dpmpp-2m-karras")):
        s = parse(f"p\nSteps: 3, Sampler: {sampler}, Seed: 1", tmp_path / "x")
        assert s.values["scheduler"] == scheduler and s.ignored == (), sampler
    for sampler, needle in (("DDIM, Schedule type: Karras", "sampler 'DDIM' with schedule type 'Karras' is not"),
                            ("DPM++ 2M, Schedule type: DDIM", "schedule type 'DDIM' is not one"),
                            ("DPM++ 2M, Schedule type: Polyexponential, Schedule rho: 2",
                             "its Polyexponential levels used rho 2"),
                            ("DPM++ 2M, Schedule type: Karras, Schedule rho: 5", "its Karras levels used rho 5"),
                            ("DPM++ 2M, Schedule type: Karras, Schedule max sigma: 10",
                             "its noise levels were cut to max sigma 10 (A1111's 'Schedule min/max sigma')"),
                            ("LMS Karras", "sampler 'LMS Karras' is not one pm-run has"),
                            ("DDIM, Schedule type: Beta", "sampler 'DDIM' with schedule type 'Beta' is not")):
        with pytest.raises(UserError, match=re.escape(needle)):
            parse(f"p\nSteps: 3, Sampler: {sampler}, Seed: 1", tmp_path / "x")


def test_settings_emphasis(tmp_path):
    """The Emphasis key as AUTOMATIC1111 writes it (absent: its default, Original); images of pm-run 0.1.0,
    which read the syntax as words and recorded nothing, are remade that way."""
    from pm_runtime.reproduce import parse

    base = "a (<persona>:1.2)\nSteps: 3, Sampler: DDIM, Seed: 1"
    for extra, mode in (("", "original"), (", Emphasis: No norm", "no-norm"), (", Emphasis: Ignore", "ignore"),
                        (", Emphasis: None", "none"), (", Emphasis: Original", "original"),
                        (", Version: personamagic-runtime 0.1.0", "none"),
                        (", Version: personamagic-runtime 0.2.0", "original"),
                        (", Emphasis: No norm, Version: personamagic-runtime 0.1.0", "no-norm")):
        s = parse(base + extra, tmp_path / "x")
        assert s.values["emphasis"] == mode and s.ignored == (), extra
    assert "emphasis" not in parse(base + ", Emphasis: None", tmp_path / "x", given={"emphasis"}).values
    with pytest.raises(UserError, match="Emphasis 'Strong' is not one of Original, No norm, Ignore, None: give --emph"):
        parse(base + ", Emphasis: Strong", tmp_path / "x")


def test_emphasis_option_is_recorded_and_remade(run_bundle, tmp_path):
    made = tmp_path / "made.png"
    r = pm_run("--engine", run_bundle, "--prompt", "a photo of (<persona>:1.2) as a [knight]", "--concept", "alice",
               "--emphasis", "no-norm", "--out", made, *FAST)
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert parse_parameters(read_parameters(Image.open(made)))["Emphasis"] == "No norm"
    again = tmp_path / "again.png"
    r = pm_run("--engine", run_bundle, "--settings-from", made, "--out", again)
    assert r.exit_code == 0, r.output
    assert again.read_bytes() == made.read_bytes()
    r = pm_run("--engine", run_bundle, "--settings-from", made, "--emphasis", "original", "--out", tmp_path / "o.png")
    assert r.exit_code == 0, r.output
    assert "Emphasis" not in parse_parameters(read_parameters(Image.open(tmp_path / "o.png")))
    assert (tmp_path / "o.png").read_bytes() != made.read_bytes()
    r = pm_run("--engine", run_bundle, "--prompt", "a photo of (<persona>:1.2)", "--concept", "alice", "--emphasis",
               "none", "--out", tmp_path / "w.png", *FAST)
    assert r.exit_code == 0 and "which --emphasis none reads as words" in r.output, r.output
    assert_one_line_error(pm_run("--engine", run_bundle, "--prompt", "a <persona> (red:1.2.3)", "--concept", "alice",
                                 "--out", tmp_path / "e.png", *FAST), "emphasis weight '1.2.3' in ':1.2.3)' is not")
    assert not (tmp_path / "e.png").exists()


def test_prompt_editing_is_said_and_listed(run_bundle, tmp_path):
    r = pm_run("--engine", run_bundle, "--prompt", "a photo of <persona> as a [knight|wizard]", "--concept", "alice",
               "--out", tmp_path / "alt.png", "--json", *FAST, "--steps", "3")
    assert r.exit_code == 0, r.output
    assert "prompt by step: 1-2: 'a photo of <persona> as a knight'; 3: 'a photo of <persona> as a wizard'" in r.stderr
    run = json.loads(r.stdout)  # one run: its record at the top level
    assert [x["steps"] for x in run["prompt_schedule"]] == [[1, 2], [3, 3]]
    assert run["settings"]["prompt"] == "a photo of <persona> as a [knight|wizard]"  # as written (and in the PNG)
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--negative-prompt", "[ugly:blurry:1]", "--concept",
               "alice", "--out", tmp_path / "neg.png", "--json", *FAST, "--steps", "3")
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
    assert "negative prompt by step: 1-2: 'ugly'; 3: 'blurry'" in r.stderr and "\nprompt by step" not in r.stderr
    run = json.loads(r.stdout)
    assert run["prompt_schedule"] is None and [x["text"] for x in run["negative_prompt_schedule"]] == ["ugly", "blurry"]


@pytest.mark.parametrize("scheduler, sampler, schedule", [("dpmpp-2m-sde-beta", "DPM++ 2M SDE", "Beta"),
                                                          ("dpmpp-2m-kl-optimal", "DPM++ 2M", "KL Optimal"),
                                                          ("euler-a-karras", "Euler a", "Karras")])
def test_schedule_type_is_recorded_as_automatic1111_writes_it(run_bundle, tmp_path, scheduler, sampler, schedule):
    made = tmp_path / "made.png"
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--scheduler", scheduler,
               "--out", made, *FAST)
    assert r.exit_code == 0, r.output
    p = parse_parameters(read_parameters(Image.open(made)))
    assert (p["Sampler"], p["Schedule type"]) == (sampler, schedule)
    r = pm_run("--engine", run_bundle, "--settings-from", made, "--out", tmp_path / "again.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again.png").read_bytes() == made.read_bytes()


def test_prompts_file(run_bundle, tmp_path):
    """--prompts-file: every prompt (comments and blank lines skipped) with the engines loaded once, the same
    seed and settings; each image the one a single run of its prompt makes; --json lists a run per prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# scenes\n{PROMPT}\n\n  a portrait of <persona>, smiling, \"quoted\"  \n", encoding="utf-8")
    out = tmp_path / "shots"
    r = CliRunner().invoke(main, [str(a) for a in ("--engine", run_bundle, "--prompts-file", prompts, "--concept",
                                                   "alice", "--num-images", "2", "--out", out, "--json", *FAST)])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["files"] == [str(out / f"0000{i}-233.png") for i in range(4)]
    assert [run["prompt_line"] for run in result["runs"]] == [2, 4] and len(result["parameters"]) == 4
    texts = [parse_parameters(read_parameters(Image.open(f)))["Prompt"] for f in result["files"]]
    assert texts == [PROMPT, PROMPT, 'a portrait of <persona>, smiling, "quoted"', 'a portrait of <persona>, '
                                                                                   'smiling, "quoted"']
    assert "prompt 2 of 2 (line 4): time:" in r.stderr
    single = tmp_path / "single.png"
    r = pm_run("--engine", run_bundle, "--prompt", 'a portrait of <persona>, smiling, "quoted"', "--concept", "alice",
               "--num-images", "2", "--out", single, *FAST)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "single-1.png").read_bytes() == (out / "00002-233.png").read_bytes()
    r = pm_run("--engine", run_bundle, "--prompts-file", prompts, "--concept", "alice", "--out", tmp_path / "k.png",
               *FAST)
    assert r.exit_code == 0 and (tmp_path / "k-1.png").is_file() and (tmp_path / "k-2.png").is_file(), r.output
    r = CliRunner().invoke(main, [str(a) for a in ("--engine", run_bundle, "--prompts-file", "-", "--concept", "alice",
                                                   "--out", tmp_path / "stdin.png", *FAST)], input=f"{PROMPT}\n")
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "stdin.png")),  # "-": standard input (one image, not a
                          np.asarray(Image.open(out / "00000-233.png")))  # batch of 2: the same pixels, other text)


def test_prompts_file_refusals_and_partial_runs(run_bundle, tmp_path, monkeypatch):
    """A bad prompt anywhere in the file stops the run before the first image; an error or Ctrl-C after some
    prompts were made says which images were written (each one is whole)."""
    from pm_runtime.pipeline import Pipeline

    out = tmp_path / "o"
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{PROMPT}\n{PROMPT}\na knight with no concept word\n", encoding="utf-8")
    args = ("--engine", run_bundle, "--concept", "alice", "--out", out, *FAST)
    assert_one_line_error(pm_run(*args, "--prompts-file", bad), "bad.txt line 3: the prompt does not contain")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 <persona>".encode("latin-1"))
    for name, extra, needle in (("empty.txt", (), "holds no prompt"), ("latin1.txt", (), "is not UTF-8 text"),
                                ("bad.txt", ("--prompt", PROMPT), "give neither --prompt nor --settings-from"),
                                ("missing.txt", (), "No such file")):
        assert_one_line_error(pm_run(*args, "--prompts-file", tmp_path / name, *extra), needle)
    assert not out.exists()
    good = tmp_path / "good.txt"
    good.write_text(f"{PROMPT}\n{PROMPT}, at night\n", encoding="utf-8")
    generate = Pipeline.generate
    for failure, needle, code in ((UserError("NaN/inf in the UNet output"), "Error: prompt 2 of 2 (line 2): NaN", 1),
                                  (KeyboardInterrupt(), "interrupted; 1 image written before that", 130)):
        calls = []

        def second_fails(self, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise failure
            return generate(self, *a, **k)

        monkeypatch.setattr(Pipeline, "generate", second_fails)
        r = pm_run(*args, "--prompts-file", good)
        assert r.exit_code == code and needle in r.output, r.output
        assert f"written before that: {out / '00000-233.png'}" in r.output or code == 130
        assert sorted(p.name for p in out.iterdir()) == ["00000-233.png"]
        shutil.rmtree(out)


def test_batch_count(run_bundle, tmp_path, monkeypatch):
    """--batch-count N: N batches one after another with seeds SEED..SEED+N-1 (times every prompt of a
    --prompts-file), each image the one a single run with its seed makes, each batch written when it is
    done (a failure later names them), its names carrying its own seed; bad counts are one-line errors."""
    from pm_runtime.pipeline import Pipeline

    out = tmp_path / "shots"
    args = ("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", *FAST)
    r = CliRunner().invoke(main, [str(a) for a in (*args, "--batch-count", "3", "--out", out, "--json")])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["files"] == [str(out / f"0000{i}-{233 + i}.png") for i in range(3)]
    assert [run["settings"]["seed"] for run in result["runs"]] == [233, 234, 235]
    assert [run["batch"] for run in result["runs"]] == [0, 1, 2]
    assert [parse_parameters(read_parameters(Image.open(f)))["Seed"] for f in result["files"]] == ["233", "234", "235"]
    assert "batch 3 of 3 (seed 235): time:" in r.stderr
    single = tmp_path / "single.png"
    r = pm_run(*args[:-2], "--seed", "234", "--out", single)
    assert r.exit_code == 0, r.output
    assert single.read_bytes() == (out / "00001-234.png").read_bytes()
    # with a prompts file: every prompt in every batch, file names numbered in that order
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT}\n{PROMPT}, at night\n", encoding="utf-8")
    r = pm_run("--engine", run_bundle, "--prompts-file", prompts, "--concept", "alice", *FAST, "--batch-count", "2",
               "--num-images", "2", "--out", tmp_path / "k.png")
    assert r.exit_code == 0, r.output
    assert "prompt 2 of 2 (line 2), batch 2 of 2 (seed 234): time:" in r.output
    seeds = [parse_parameters(read_parameters(Image.open(tmp_path / f"k-{i}.png")))["Seed"] for i in range(1, 9)]
    assert seeds == ["233", "233", "234", "234"] * 2
    # a failure in the second batch: the first batch's image is on disk and named
    generate, calls = Pipeline.generate, []

    def second_fails(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise UserError("NaN/inf in the UNet output")
        return generate(self, *a, **k)

    monkeypatch.setattr(Pipeline, "generate", second_fails)
    r = pm_run(*args, "--batch-count", "3", "--out", tmp_path / "f")
    assert "Error: batch 2 of 3 (seed 234): NaN" in r.output and r.exit_code == 1, r.output
    assert f"written before that: {tmp_path / 'f' / '00000-233.png'}" in r.output
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["00000-233.png"]
    for extra, needle in ((("--batch-count", "0"), "--batch-count must be >= 1, got 0"),
                          (("--seed", str(2**63 - 2), "--batch-count", "3"), "goes past the largest seed")):
        assert_one_line_error(pm_run(*args, "--out", tmp_path / "bad", *extra), needle)
    assert not (tmp_path / "bad").exists()


def test_out_dash_writes_the_image_to_standard_output(run_bundle, tmp_path):
    """--out -: the one image's file bytes (settings inside) on standard output, the same bytes a file gets,
    messages on standard error; refused (before anything runs) with several images, --json or a terminal."""
    args = ("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", *FAST)
    r = CliRunner().invoke(main, [str(a) for a in (*args, "--out", "-")])
    assert r.exit_code == 0, r.stderr
    assert r.stdout_bytes.startswith(b"\x89PNG") and "wrote <standard output>" in r.stderr
    assert pm_run(*args, "--out", tmp_path / "k.png").exit_code == 0
    assert r.stdout_bytes == (tmp_path / "k.png").read_bytes()
    r = CliRunner().invoke(main, [str(a) for a in (*args, "--out", "-", "--format", "jpeg")])
    assert r.exit_code == 0 and r.stdout_bytes[:3] == b"\xff\xd8\xff", r.stderr
    assert read_parameters(Image.open(io.BytesIO(r.stdout_bytes))) == read_parameters(Image.open(tmp_path / "k.png"))
    for extra, needle in ((("--num-images", "2"), "makes several"), (("--batch-count", "2"), "makes several"),
                          (("--json",), "--json cannot print there too")):
        assert_one_line_error(pm_run(*args, "--out", "-", *extra), needle)
    assert not (Path.cwd() / "-").exists()


def test_nan_image_is_never_written(run_bundle, tmp_path, monkeypatch):
    run = CheckedNetwork.run

    def poisoned(self, inputs):
        out = run(self, inputs)
        return {k: v * np.nan for k, v in out.items()} if self.spec.name == VAE_DECODER else out

    monkeypatch.setattr(CheckedNetwork, "run", poisoned)
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--out", tmp_path / "o.png", *FAST)
    assert_one_line_error(r, "NaN/inf in the VAE decoder output (image)")
    assert not list(tmp_path.iterdir())


def test_not_a_bundle(tmp_path):
    assert_one_line_error(pm_run("--engine", tmp_path / "nope", "--prompt", PROMPT), "bundle folder not found")
    (tmp_path / "x.onnx").write_bytes(b"")
    assert_one_line_error(pm_run("--engine", tmp_path / "x.onnx", "--prompt", PROMPT), "is not inside a bundle")


def test_peak_rss_is_the_process_own_in_bytes(monkeypatch):
    """pm_runtime.resources: on Linux VmHWM, the process's own peak: a child of a parent that once
    held 400 MB reports its own few tens of MB, where ru_maxrss carries the parent's peak over fork +
    exec. Without /proc: ru_maxrss, KiB on Linux and the BSDs, bytes on macOS; without the `resource`
    module either (Windows): None."""
    import builtins
    import resource

    from pm_runtime import resources

    if Path("/proc/self/status").exists():
        hwm = next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines()
                   if ln.startswith("VmHWM:"))
        assert resources.peak_rss_bytes() in range(hwm * 1024, hwm * 1024 + 2**28)  # (allowing growth)
        code = ("import resource, sys\n"
                "big = bytearray(400 * 2**20)\n"
                "for i in range(0, len(big), 4096): big[i] = 1\n"
                "del big\n"
                "import subprocess\n"
                "print(subprocess.run([sys.executable, '-c', 'import resource; from pm_runtime.resources import "
                "peak_rss_bytes; print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)'],"
                " capture_output=True, text=True, check=True).stdout)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        own, inherited = map(int, out.split())
        assert own < 200 * 2**20 and inherited >= 400 * 2**20, (own, inherited)

    def no_proc(*a, **kw):
        raise OSError("no /proc here")

    monkeypatch.setattr(resources, "open", no_proc, raising=False)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monkeypatch.setattr(resources.sys, "platform", "linux")
    assert resources.peak_rss_bytes() in range(maxrss * 1024, maxrss * 1024 + 2**28)
    monkeypatch.setattr(resources.sys, "platform", "darwin")
    assert resources.peak_rss_bytes() in range(maxrss, maxrss + 2**18)  # bytes as reported
    real_import = builtins.__import__

    def no_resource(name, *a, **kw):
        if name == "resource":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_resource)
    assert resources.peak_rss_bytes() is None


def test_python_warnings_are_one_line_notes(monkeypatch):
    """A warning raised during the run (e.g. the kernel tuning's budget ran out) reaches stderr as
    "warning: ..." without Python's file:line header; the category is named where it is not a
    UserWarning. Outside pm-run the warning machinery is as it was."""
    import warnings

    from pm_runtime import cli

    def fake_run(cfg, written=None):
        warnings.warn("pm_kernels tuning: the session's budget ran out")
        warnings.warn("old API", DeprecationWarning)
        return {"files": [], "flagged": []}

    shown = warnings.showwarning
    monkeypatch.setattr(cli, "run", fake_run)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        r = CliRunner().invoke(main, ["--engine", "x", "--prompt", PROMPT])
    assert r.exit_code == 0, r.output
    assert "warning: pm_kernels tuning: the session's budget ran out" in r.stderr
    assert "warning (DeprecationWarning): old API" in r.stderr
    assert "UserWarning" not in r.stderr and "test_run_cli.py" not in r.stderr
    assert warnings.showwarning is shown


def test_hires_fix_is_recorded_and_remade(run_bundle, tmp_path):
    """--hires-scale: the image has the larger size, its parameters say so as AUTOMATIC1111 writes them, and
    --settings-from remakes it byte for byte; the hires options alone only earn a note."""
    made = tmp_path / "hires.png"
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--hires-scale", "1.5",
               "--hires-steps", "2", "--denoising-strength", "0.5", "--hires-upscaler", "latent-nearest", "--json",
               "--out", made, *FAST)
    assert r.exit_code == 0, r.output
    assert "hires fix: 256x256 -> 384x384 (latent-nearest), then 2 steps from step 3 of a 4-step schedule" in r.stderr
    run = json.loads(r.stdout)
    assert run["config"]["hires_scale"] == 1.5 and run["settings"]["hires"]["start"] == 2
    assert Image.open(made).size == (384, 384)
    p = parse_parameters(read_parameters(Image.open(made)))
    assert (p["Size"], p["Hires upscale"], p["Hires steps"], p["Hires upscaler"], p["Denoising strength"]) == \
        ("256x256", "1.5", "2", "Latent (nearest)", "0.5")
    r = pm_run("--engine", run_bundle, "--settings-from", made, "--out", tmp_path / "again.png")
    assert r.exit_code == 0, r.output
    assert "hires fix x1.5" in r.stderr and (tmp_path / "again.png").read_bytes() == made.read_bytes()
    own = tmp_path / "own.png"  # the pass's own scheduler and guidance, recorded and remade too
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--hires-scale", "1.25",
               "--hires-scheduler", "euler-karras", "--hires-guidance", "5", "--out", own, *FAST)
    assert r.exit_code == 0 and "euler-karras, guidance 5.0)" in r.stderr, r.output
    p = parse_parameters(read_parameters(Image.open(own)))
    assert (p["Hires sampler"], p["Hires schedule type"], p["Hires CFG Scale"]) == ("Euler", "Karras", "5.0")
    r = pm_run("--engine", run_bundle, "--settings-from", own, "--out", tmp_path / "own2.png")
    assert r.exit_code == 0 and (tmp_path / "own2.png").read_bytes() == own.read_bytes(), r.output
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--denoising-strength", "0.3",
               "--out", tmp_path / "plain.png", *FAST)
    assert r.exit_code == 0 and "--denoising-strength with --hires-scale or --init-image (the hires fix is off" \
        in r.stderr
    assert Image.open(tmp_path / "plain.png").size == (256, 256)
    assert_one_line_error(pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--hires-scale", "5",
                                 "--out", tmp_path / "big.png", *FAST), "hires fix: 256x256 x 5.0 is 1280x1280")
    assert not (tmp_path / "big.png").exists()


def test_init_image_img2img_is_recorded_and_remade(run_bundle, tmp_path):
    """--init-image: the image at its own size (or --width x --height), the pass's steps said, A1111's
    Denoising strength recorded; --settings-from remakes it byte for byte with the init image and asks for it
    without; the refusals are one line and write nothing."""
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(photo)
    made = tmp_path / "i2i.png"
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--init-image", photo, "--steps", "4",
               "--seed", "3", "--json", "--out", made)
    assert r.exit_code == 0, r.output
    assert f"img2img: {photo} (320x256), denoising strength 0.75: 4 steps from step 1 of 4" in r.stderr
    assert re.search(r"time: VAE encoder \d+\.\d\d s, text encoder", r.stderr)
    assert Image.open(made).size == (320, 256)
    p = parse_parameters(read_parameters(Image.open(made)))
    assert (p["Denoising strength"], p["Steps"], p["Size"]) == ("0.75", "4", "320x256") and "Hires upscale" not in p
    run = json.loads(r.stdout)
    assert run["settings"]["img2img"]["denoising_strength"] == 0.75 and run["config"]["init_image"] == str(photo)
    again = tmp_path / "again.png"
    r = pm_run("--engine", run_bundle, "--settings-from", made, "--init-image", photo, "--out", again)
    assert r.exit_code == 0 and again.read_bytes() == made.read_bytes(), r.output
    assert "img2img at denoising strength 0.75" in r.stderr
    assert_one_line_error(pm_run("--engine", run_bundle, "--settings-from", made, "--out", tmp_path / "no.png"),
                          "was made by img2img (a Denoising strength without a hires fix): give its init image")
    r = pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", "--init-image", photo, "--steps", "4",
               "--seed", "3", "--width", "256", "--height", "256", "--denoising-strength", "0.5", "--out",
               tmp_path / "small.png")
    assert r.exit_code == 0 and "(320x256, resized to 256x256), denoising strength 0.5: 3 steps from step 2 of 4" \
        in r.stderr, r.output
    assert Image.open(tmp_path / "small.png").size == (256, 256)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    for args, needle in [
        (["--init-image", tmp_path / "odd.png"], "init image odd.png is 300x200: "),
        (["--init-image", tmp_path / "none.png"], "init image not found"),
        (["--init-image", photo, "--hires-scale", "1.5"], "--init-image (img2img) and --hires-scale do not go together"),
    ]:
        assert_one_line_error(pm_run("--engine", run_bundle, "--prompt", PROMPT, "--concept", "alice", *args,
                                     "--steps", "2", "--out", tmp_path / "bad.png"), needle)
    assert not (tmp_path / "bad.png").exists()


def test_settings_hires_fix_from_automatic1111(tmp_path):
    from pm_runtime.reproduce import parse

    base = ("p\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 12, Size: 512x512, "
            "Denoising strength: 0.45, Hires upscale: 2, Hires steps: 15, Hires upscaler: Latent, Version: v1.10.1")
    s = parse(base, tmp_path / "x")
    assert {k: s.values[k] for k in ("hires_scale", "hires_steps", "denoising_strength", "hires_upscaler")} == \
        {"hires_scale": 2.0, "hires_steps": 15, "denoising_strength": 0.45, "hires_upscaler": "latent"}
    assert s.ignored == () and "hires fix x2.0" in s.describe()
    img2img = parse(base.replace("Hires upscale: 2, Hires steps: 15, Hires upscaler: Latent, ", ""), tmp_path / "x")
    assert "hires_scale" not in img2img.values and img2img.ignored == ()  # an img2img image: its init image needed
    assert img2img.values["img2img"] and img2img.values["denoising_strength"] == 0.45
    assert "img2img at denoising strength 0.45" in img2img.describe() and "img2img" not in img2img.generate_kwargs()
    esrgan = base.replace("Hires upscaler: Latent", "Hires upscaler: R-ESRGAN 4x+")
    with pytest.raises(UserError, match=r"upscaled with 'R-ESRGAN 4x\+'; pm-run has Latent, .*Lanczos, Nearest: give --hires-upscaler"):
        parse(esrgan, tmp_path / "x")
    assert parse(esrgan, tmp_path / "x", given={"hires_upscaler"}).values["hires_scale"] == 2.0
    lanczos = base.replace("Hires upscaler: Latent", "Hires upscaler: Lanczos")
    assert parse(lanczos, tmp_path / "x").values["hires_upscaler"] == "lanczos"
    with pytest.raises(UserError, match="resized to 1024x768 .* give --hires-scale"):
        parse(base.replace("Hires upscale: 2", "Hires resize: 1024x768"), tmp_path / "x")
    with pytest.raises(UserError, match="Hires upscale 'x2' is not a number"):
        parse(base.replace("Hires upscale: 2", "Hires upscale: x2"), tmp_path / "x")
    # the pass's own sampler / schedule type / guidance: what differs from the first pass's, as A1111 reads them
    for extra, scheduler in ((", Hires sampler: Euler a", "euler-a-karras"),
                             (", Hires schedule type: SGM Uniform", "dpmpp-2m-sgm-uniform"),
                             (", Hires sampler: Euler, Hires schedule type: Uniform", "euler")):
        s = parse(base + extra + ", Hires CFG Scale: 5", tmp_path / "x")
        assert (s.values["hires_scheduler"], s.values["hires_guidance"], s.ignored) == (scheduler, 5.0, ()), extra
    assert "hires_scheduler" not in parse(base + ", Hires schedule type: Karras", tmp_path / "x").values


def test_every_scheduler_pair_of_a_hires_image_reads_back(tmp_path):
    """Whatever the first pass's scheduler (its schedule type in its sampler's name or apart), the hires pass's
    written as pm-run writes it reads back as itself: every pair of pm-run's schedulers."""
    import itertools

    from pm_runtime.png import parameters_text, sampler_fields, split_sampler
    from pm_runtime.reproduce import parse
    from pm_runtime.schedulers import SCHEDULERS

    for first, second in itertools.permutations(SCHEDULERS, 2):
        sampler, schedule = split_sampler(second)
        p = {"Steps": 4, **sampler_fields(first), "Seed": 1, "Size": "512x512", "Denoising strength": 0.5,
             "Hires upscale": 1.5, "Hires upscaler": "Latent", "Hires sampler": sampler,
             "Hires schedule type": schedule or "Uniform"}
        v = parse(parameters_text("x", "", p), tmp_path / "x").values
        assert (v["scheduler"], v["hires_scheduler"]) == (first, second)
