"""pm-train from the command line: a concept file on success; one-line errors and no file on bad input."""

import pickle

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import write_photos
from pm_runtime.train.cli import train_main


def run(args):
    return CliRunner().invoke(train_main, [str(a) for a in args])


def base_args(model, images, out):
    return ["--model", model, "--images", images, "--out", out, "--resolution", 64, "--steps", 2, "--quiet",
            "--device", "cpu"]


def assert_one_line_error(result, needle):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and needle in lines[0], result.output


def test_help_explains_lr():
    r = run(["--help"])
    assert r.exit_code == 0 and "effective 1e-4" in r.output.replace("\n", " ")


def test_train_writes_concept_and_checkpoints(tiny_model, photos, tmp_path):
    out = tmp_path / "c.pt"
    r = run(base_args(tiny_model, photos, out) + ["--steps", 4, "--save-every", 2, "--preview-every", 4])
    assert r.exit_code == 0, r.output
    assert out.is_file() and (tmp_path / "c.step2.pt").is_file() and (tmp_path / "c.preview4.png").is_file()
    assert Image.open(tmp_path / "c.preview4.png").size == (64, 64)
    assert "peak" in r.output and "final loss" in r.output
    assert not list(tmp_path.glob(".*tmp"))
    # resume from the checkpoint to more steps
    r2 = run(base_args(tiny_model, photos, tmp_path / "d.pt") + ["--steps", 5, "--resume", tmp_path / "c.step2.pt"])
    assert r2.exit_code == 0 and "steps 2->5" in r2.output, r2.output


def test_interrupt_names_the_checkpoint_to_resume_from(tiny_model, photos, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) during training: exit 130, the last checkpoint named (and it resumes),
    or, before the first one, no claim that one exists; the final concept is not written."""
    from pm_runtime.train.trainer import Trainer

    step = Trainer.optimizer_step

    def interrupted_at_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "optimizer_step", interrupted_at_3)
    out = tmp_path / "c.pt"
    r = run(base_args(tiny_model, photos, out) + ["--steps", 6, "--save-every", 2])
    assert r.exit_code == 130 and f"interrupted; resume with --resume {tmp_path / 'c.step2.pt'}" in r.output, r.output
    assert not out.exists() and (tmp_path / "c.step2.pt").is_file()
    r = run(base_args(tiny_model, photos, tmp_path / "d.pt") + ["--steps", 6])
    assert r.exit_code == 130 and "interrupted before this run wrote a checkpoint" in r.output, r.output
    monkeypatch.setattr(Trainer, "optimizer_step", step)
    r = run(base_args(tiny_model, photos, out) + ["--steps", 4, "--resume", tmp_path / "c.step2.pt"])
    assert r.exit_code == 0 and "steps 2->4" in r.output and out.is_file(), r.output


def test_full_disk_says_what_survives(tiny_model, photos, tmp_path, monkeypatch):
    """ENOSPC when a checkpoint or the concept is written: one line naming the file, what was lost and the
    last checkpoint to resume from; no temporary file left."""
    import errno
    import os

    fsync, calls = os.fsync, []

    def full_after(n):
        def fake(fd):
            calls.append(fd)
            if len(calls) > n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return fsync(fd)
        return fake

    monkeypatch.setattr(os, "fsync", full_after(1))  # step 2's checkpoint fits, step 4's does not
    r = run(base_args(tiny_model, photos, tmp_path / "c.pt") + ["--steps", 6, "--save-every", 2])
    assert_one_line_error(r, f"cannot write {tmp_path / 'c.step4.pt'}: No space left on device (the last "
                             f"checkpoint is {tmp_path / 'c.step2.pt'}: --resume it)")
    calls.clear()
    monkeypatch.setattr(os, "fsync", full_after(0))
    r = run(base_args(tiny_model, photos, tmp_path / "d.pt"))
    assert_one_line_error(r, "d.pt: No space left on device; the trained concept was NOT saved")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.step2.pt"]

@pytest.mark.parametrize("case", ["missing", "empty", "all-unreadable"])
def test_bad_image_folders(tiny_model, tmp_path, case):
    images = tmp_path / "imgs"
    if case != "missing":
        images.mkdir()
    if case == "all-unreadable":
        (images / "x.png").write_bytes(b"junk")
    out = tmp_path / "c.pt"
    r = run(base_args(tiny_model, images, out))
    assert_one_line_error(r, {"missing": "not found", "empty": "no images", "all-unreadable": "no usable"}[case])
    assert not out.exists()


def test_multi_token_super_class(tiny_model, photos, tmp_path):
    r = run(base_args(tiny_model, photos, tmp_path / "c.pt") + ["--super-class", "xyzzyplugh"])
    assert_one_line_error(r, "must be exactly one")
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("bad, needle", [
    (["--lr", "-1"], "--lr must be a positive number"), (["--lr", "nan"], "--lr must be a positive number"),
    (["--lr", "0"], "--lr must be a positive number"), (["--seed", "-1"], "--seed must be >= 0"),
    (["--save-every", "-1"], "--save-every must be >= 0"), (["--preview-every", "-2"], "--preview-every must be >= 0"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1")])
def test_bad_numbers_are_one_line_errors(tiny_model, photos, tmp_path, bad, needle):
    """Checked before anything loads: a negative learning rate or seed was a traceback from AdamW / numpy."""
    r = run(base_args(tiny_model, photos, tmp_path / "c.pt") + bad)
    assert_one_line_error(r, needle)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("word", ["face", "", "<my persona>", "<|endoftext|>", "<a><b>"])
def test_concept_word_must_be_a_bracketed_name(tiny_model, photos, tmp_path, word):
    """Checked before anything loads: "" reached pm-run's prompt.split("") (a ValueError) after training, and a
    plain word such as "face" was cut out of "surface" too."""
    r = run(base_args(tiny_model, photos, tmp_path / "c.pt") + ["--concept-word", word])
    assert_one_line_error(r, "--concept-word must be a name in angle brackets")
    assert not list(tmp_path.iterdir())


def test_not_an_sd_folder(photos, tmp_path):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    r = run(base_args(tmp_path / "m", photos, tmp_path / "c.pt"))
    assert_one_line_error(r, "not a Stable Diffusion diffusers folder")


def test_no_image_encoder(tiny_model, photos, tmp_path):
    import shutil

    model = tmp_path / "noenc"
    shutil.copytree(tiny_model, model)
    shutil.rmtree(model / "image_encoder")
    r = run(base_args(model, photos, tmp_path / "c.pt"))
    assert_one_line_error(r, "--image-encoder")
    r2 = run(base_args(model, photos, tmp_path / "c.pt") + ["--image-encoder", tiny_model / "image_encoder"])
    assert r2.exit_code == 0, r2.output


def test_resume_refuses_pickled_code(tiny_model, photos, tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil.write_bytes(pickle.dumps({"format": Boom()}))
    r = run(base_args(tiny_model, photos, tmp_path / "c.pt") + ["--resume", evil])
    assert_one_line_error(r, "not a concept file")
    assert not marker.exists() and not (tmp_path / "c.pt").exists()


def test_empty_mask_refused(tiny_model, tmp_path):
    images = write_photos(tmp_path / "imgs", n=1)
    (images / "mask").mkdir()
    Image.fromarray(np.zeros((72, 80), np.uint8)).save(images / "mask" / "photo0.png")
    r = run(base_args(tiny_model, images, tmp_path / "c.pt"))
    assert_one_line_error(r, "empty")


def test_out_is_a_folder(tiny_model, photos, tmp_path):
    r = run(base_args(tiny_model, photos, tmp_path))
    assert_one_line_error(r, "is a folder")
    photo = tmp_path / "photo.png"  # an existing file that is not a concept file is never overwritten
    photo.write_bytes((photos / "photo0.png").read_bytes())
    r = run(base_args(tiny_model, photos, photo))
    assert_one_line_error(r, "exists and is not a concept file; refusing to overwrite it")
    assert photo.read_bytes() == (photos / "photo0.png").read_bytes()


def test_bf16_training_with_preview(tiny_model, photos, tmp_path):
    # the frozen networks run in bf16 while the VAE stays fp32: the preview decode must cast
    out = tmp_path / "c.pt"
    r = run(base_args(tiny_model, photos, out) + ["--precision", "bf16", "--steps", 1, "--preview-every", 1])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c.preview1.png").is_file()


def test_missing_mask_dir(tiny_model, photos, tmp_path):
    r = run(base_args(tiny_model, photos, tmp_path / "c.pt") + ["--mask-dir", tmp_path / "nope"])
    assert_one_line_error(r, "--mask-dir not found")
    assert not (tmp_path / "c.pt").exists()


def test_resume_refuses_junk_file(tiny_model, photos, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello")
    r = run(base_args(tiny_model, photos, tmp_path / "c.pt") + ["--resume", junk])
    assert_one_line_error(r, "not a concept file")
