"""pm_runtime.pipeline on the tiny model (CPU): backends against the PyTorch reference and diffusers,
the stage schedule as the UNet receives it, concept switching, determinism, threads, NaN checks.

One fp32 bundle (+ a second concept re-baked from another photo) is exported once per session
(`run_bundle` in conftest.py, shared with tests/test_run_cli.py and tests/test_torch_cuda.py).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from unittest import mock

import numpy as np
import pytest

from conftest import psnr, slow_unless
from pm_runtime import noise
from pm_runtime.backends.base import CheckedNetwork
from pm_runtime.errors import UserError
from pm_runtime.pipeline import Cancelled, NonFiniteError, Pipeline
from pm_runtime.specs import TEXT_ENCODER, UNET, VAE_DECODER
from pm_runtime.stages import SUPER_CLASS, Context

PROMPT = "a photo of <persona> as a knight"
SIDE = 256  # the engines' smallest size (latent 32x32)


# ---------------------------------------------------------------- shared fixtures and helpers
@pytest.fixture(scope="session")
def ort_pipe(run_bundle):
    return Pipeline.load(run_bundle, backend="onnxruntime", concept="alice")


@pytest.fixture(scope="session")
def torch_pipe(run_bundle, tiny_model):
    return Pipeline.load(run_bundle, backend="torch", model=tiny_model, concept="alice")


@pytest.fixture(scope="session")
def reference(tiny_model, trained_concept):
    from pm_runtime.train.reference import load_reference

    return load_reference(tiny_model, trained_concept)


def final_latents(calls) -> np.ndarray:
    return np.concatenate([i["latent"] for name, i, _ in calls if name == VAE_DECODER])


def latents(seed=233, n=1):
    return noise.initial_latents(seed, (n, 4, SIDE // 8, SIDE // 8))


@contextlib.contextmanager
def project_noise_in_diffusers(seed, steps, shape):
    """diffusers' Euler ancestral and DPM-Solver++ SDE draw their noise with randn_tensor: feed them the
    project's noise."""
    import torch
    from diffusers.schedulers import scheduling_dpmsolver_multistep as dpm
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea

    draws = iter(torch.from_numpy(noise.step_noise(seed, i, shape)) for i in range(steps))

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        return next(draws).to(dtype)

    with mock.patch.object(ea, "randn_tensor", randn), mock.patch.object(dpm, "randn_tensor", randn):
        yield


# ---------------------------------------------------------------- the torch line
def test_runtime_runs_with_torch_blocked(run_bundle):
    """The onnxruntime path imports no torch/diffusers/transformers, and runs a whole image."""
    code = f"""
import sys
for name in ('torch', 'diffusers', 'transformers'):
    sys.modules[name] = None  # any import of these now fails
import pm_runtime.pipeline, pm_runtime.cli, pm_runtime.png, pm_runtime.prompt_encoding
import pm_runtime.backends.base, pm_runtime.backends.onnxruntime, pm_runtime.backends.tensorrt
from pm_runtime.pipeline import Pipeline
r = Pipeline.load({str(run_bundle)!r}, concept='alice').generate({PROMPT!r}, seed=1, steps=2, height=256, width=256)
assert r.images.shape == (1, 256, 256, 3)
print('ok', r.backend.split()[0])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["ok", "onnxruntime"], r.stderr


# ---------------------------------------------------------------- parity
def test_onnxruntime_matches_reference_psnr(ort_pipe, reference, calls):
    lat = latents()
    got = ort_pipe.generate(PROMPT, latents=lat, steps=8, scheduler="dpmpp-2m")
    want = reference.generate(PROMPT, latents=lat, steps=8, height=SIDE, width=SIDE, scheduler="dpmpp-2m")
    value = psnr(got.images, want)
    print(f"PSNR onnxruntime fp32 vs PyTorch reference (DPM++ 2M, 8 steps, concept prompt): {value:.1f} dB")
    assert value >= 40.0
    assert got.uses_concept and sum(c.is_concept for c in set(got.plan)) >= 2


# every scheduler on onnxruntime; on torch (the same host loop, other networks) the solvers with every kind of
# step term (history: dpmpp-2m; noise: euler-a; both: the SDE), the others with -m slow. A1111's schedule types:
# only their tables differ (the loop's arithmetic is the others'), one backend
@pytest.mark.parametrize("backend, scheduler", slow_unless([
    *((backend, scheduler) for backend in ("onnxruntime", "torch")
      for scheduler in ("dpmpp-2m", "ddim", "euler", "euler-a", "dpmpp-2m-karras", "euler-karras", "dpmpp-2m-sde-karras",
                        "euler-beta", "dpmpp-2m-sde-beta")),
    ("onnxruntime", "dpmpp-2m-sgm-uniform"), ("onnxruntime", "euler-kl-optimal")],
    lambda backend, scheduler: backend == "onnxruntime" or scheduler in ("dpmpp-2m", "euler-a", "dpmpp-2m-sde-karras")))
def test_each_scheduler_in_the_loop_matches_diffusers(backend, scheduler, ort_pipe, torch_pipe, reference, calls):
    """The pure schedulers in the real loop vs the reference generator, which steps with diffusers'
    scheduler classes (euler-a, the -sde ones: fed the project's per-step noise)."""
    pipe = ort_pipe if backend == "onnxruntime" else torch_pipe
    lat, steps, seed = latents(7), 6, 11
    with project_noise_in_diffusers(seed, steps, lat.shape):
        want = reference.generate(PROMPT, latents=lat, steps=steps, height=SIDE, width=SIDE, scheduler=scheduler,
                                  output="latents")
    pipe.generate(PROMPT, latents=lat, seed=seed, steps=steps, scheduler=scheduler)
    got = final_latents(calls)
    # measured: torch <= 1.2e-4, onnxruntime <= 1.9e-4 on latents of magnitude ~60-70
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_plain_prompt_on_torch_backend_matches_diffusers_pipeline(torch_pipe, tiny_model, calls):
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from pm_runtime.train.templates import NEGATIVE_PROMPT

    lat = latents(3)
    prompt = "a photo of a face on a beach"
    torch_pipe.generate(prompt, latents=lat, steps=10, allow_no_concept=True)
    got = final_latents(calls)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(prompt, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=10, guidance_scale=8.0,
                latents=torch.from_numpy(lat), height=SIDE, width=SIDE, output_type="latent").images.numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("scheduler, diffusers_class", [("dpmpp-2m", "DPMSolverMultistepScheduler"),
                                                       ("euler", "EulerDiscreteScheduler")])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch-cuda"])
def test_v_prediction_model_matches_diffusers_pipeline(run_bundle, tiny_model, tmp_path, calls, monkeypatch, backend,
                                                       scheduler, diffusers_class):
    """An SD-2-style model (the UNet predicts v): the bundle's scheduler config says so and the whole loop
    (host loop on onnxruntime; torch-cuda's one affine step, on the CPU) reads the UNet output as v, as
    diffusers' StableDiffusionPipeline does with the same folder. The networks are the tiny model's (the
    prediction type is the scheduler config's alone, which pm-export copies verbatim from the model folder), so
    the bundle is a copy with its config changed."""
    import importlib
    import json
    import shutil

    import diffusers
    import torch
    from diffusers import StableDiffusionPipeline

    from pm_runtime import formats as F
    from pm_runtime.bundle import write_manifest
    from pm_runtime.train.templates import NEGATIVE_PROMPT

    model = shutil.copytree(tiny_model, tmp_path / "model-v")
    config_file = model / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    bundle = shutil.copytree(run_bundle, tmp_path / "bundle-v")
    manifest = json.loads((bundle / F.BUNDLE_MANIFEST).read_text())
    manifest[F.BK_SCHEDULER]["prediction_type"] = "v_prediction"
    manifest[F.BK_BASE_MODEL][F.BM_PREDICTION_TYPE] = "v_prediction"
    write_manifest(bundle, manifest)

    lat, steps, prompt = latents(5), 6, "a photo of a face on a beach"
    options = {"device": "cpu", "dtype": "float32"} if backend == "torch-cuda" else {}
    if backend == "torch-cuda":  # its kernels' PyTorch references: the Triton interpreter would take minutes
        monkeypatch.setattr(importlib.import_module("pm_kernels._dispatch"), "_ENABLED", False)
    with Pipeline.load(bundle, backend=backend, concept="alice", **options) as pipe:
        got = pipe.generate(prompt, latents=lat, steps=steps, scheduler=scheduler, allow_no_concept=True).images
    ref = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    ref.scheduler = getattr(diffusers, diffusers_class).from_config(ref.scheduler.config)
    assert ref.scheduler.config.prediction_type == "v_prediction"
    ref.set_progress_bar_config(disable=True)
    run = lambda kind: ref(prompt, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=steps, guidance_scale=8.0,  # noqa
                           latents=torch.from_numpy(lat), height=SIDE, width=SIDE, output_type=kind).images
    want = np.round(run("np") * 255)
    if backend == "onnxruntime":  # fp32 networks as diffusers': the final latents too (measured: <= 2.4e-6)
        want_latents = run("latent").numpy()
        assert np.abs(final_latents(calls) - want_latents).max() <= 1e-5 * np.abs(want_latents).max()
        assert np.abs(got - want).max() <= 1  # a rounding step
    else:  # the bundle's fp16 torch weights, run in fp32 (measured: 63 dB, one level at most)
        assert psnr(got, want) >= 50, psnr(got, want)


def test_same_seed_gives_identical_png_bytes(run_bundle):
    a = Pipeline.load(run_bundle, concept="alice").generate(PROMPT, seed=233, steps=3, height=SIDE, width=SIDE)
    b = Pipeline.load(run_bundle, concept="alice").generate(PROMPT, seed=233, steps=3, height=SIDE, width=SIDE)
    assert a.png() == b.png()
    c = Pipeline.load(run_bundle, concept="alice").generate(PROMPT, seed=234, steps=3, height=SIDE, width=SIDE)
    assert not np.array_equal(a.images, c.images)


# ---------------------------------------------------------------- the stage schedule
def expected_plan(timesteps, lo=400, hi=800, late="reuse"):
    out = []
    for t in timesteps:
        if t > hi:
            out.append(SUPER_CLASS)
        elif t >= lo:
            out.append(Context(int(np.floor(t + 0.5))))
        else:
            out.append(out[-1] if late == "reuse" and out else SUPER_CLASS)
    return out


@pytest.mark.parametrize("scheduler,split,spacing", [("dpmpp-2m", (10, 21, 19), "linspace"),
                                                     ("ddim", (10, 20, 20), "leading")])
def test_stage_plan_50_steps(ort_pipe, scheduler, split, spacing):
    tables, plan, stage = ort_pipe.plan(50, scheduler)
    ts = [float(t) for t in tables.timesteps]
    assert stage == (400, 800) and len(plan) == 50
    assert plan == expected_plan(ts)
    n_super = sum(t > 800 for t in ts)
    n_concept = sum(400 <= t <= 800 for t in ts)
    assert (n_super, n_concept, 50 - n_super - n_concept) == split
    assert plan[:10] == [SUPER_CLASS] * 10 and all(c.is_concept for c in plan[10:])
    if spacing == "leading":  # SD 1.5's DDIM: 981, 961, ..., 1 (steps_offset 1)
        assert ts[0] == 981 and ts[-1] == 1
    _, late, _ = ort_pipe.plan(50, scheduler, late_stage="super-class")
    assert late[10 + split[1]:] == [SUPER_CLASS] * split[2]
    _, narrow, stage = ort_pipe.plan(50, scheduler, concept_stage=(500, 700))
    assert stage == (500, 700) and narrow == expected_plan(ts, 500, 700)


def test_unet_receives_the_planned_context_at_every_step(ort_pipe, calls):
    """50 DPM++ steps: ONE text-encoder call; step i's cond rows are exactly the row of plan[i]."""
    r = ort_pipe.generate(PROMPT, seed=5, steps=50, height=SIDE, width=SIDE)
    te = [c for c in calls if c[0] == TEXT_ENCODER]
    unet = [c for c in calls if c[0] == UNET]
    assert len(te) == 1 and len(unet) == 50
    contexts = list(dict.fromkeys(r.plan))
    assert len(contexts) == 22  # 1 super-class + 21 concept rows: "about 22 distinct contexts"
    ids, mask = te[0][1]["input_ids"], te[0][1]["concept_mask"]
    c_k, c_v = te[0][2]["c_k"], te[0][2]["c_v"]
    assert ids.shape[0] == 1 + len(contexts) and not mask[0].any()  # row 0: the negative prompt
    for i, (_, inputs, _) in enumerate(unet):
        row = 1 + contexts.index(r.plan[i])
        assert np.array_equal(inputs["c_k"][0], c_k[0]) and np.array_equal(inputs["c_v"][0], c_v[0])  # uncond
        assert np.array_equal(inputs["c_k"][1], c_k[row]) and np.array_equal(inputs["c_v"][1], c_v[row])
        assert inputs["timestep"][0] == r.timesteps[i]
        assert mask[row].sum() == (4 if r.plan[i].is_concept else 0)


def test_emphasis_weights_the_contexts_the_unet_receives(ort_pipe, calls):
    """AUTOMATIC1111's "(word:1.3)": the text encoder reads the prompt without the syntax; every row the
    UNet receives (both contexts, negative prompt included) is the encoder's row times its tokens' weights,
    scaled back to the row's mean (A1111's formula, computed here on its own); no-norm without the rescale.
    Positions: start, a, photo, of, <persona> (face / 4 placeholders), as, a, knight, end."""
    prompt, negative = "a photo of (<persona>:1.3) as a [knight]", "((ugly))"
    r = ort_pipe.generate(prompt, negative_prompt=negative, seed=5, steps=3, height=SIDE, width=SIDE)
    plain = ort_pipe.generate(PROMPT, negative_prompt="ugly", seed=5, steps=3, height=SIDE, width=SIDE,
                              emphasis="none")
    (_, te_in, te_out), (_, plain_in, _) = [c for c in calls if c[0] == TEXT_ENCODER]
    assert np.array_equal(te_in["input_ids"], plain_in["input_ids"])  # the same words
    unet = [i for name, i, _ in calls if name == UNET][:3]
    contexts = list(dict.fromkeys(r.plan))
    for row in range(1 + len(contexts)):
        concept = row > 0 and contexts[row - 1].is_concept
        w = np.ones(77, np.float32)
        if row == 0:
            w[1] = 1.1 * 1.1  # ugly
        else:
            w[4:8 if concept else 5] = 1.3
            w[10 if concept else 7] = 1 / 1.1
        for name in ("c_k", "c_v"):
            z = te_out[name][row]
            want = z * w[:, None]
            want = want * (z.mean(dtype=np.float64) / want.mean(dtype=np.float64))
            fed = [u[name][1 if row else 0] for i, u in enumerate(unet) if row == 0 or r.plan[i] == contexts[row - 1]]
            assert fed and all(np.allclose(f, want, rtol=1e-5, atol=1e-6) for f in fed), (row, name)
    assert not np.array_equal(r.images, plain.images) and r.settings.emphasis == "original"
    # as AUTOMATIC1111 records them: a mode other than its default, where the prompts hold brackets
    assert "Emphasis" not in r.parameters() and "Emphasis" not in plain.parameters()
    calls.clear()
    nn = ort_pipe.generate(prompt, negative_prompt=negative, seed=5, steps=1, height=SIDE, width=SIDE,
                           emphasis="no-norm")
    assert ", Emphasis: No norm," in nn.parameters()
    te_out, fed = calls[0][2], calls[1][1]
    assert calls[0][0] == TEXT_ENCODER and calls[1][0] == UNET
    w = np.ones(77, np.float32)
    w[1] = 1.1 * 1.1
    assert np.array_equal(fed["c_k"][0], te_out["c_k"][0] * w[:, None])


def test_prompt_editing_and_alternation_switch_the_text_between_steps(ort_pipe, calls):
    """A1111's [from:to:when] and [a|b]: at every step the UNet receives the contexts a plain prompt of
    that step's text gets at the same step (stage context included), on A1111's schedule: sampling step i
    (from 0) takes the first entry ending at or after i, so alternation over 4 steps reads a, a, b, a."""
    kw = dict(seed=5, steps=4, height=SIDE, width=SIDE)
    runs = {}
    for text in ("a photo of <persona> as a [knight|wizard]", "a photo of <persona> as a knight",
                 "a photo of <persona> as a wizard", "a photo of [a man:<persona>:0.5] as a knight",
                 "a photo of a man as a knight"):
        calls.clear()
        allow = "<persona>" not in text
        r = ort_pipe.generate(text, allow_no_concept=allow, **kw)
        runs[text] = (r, [i for name, i, _ in calls if name == UNET], [c for c in calls if c[0] == TEXT_ENCODER])
    alt, knight, wizard = (runs[t][1] for t in ("a photo of <persona> as a [knight|wizard]",
                                                "a photo of <persona> as a knight", "a photo of <persona> as a wizard"))
    for i, want in enumerate((knight, knight, wizard, knight)):
        for name in ("c_k", "c_v"):
            assert np.array_equal(alt[i][name], want[i][name]), (i, name)
    assert not np.array_equal(knight[2]["c_k"], wizard[2]["c_k"])  # the texts differ where they switch
    assert len(runs["a photo of <persona> as a [knight|wizard]"][2][0][1]["input_ids"]) == 1 + 4  # distinct rows
    r = runs["a photo of <persona> as a [knight|wizard]"][0]
    assert r.step_texts == ["a photo of <persona> as a " + w for w in ("knight", "knight", "wizard", "knight")]
    assert r.prompt_schedule() == [{"steps": [1, 2], "text": "a photo of <persona> as a knight"},
                                   {"steps": [3, 3], "text": "a photo of <persona> as a wizard"},
                                   {"steps": [4, 4], "text": "a photo of <persona> as a knight"}]
    assert runs["a photo of <persona> as a knight"][0].step_texts is None
    # [a man:<persona>:0.5]: a man for steps 0-2 (no concept: its super-class version), the concept after
    edit, man = runs["a photo of [a man:<persona>:0.5] as a knight"][1], runs["a photo of a man as a knight"][1]
    for i, want in enumerate((man, man, man, knight)):
        assert np.array_equal(edit[i]["c_k"], want[i]["c_k"]) and np.array_equal(edit[i]["c_v"], want[i]["c_v"]), i
    assert runs["a photo of [a man:<persona>:0.5] as a knight"][0].uses_concept
    with pytest.raises(UserError, match="does not contain the concept word"):  # in no text of the schedule
        ort_pipe.check_prompt("a photo of [a man:a woman:0.5]")
    assert ort_pipe.check_prompt("a photo of [a man:<persona>:0.5]") == []
    with pytest.raises(UserError, match="leaves the concept word <persona> out of every step's text over 50 steps"):
        ort_pipe.check_prompt("a photo of [<persona>::0]")
    # scheduled over the steps given: 1% of 50 steps is step 0 (never the concept), of 200 steps step 2
    with pytest.raises(UserError, match="over 50 steps"):
        ort_pipe.check_prompt("a photo of [<persona>:a face:0.01]")
    assert ort_pipe.check_prompt("a photo of [<persona>:a face:0.01]", steps=200) == []
    assert ort_pipe.check_prompt(PROMPT, negative_prompt="[ugly:blurry:0.5]") == []  # scheduled too (below)
    calls.clear()  # emphasis "none": the prompt as plain text, brackets and all
    ort_pipe.generate("a photo of <persona> as a [knight|wizard]", emphasis="none", **kw)
    te = [c for c in calls if c[0] == TEXT_ENCODER][0]
    assert len(te[1]["input_ids"]) == 1 + 3  # one text: a super-class and two concept contexts


def test_text_encoder_batches_beyond_the_engine_limit(ort_pipe, calls):
    """More contexts than the text encoder's max batch (64): chunked, same values as one by one."""
    from pm_runtime.prompt_encoding import encode_prompt

    p = ort_pipe
    enc = encode_prompt(p.tokenizer, PROMPT, p.concept.words)
    neg = encode_prompt(p.tokenizer, "ugly", None)  # the negative prompt's row: its plain version
    contexts = [SUPER_CLASS] + [Context(t) for t in range(400, 470)]
    with p.backend.network(TEXT_ENCODER) as te:
        c_k, c_v, chunks = p._encode(te, [(neg, SUPER_CLASS), *((enc, c) for c in contexts)])
        single_k, single_v, _ = p._encode(te, [(neg, SUPER_CLASS), (enc, Context(469))])
    assert c_k.shape[0] == 72 and chunks == [1] * 72 and [len(i["input_ids"]) for n, i, _ in calls[:2]] == [64, 8]
    assert np.abs(c_k[-1] - single_k[-1]).max() <= 1e-5 and np.abs(c_v[-1] - single_v[-1]).max() <= 1e-5


# ---------------------------------------------------------------- long prompts (A1111's chunks)
LONG = PROMPT + ", " + "photo " * 90  # the concept version: 2 chunks


def test_a_long_prompt_reaches_the_unet_as_its_chunks_one_after_the_other(ort_pipe, calls):
    """Each chunk of 75 tokens is its own text-encoder row (start, end, padding: 77 positions); the UNet
    reads a row's chunks one after the other, the rows of one call repeated to a common length (the
    negative prompt's one chunk twice beside the prompt's two). Nothing is cut off."""
    from pm_runtime.prompt_encoding import encode_prompt, encode_text

    p = ort_pipe
    assert p.max_chunks == 4 and p.dims.context_chunks == 12
    neg = "ugly"
    g = p.generate(LONG, negative_prompt=neg, seed=3, steps=2, height=SIDE, width=SIDE, scheduler="euler")
    assert not g.warnings
    enc = encode_prompt(p.tokenizer, LONG, p.concept.words, 77, max_chunks=4)
    assert len(enc.concept_ids) == 2 * 77 and len(enc.super_ids) == 2 * 77
    (te_in, te_out), = [(i, o) for n, i, o in calls if n == TEXT_ENCODER]
    rows = list(dict.fromkeys(g.plan))  # the distinct contexts, in step order
    want_ids = np.concatenate([encode_text(p.tokenizer, neg, 77)[0],
                               *(enc.concept_ids if c.is_concept else enc.super_ids for c in rows)]).reshape(-1, 77)
    assert np.array_equal(te_in["input_ids"], want_ids)  # the negative prompt's chunk, then 2 per context
    unet = [(i, o) for n, i, o in calls if n == UNET]
    assert len(unet) == 2
    for step, (i, _) in enumerate(unet):
        r = 1 + 2 * rows.index(g.plan[step])  # the step's context's first chunk row
        for key in ("c_k", "c_v"):
            chunks = te_out[key]
            assert i[key].shape == (2, 2 * 77, chunks.shape[-1])
            assert np.array_equal(i[key][0], np.concatenate([chunks[0], chunks[0]]))  # uncond: 1 chunk, twice
            assert np.array_equal(i[key][1], np.concatenate([chunks[r], chunks[r + 1]]))


def test_prompt_editing_pads_the_shorter_texts_with_empty_chunks(ort_pipe, calls):
    """A1111 encodes the texts of a prompt editing schedule as one batch, chunk by chunk: a text with fewer
    chunks gets empty ones (start, end, padding) and the UNet reads them. The same here (each version on
    its own): the short text's rows are its chunk and an empty one."""
    from pm_runtime.prompt_encoding import encode_prompt, encode_text

    p = ort_pipe
    short, long = "a photo of <persona>", "a photo of <persona>, " + "photo " * 90
    g = p.generate(f"[{short}:{long}:0.5]", negative_prompt="ugly", seed=3, steps=4, height=SIDE, width=SIDE,
                   scheduler="euler")
    assert g.step_texts == [short] * 3 + [long] and g.chunks == 2 and not g.warnings
    (te_in, _), = [(i, o) for n, i, o in calls if n == TEXT_ENCODER]
    empty = encode_text(p.tokenizer, "", 77)[0]
    versions = {text: encode_prompt(p.tokenizer, text, p.concept.words, 77, max_chunks=4) for text in (short, long)}
    rows = te_in["input_ids"][1:].reshape(-1, 2 * 77)  # 2 chunks per row after the negative prompt's one
    seen = set()
    for row in rows:
        for text, e in versions.items():
            for version in (e.super_ids, e.concept_ids):
                if np.array_equal(row[:77], version[:77]):
                    assert np.array_equal(row[77:], version[77:] if text == long else empty)
                    seen.add(text)
    assert seen == {short, long}
    assert all(i["c_k"].shape[1] == 2 * 77 for n, i, _ in calls if n == UNET)


def test_prompt_editing_in_the_negative_prompt_switches_the_unconditional_row(ort_pipe, calls):
    """A1111 schedules the negative prompt as it schedules the prompt: its texts are text-encoder rows before
    the prompt's (padded to one chunk count, as the prompt's texts are), and each step's unconditional half
    reads its step's text. The host loop, the device loop (test_device_loop) and torch-cuda
    (test_torch_cuda) take the per-step row."""
    from pm_runtime.prompt_encoding import encode_text

    p = ort_pipe
    kw = dict(seed=3, steps=4, height=SIDE, width=SIDE, scheduler="euler")
    g = p.generate(PROMPT, negative_prompt="[ugly:blurry:0.5]", **kw)
    assert g.negative_step_texts == ["ugly"] * 3 + ["blurry"] and g.step_texts is None and not g.warnings
    assert g.prompt_schedule(negative=True) == [{"steps": [1, 3], "text": "ugly"}, {"steps": [4, 4], "text": "blurry"}]
    (te_in, te_out), = [(i, o) for n, i, o in calls if n == TEXT_ENCODER]
    for r, text in enumerate(("ugly", "blurry")):
        assert np.array_equal(te_in["input_ids"][r], encode_text(p.tokenizer, text, 77)[0])
    unet = [i for n, i, _ in calls if n == UNET]
    for step, i in enumerate(unet):
        r = 0 if step < 3 else 1
        assert np.array_equal(i["c_k"][0], te_out["c_k"][r]) and np.array_equal(i["c_v"][0], te_out["c_v"][r])
        assert not np.array_equal(i["c_k"][1], te_out["c_k"][0])  # the conditional half: the prompt's rows
    fixed = p.generate(PROMPT, negative_prompt="ugly", **kw).images
    assert not np.array_equal(g.images, fixed)
    assert np.array_equal(p.generate(PROMPT, negative_prompt="[ugly:blurry:1.0]", **kw).images, fixed)  # never blurry
    plain = p.generate(PROMPT, negative_prompt="[ugly:blurry:0.5]", emphasis="none", **kw)
    assert plain.negative_step_texts is None  # --emphasis none: the text as it stands


def test_repeated_chunks_give_the_unet_output_of_separate_calls(ort_pipe):
    """Why rows of different lengths may share a UNet call: AUTOMATIC1111 runs the conditional and
    unconditional halves separately when their lengths differ; a context repeated r times (keys and values
    alike) leaves every cross-attention output as it was, so the batched call gives the same noise."""
    rng = np.random.default_rng(0)
    D = ort_pipe.dims.text_dim
    sample = rng.standard_normal((2, 4, SIDE // 8, SIDE // 8)).astype(np.float32)
    t = np.full(2, 500.0, np.float32)
    neg = [rng.standard_normal((1, 2 * 77, D)).astype(np.float32) for _ in range(2)]  # 2 chunks (k, v)
    cond = [rng.standard_normal((1, 3 * 77, D)).astype(np.float32) for _ in range(2)]  # 3 chunks
    with ort_pipe.backend.network(UNET) as unet:
        alone = [unet.run({"sample": sample[i:i + 1], "timestep": t[:1], "c_k": c[0], "c_v": c[1]})["noise_pred"]
                 for i, c in enumerate((neg, cond))]
        tiled = [np.concatenate([np.tile(neg[j], (1, 3, 1)), np.tile(cond[j], (1, 2, 1))]) for j in (0, 1)]  # 6 chunks
        both = unet.run({"sample": sample, "timestep": t, "c_k": tiled[0], "c_v": tiled[1]})["noise_pred"]
        mixed = unet.run({"sample": sample, "timestep": t, "c_k": np.concatenate([cond[0], cond[1]]),
                          "c_v": np.concatenate([cond[1], cond[0]])})["noise_pred"]
        with pytest.raises(ValueError, match="context_length=1001 outside 77..924"):
            unet.run({"sample": sample, "timestep": t, "c_k": np.zeros((2, 1001, D), np.float32),
                      "c_v": np.zeros((2, 1001, D), np.float32)})
    want = np.concatenate(alone)
    assert np.abs(both - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(mixed[1] - want[1]).max() > 1e-3 * np.abs(want).max()  # the contexts do matter


def test_a_bundle_from_before_long_prompts_keeps_one_chunk(run_bundle, tmp_path):
    """A bundle without context_chunks (pm-export before 0.3: its UNet's context was 77 positions): one
    chunk, the end cut off with a warning, BREAK ignored with a warning, as before."""
    import shutil

    from pm_runtime import formats as F
    from pm_runtime.bundle import write_manifest

    bundle = shutil.copytree(run_bundle, tmp_path / "bundle-0.2")
    manifest = json.loads((bundle / F.BUNDLE_MANIFEST).read_text())
    del manifest[F.BK_BASE_MODEL]["context_chunks"]
    write_manifest(bundle, manifest)
    with Pipeline.load(bundle, backend="onnxruntime", concept="alice") as pipe:
        assert pipe.max_chunks == 1 and pipe.specs[UNET].inputs[2].shape[1] == 77
        warnings = pipe.check_prompt("a photo of <persona> BREAK on a beach, " + "photo " * 90)
        assert "uses BREAK" in warnings[0] and "bundles exported by pm-export 0.3 or later take four" in warnings[0]
        assert "over the text encoder's 75" in warnings[1]
        g = pipe.generate(LONG, seed=3, steps=1, height=SIDE, width=SIDE)
        assert "over the text encoder's 75" in g.warnings[0]


# ---------------------------------------------------------------- concepts
def test_use_concept_switches_faces_without_reloading(run_bundle):
    pipe = Pipeline.load(run_bundle, concept="alice")
    a = pipe.generate(PROMPT, seed=9, steps=4, height=SIDE, width=SIDE)
    loads = dict(pipe.backend.loads)
    pipe.use_concept("alice-photo2")
    b = pipe.generate(PROMPT, seed=9, steps=4, height=SIDE, width=SIDE)
    pipe.use_concept(run_bundle / "concepts" / "alice.safetensors")  # a table file works too
    c = pipe.generate(PROMPT, seed=9, steps=4, height=SIDE, width=SIDE)
    assert loads == {TEXT_ENCODER: 1, UNET: 1, VAE_DECODER: 1} and dict(pipe.backend.loads) == loads
    assert not np.array_equal(a.images, b.images) and np.array_equal(a.images, c.images)
    assert b.concept.name == "alice-photo2" and "Concept: alice-photo2" in b.parameters()
    with pytest.raises(UserError, match="no concept 'bob'.*alice, alice-photo2"):
        pipe.use_concept("bob")


def test_several_concepts_need_a_choice(run_bundle):
    pipe = Pipeline.load(run_bundle)  # two concepts: none picked
    assert pipe.concept is None
    with pytest.raises(UserError, match="several concepts"):
        pipe.generate(PROMPT, seed=1, steps=1, height=SIDE, width=SIDE)
    pipe.generate("a photo of a face", seed=1, steps=1, height=SIDE, width=SIDE)  # plain SD works


def test_concept_stage_must_lie_in_the_baked_range(ort_pipe):
    with pytest.raises(UserError, match="inside the baked range 400..800"):
        ort_pipe.generate(PROMPT, seed=1, steps=2, height=SIDE, width=SIDE, concept_stage=(300, 700))
    with pytest.raises(UserError, match="low <= high"):
        ort_pipe.plan(10, concept_stage=(700, 500))


# ---------------------------------------------------------------- API behaviour
def test_concurrent_generate_calls_are_serialised(ort_pipe, monkeypatch):
    """Two threads share one Pipeline: the calls never overlap and give the sequential results."""
    alone = {s: ort_pipe.generate(PROMPT, seed=s, steps=3, height=SIDE, width=SIDE).images for s in (1, 2)}
    guard, active, most, results = threading.Lock(), [0], [0], {}
    inner = ort_pipe._generate

    def tracked(*a, **k):  # the body of generate(), which the lock must keep to one at a time
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return inner(*a, **k)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(ort_pipe, "_generate", tracked)
    start = threading.Barrier(2)

    def work(seed):
        start.wait()
        results[seed] = ort_pipe.generate(PROMPT, seed=seed, steps=3, height=SIDE, width=SIDE).images

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and sorted(results) == [1, 2]
    assert all(np.array_equal(results[s], alone[s]) for s in (1, 2))


def test_callback_and_cancel(ort_pipe):
    seen, stop = [], threading.Event()

    def cb(step, total):
        seen.append((step, total))
        if step == 2:
            stop.set()

    with pytest.raises(Cancelled, match="before step 3 of 5"):
        ort_pipe.generate(PROMPT, seed=1, steps=5, height=SIDE, width=SIDE, callback=cb, cancel=stop)
    assert seen == [(1, 5), (2, 5)]
    ok = ort_pipe.generate(PROMPT, seed=1, steps=2, height=SIDE, width=SIDE, cancel=lambda: False)  # still usable
    assert ok.images.shape == (1, SIDE, SIDE, 3)


@pytest.mark.parametrize("where,stage", [("latents", "initial latents"), (UNET, "denoising loop"),
                                         (VAE_DECODER, "VAE decoder"), (TEXT_ENCODER, "text encoder")])
def test_nan_and_inf_are_caught_and_named(ort_pipe, monkeypatch, where, stage):
    lat = latents()
    if where == "latents":
        lat[0, 0, 0, 0] = np.nan
    else:
        run = CheckedNetwork.run

        def poisoned(self, inputs):
            out = run(self, inputs)
            if self.spec.name == where:
                out = {k: np.full_like(v, np.inf) for k, v in out.items()}
            return out

        monkeypatch.setattr(CheckedNetwork, "run", poisoned)
    with pytest.raises(NonFiniteError, match=f"NaN/inf in the {stage}"):
        ort_pipe.generate(PROMPT, latents=lat, steps=2)


def test_several_images_and_low_memory_mode(run_bundle):
    normal = Pipeline.load(run_bundle, concept="alice")
    low = Pipeline.load(run_bundle, concept="alice", low_memory=True)
    a = normal.generate(PROMPT, seed=4, steps=2, height=SIDE, width=320, num_images=5)  # groups of 4 + 1
    b = low.generate(PROMPT, seed=4, steps=2, height=SIDE, width=320, num_images=5)
    assert a.images.shape == (5, SIDE, 320, 3) and np.array_equal(a.images, b.images)
    low.generate(PROMPT, seed=4, steps=1, height=SIDE, width=SIDE)
    assert dict(low.backend.loads) == {TEXT_ENCODER: 2, UNET: 2, VAE_DECODER: 2} and not low.backend._cache
    one = normal.generate(PROMPT, seed=4, steps=2, height=SIDE, width=320, num_images=1)
    assert np.array_equal(one.images[0], a.images[0])  # image 0 does not depend on the batch


def test_a_pipeline_is_a_context_manager_that_frees_its_engines(run_bundle):
    with Pipeline.load(run_bundle, concept="alice") as pipe:
        a = pipe.generate(PROMPT, seed=4, steps=1, height=SIDE, width=SIDE)
        assert pipe.backend._cache  # engines kept between images
    assert not pipe.backend._cache  # freed on leaving
    b = pipe.generate(PROMPT, seed=4, steps=1, height=SIDE, width=SIDE)  # a later call loads them again
    assert np.array_equal(a.images, b.images)
    with pytest.raises(KeyError), Pipeline.load(run_bundle, concept="alice") as other:
        other.generate(PROMPT, seed=4, steps=1, height=SIDE, width=SIDE)
        assert other.backend._cache
        raise KeyError("the block failed")  # the error goes on; the engines are freed all the same
    assert not other.backend._cache


def test_bad_arguments(ort_pipe):
    g = lambda **k: ort_pipe.generate(PROMPT, **{"seed": 1, "steps": 2, "height": SIDE, "width": SIDE, **k})  # noqa
    with pytest.raises(UserError, match="unsupported size 100x256: .*multiples of 64 from 256 to 1024"):
        g(width=100)
    with pytest.raises(UserError, match="steps must be"):
        g(steps=0)
    with pytest.raises(UserError, match="finite"):
        g(guidance=float("nan"))
    with pytest.raises(UserError, match="unknown scheduler"):
        g(scheduler="pndm")
    with pytest.raises(UserError, match="does not contain the concept word"):
        ort_pipe.generate("a knight", seed=1, steps=1, height=SIDE, width=SIDE)
    with pytest.raises(UserError, match="does not contain the concept word"):  # the same refusal, nothing run
        ort_pipe.check_prompt("a knight")
    assert ort_pipe.check_prompt(PROMPT) == [] and ort_pipe.check_prompt("a knight", allow_no_concept=True) == []
    assert "read as plain text" in ort_pipe.check_prompt(PROMPT, negative_prompt="<persona>, blurry")[0]
    # prompts written for AUTOMATIC1111: a LoRA tag was "two different concept words"; emphasis is weighted,
    # or read as words with emphasis="none"
    with pytest.raises(UserError, match="holds <lora:detail:0.8>: AUTOMATIC1111's LoRA / hypernetwork tags are not"):
        ort_pipe.check_prompt(PROMPT + ", <lora:detail:0.8>")
    assert ort_pipe.check_prompt(PROMPT + ", (smiling:1.2)", negative_prompt="((blurry)), lowres") == []
    said = ort_pipe.check_prompt(PROMPT + ", (smiling:1.2)", negative_prompt="((blurry)), lowres", emphasis="none")
    assert len(said) == 2 and 'prompt uses AUTOMATIC1111\'s emphasis syntax, "(smiling:1.2)"' in said[0]
    assert said[1].startswith('the negative prompt uses AUTOMATIC1111\'s emphasis syntax, "((blurry))"')
    with pytest.raises(UserError, match="emphasis must be one of original, no-norm, ignore, none, got 'strong'"):
        ort_pipe.generate(PROMPT, seed=1, steps=1, height=SIDE, width=SIDE, emphasis="strong")
    with pytest.raises(UserError, match="latents"):
        ort_pipe.generate(PROMPT, latents=np.zeros((1, 3, 32, 32), np.float32), steps=1)
    # the API's own types: a UserError naming the argument, no silent truncation (seed 1.5 ran as 1) or
    # default (num_images=0 gave one image, height=0 a 512 px one)
    for bad, match in ((dict(seed=1.5), "seed must be a whole number, got 1.5"),
                       (dict(height="256"), "height must be a whole number, got '256'"),
                       (dict(width=True), "width must be a whole number"),
                       (dict(num_images=0), "number of images must be >= 1, got 0"),
                       (dict(height=0), "unsupported size 256x0"),
                       (dict(steps=True), "steps must be a whole number, got True"),  # ran one step
                       (dict(guidance="7"), "guidance must be a finite number, got '7'"),  # numpy's TypeError
                       (dict(guidance=None), "guidance must be a finite number, got None"),
                       (dict(concept_stage=(450.5, 700)), "concept stage bounds must be a whole number, got 450.5"),
                       (dict(concept_stage=(500,)), "concept stage must be a pair"),  # ValueError (unpacking)
                       (dict(concept_stage=("400", "800")), "concept stage bounds must be a whole number"),
                       (dict(cancel="yes"), "cancel must be a threading.Event or a callable"),  # at step 1
                       (dict(callback=1), "callback must be a callable"),
                       (dict(allow_no_concept="false"), "allow_no_concept must be True or False")):  # was on
        with pytest.raises(UserError, match=match):
            g(**bad)
    # the switches of load: a string from a config file ("false") switched low memory on, the checker off
    for bad in (dict(low_memory="false"), dict(safety_checker=0), dict(verify="no")):
        with pytest.raises(UserError, match=f"{next(iter(bad))} must be True or False"):
            Pipeline.load(ort_pipe.bundle.root, "onnxruntime", **bad)
    # and its other arguments' types, named (were "'int' object has no attribute 'split'" and the like)
    root = ort_pipe.bundle.root
    for args, kw, match in (((123,), {}, "bundle must be a folder path or a Bundle, got 123"),
                            ((root, None), {}, "backend must be a backend name"),
                            ((root,), {"device": 0}, "device must be a device name"),
                            ((root,), {"concept": 3}, "concept must be a concept name, a table file path, or None"),
                            ((root, "onnxruntime"), {"threads": "2"}, "threads must be a whole number")):
        with pytest.raises(UserError, match=match):
            Pipeline.load(*args, **kw)
    with pytest.raises(UserError, match="concept must be a concept name"):
        ort_pipe.use_concept(["alice"])
    assert ort_pipe.concept.name == "alice"  # unchanged
    for prompt in (None, [PROMPT, PROMPT]):
        with pytest.raises(UserError, match="prompt must be a string .one prompt per call"):
            ort_pipe.generate(prompt, seed=1, steps=1, height=SIDE, width=SIDE)
    # numpy numbers are numbers (steps=np.int64(1) was refused as "not a whole number")
    assert g(seed=np.int64(3), steps=np.int64(1), num_images=np.int32(1), guidance=np.float32(7.5)).images.shape[0] == 1


def test_generation_save(ort_pipe, tmp_path):
    """Generation.save: the format from the name (or fmt), the settings inside, written atomically; a bad
    name, a contradicting fmt, an index outside the batch and a flagged image are UserErrors, nothing written."""
    from PIL import Image

    from pm_runtime.png import read_parameters

    g = ort_pipe.generate(PROMPT, seed=5, steps=1, height=SIDE, width=SIDE, num_images=2)
    assert g.save(tmp_path / "a.png") == tmp_path / "a.png"
    g.save(tmp_path / "b.JPG", 1)
    g.save(tmp_path / "c.bin", 1, fmt="webp")
    a, b, c = (Image.open(tmp_path / n) for n in ("a.png", "b.JPG", "c.bin"))
    assert (a.format, b.format, c.format) == ("PNG", "JPEG", "WEBP")
    assert read_parameters(a) == g.parameters(0) and read_parameters(b) == read_parameters(c) == g.parameters(1)
    assert np.array_equal(np.asarray(a), g.images[0]) and np.array_equal(np.asarray(c), g.images[1])
    g.nsfw = [True, False]  # as the safety checker marks a flagged image (tested in test_safety_checker)
    for args, kw, match in (((tmp_path / "d.bmp",), {}, "cannot tell the format"),
                            ((tmp_path / "d.png",), {"fmt": "jpeg"}, "does not match"),
                            ((tmp_path / "d.png", 2), {}, "outside the 2 image"),
                            ((tmp_path / "d.png", 1.0), {}, "image index must be a whole number"),
                            ((tmp_path / "d.gif",), {"fmt": "gif"}, "unknown image format"),
                            ((tmp_path / "d.png", 0), {}, "flagged by the safety checker")):
        with pytest.raises(UserError, match=match):
            g.save(*args, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.JPG", "c.bin"]  # no temp files either


# ---------------------------------------------------------------- backends
def test_backend_selection(run_bundle):
    from pm_runtime.backends.base import select_backend
    from pm_runtime.bundle import open_bundle

    b = open_bundle(run_bundle)
    cls, why = select_backend(b, "auto")
    assert cls.name == "onnxruntime" and "skipped tensorrt: the bundle has no TensorRT plan" in why
    cls, why = select_backend(b, "auto", prefer="onnxruntime")
    assert cls.name == "onnxruntime"
    with pytest.raises(UserError, match="give --model"):
        select_backend(b, "torch")
    with pytest.raises(UserError, match="onnxruntime-gpu"):
        select_backend(b, "onnxruntime", device="cuda")
    with pytest.raises(UserError, match="not an onnxruntime device"):
        select_backend(b, "onnxruntime", device="tpu")
    with pytest.raises(UserError, match=r"pip install 'personamagic-runtime\[tensorrt\]'|no TensorRT plan"):
        select_backend(b, "tensorrt")


def test_onnxruntime_session_settings(run_bundle):
    from pm_runtime.backends.onnxruntime import OnnxRuntimeBackend
    from pm_runtime.bundle import open_bundle

    be = OnnxRuntimeBackend(open_bundle(run_bundle), threads=1, graph_optimization="basic")
    opts = be.session_options()
    assert opts.intra_op_num_threads == 1 and str(opts.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    with be.network(UNET) as unet:
        assert unet.engine.session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(UserError, match="graph optimisation level"):
        OnnxRuntimeBackend(open_bundle(run_bundle), graph_optimization="max")


def test_tensorrt_plan_refusals():
    from pm_runtime.backends.tensorrt import check_plan

    good = {"tensorrt_version": "10.3.0", "compute_capability": "9.0", "gpu": "NVIDIA H100"}
    check_plan("unet.plan", good, "10.3.0", "9.0")
    with pytest.raises(UserError, match="built with TensorRT 10.3.0; this is TensorRT 10.4.0"):
        check_plan("unet.plan", good, "10.4.0", "9.0")
    with pytest.raises(UserError, match="built for NVIDIA H100 .compute capability 9.0.; this GPU is compute capa"):
        check_plan("unet.plan", good, "10.3.0", "8.6")
    with pytest.raises(UserError, match="does not record"):
        check_plan("unet.plan", {}, "10.3.0", "8.6")


def test_tensorrt_backend_runs(run_bundle):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on this project's machines (not run)")
    from pm_runtime.bundle import open_bundle

    if not any(c["format"] == "tensorrt" for c in open_bundle(run_bundle).components):
        pytest.skip("the test bundle has no TensorRT plans (build them with pm-export --target all on a GPU)")


def test_onnxruntime_optimised_graph_cache(run_bundle, tmp_path):
    """First load writes the optimised graphs; the next Pipeline loads them (optimisation off) and
    makes the same image. A damaged entry is rebuilt."""
    cache = tmp_path / "ort-cache"
    first = Pipeline.load(run_bundle, concept="alice", cache_dir=cache)
    a = first.generate(PROMPT, seed=3, steps=2, height=SIDE, width=SIDE)
    entries = sorted(p for p in cache.iterdir())
    assert len(entries) == 3 and all((e / "model.onnx").is_file() for e in entries) and not first.backend.cache_hits
    second = Pipeline.load(run_bundle, concept="alice", cache_dir=cache)
    b = second.generate(PROMPT, seed=3, steps=2, height=SIDE, width=SIDE)
    assert second.backend.cache_hits == {TEXT_ENCODER: 1, UNET: 1, VAE_DECODER: 1}
    assert np.array_equal(a.images, b.images)
    unet_entry = next(e for e in entries if (e / "model.onnx").stat().st_size > 0 and
                      e.name.startswith(second.bundle.component(UNET)["sha256"][:20]))
    (unet_entry / "model.onnx").write_bytes(b"garbage")
    third = Pipeline.load(run_bundle, concept="alice", cache_dir=cache)
    c = third.generate(PROMPT, seed=3, steps=2, height=SIDE, width=SIDE)
    assert third.backend.cache_hits == {TEXT_ENCODER: 1, VAE_DECODER: 1} and np.array_equal(a.images, c.images)
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("backend", ["torch", "torch-cuda"])
def test_pytorch_backends_warn_of_emulated_16bit_on_the_cpu(run_bundle, tiny_model, monkeypatch, backend):
    """bfloat16 on a CPU without bfloat16 units runs emulated (3.6x slower than fp32 where measured): both
    PyTorch backends say so once when loaded there, and not on a CPU that has the units."""
    pytest.importorskip("torch")
    import warnings

    from pm_runtime import resources

    monkeypatch.setattr(resources, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    options = {"model": tiny_model} if backend == "torch" else {}
    with pytest.warns(UserWarning, match="this CPU shows no bfloat16 units") as seen:
        Pipeline.load(run_bundle, backend=backend, device="cpu", dtype="bfloat16", concept="alice",
                      **options).close()
    assert sum("bfloat16 units" in str(w.message) for w in seen) == 1
    monkeypatch.setattr(resources, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="this CPU shows no")
        Pipeline.load(run_bundle, backend=backend, device="cpu", dtype="bfloat16", concept="alice",
                      **options).close()
