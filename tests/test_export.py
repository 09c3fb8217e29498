"""pm-export on the tiny model (CPU): baked tables, each ONNX part vs PyTorch, bundles, bad input.

Two bundles are exported once per session through the command line and shared: fp32 (graphs
inline) and fp16 (every graph forced into ONNX external data, written with --force over a copy
of the fp32 bundle, which exercises the replace-in-place path).
"""

import pickle
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from pm_export.cli import main
from pm_runtime import formats as F
from pm_runtime.bundle import open_bundle, sha256_file
from pm_runtime.specs import NETWORKS, STEP, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, needle):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and needle in lines[0], result.output


def no_temp_folders(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]


@pytest.fixture(scope="session")
def bundle_fp32(default_export):
    out, output = default_export
    assert "validated unet fp32" in output and "[6/6]" in output
    return out


@pytest.fixture(scope="session")
def bundle_fp16(bundle_fp32, tiny_model, trained_concept, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles16") / "fp16"
    shutil.copytree(bundle_fp32, out)  # replaced by --force
    r = run([trained_concept, "--model", tiny_model, "--out", out, "--precision", "fp16", "--external-data",
             "always", "--force", "--name", "alice16"])
    assert r.exit_code == 0, r.output
    assert no_temp_folders(out.parent)
    return out


@pytest.fixture(scope="session")
def torch_graphs(tiny_model):
    from pm_runtime.modeling.graphs import graph_modules, model_dims
    from pm_runtime.modeling.loading import load_base_model
    from pm_runtime.specs import network_specs

    base = load_base_model(tiny_model)
    return base, network_specs(model_dims(base)), graph_modules(base)


@pytest.fixture(scope="session")
def concept(trained_concept):
    from pm_runtime.train.concept_file import load_concept

    return load_concept(trained_concept)


# ---------------------------------------------------------------- tables
def test_table_equals_mapper(bundle_fp32, concept, trained_concept):
    b = open_bundle(bundle_fp32)
    table = b.load_concept(trained_concept.stem)
    assert (table.stage_lo, table.stage_hi) == concept.stage == (400, 800)
    assert table.E.shape == (401, concept.num_tokens, 32)
    assert table.fingerprint == concept.fingerprint == b.fingerprint
    assert table.reference_sha256 == concept.reference_sha256
    assert table.source_sha256 == sha256_file(trained_concept)
    assert list(table.placeholder_tokens) == concept.raw[F.K_TOKENS]["placeholder_tokens"]
    with torch.no_grad():
        t = torch.arange(400, 801, dtype=torch.float32)
        E, B = concept.mapper(t, concept.reference_embedding[None].expand(len(t), -1))
        assert np.abs(table.E - E.numpy()).max() <= 1e-6 and np.abs(table.B - B.numpy()).max() <= 1e-6
        for tt in (400, 401, 599, 800):  # single-row calls, as the reference generator makes them
            e, bb = concept.mapper(torch.tensor([float(tt)]), concept.reference_embedding[None])
            row_e, row_b = table.row(tt)
            assert np.abs(row_e - e[0].numpy()).max() <= 1e-6 and np.abs(row_b - bb[0].numpy()).max() <= 1e-6


def test_rebake_with_another_photo_changes_b_not_e(bundle_fp32, concept, trained_concept, photos, tiny_model,
                                                   tmp_path):
    from pm_export.bake import bake_table, embed_reference_photo

    same = embed_reference_photo(concept, photos / "photo0.png", tiny_model / "image_encoder", print)
    assert torch.allclose(same.embedding, concept.reference_embedding, atol=1e-5)  # computed like the trainer
    b = shutil.copytree(bundle_fp32, tmp_path / "b")
    r = run([trained_concept, "--bundle", b, "--name", "other-photo",
             "--reference-image", photos / "photo2.png", "--image-encoder", tiny_model / "image_encoder"])
    assert r.exit_code == 0, r.output
    bundle = open_bundle(b)
    old, new = bundle.load_concept("alice"), bundle.load_concept("other-photo")
    assert np.array_equal(old.E, new.E)
    assert np.abs(old.B - new.B).max() > 1e-3
    assert new.reference_name == "photo2.png" and new.reference_sha256 != old.reference_sha256
    want = bake_table(concept, embed_reference_photo(concept, photos / "photo2.png", tiny_model / "image_encoder",
                                                     print))
    assert np.abs(new.B - want.B).max() <= 1e-6


# ---------------------------------------------------------------- networks
@pytest.mark.parametrize("net", [*NETWORKS, VAE_ENCODER])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_parts_match_pytorch(net, precision, bundle_fp32, bundle_fp16, torch_graphs):
    from pm_export.validate import TOLERANCES, compare

    root = bundle_fp32 if precision == "fp32" else bundle_fp16
    comp = open_bundle(root).component(net)
    precision = "fp32" if net == VAE_ENCODER else precision  # the optional encoder is fp32 in every bundle
    assert comp[F.CK_PRECISION] == precision
    assert comp[F.CK_VALIDATION] and all(v["passed"] for v in comp[F.CK_VALIDATION])
    _, specs, modules = torch_graphs
    checks = compare(modules[net], specs[net], root / comp[F.CK_FILE], precision, seed=99)  # fresh inputs
    atol, _ = TOLERANCES[precision]
    for c in checks:
        assert c.ok, c.describe()
        if precision == "fp32":
            assert c.max_abs <= atol, c.describe()  # tight: measured <= 6e-6 on the tiny model


def test_fp16_bundle_layout(bundle_fp16):
    b = open_bundle(bundle_fp16)
    assert [c[F.CK_NAME] for c in b.components] == [*NETWORKS, VAE_ENCODER, STEP]
    step = b.component(STEP)  # the loop's guidance + scheduler update stays fp32 in an fp16 bundle (a few KB)
    assert step[F.CK_PRECISION] == "fp32" and step[F.CK_DATA_FILES] == []
    encoder = b.component(VAE_ENCODER)  # img2img's encoder: fp32 in every bundle (one call per image)
    assert encoder[F.CK_PRECISION] == "fp32" and encoder[F.CK_DETAILS]["optional"]
    for c in b.components[:len(NETWORKS)]:
        assert [d[F.FK_FILE] for d in c[F.CK_DATA_FILES]] == [c[F.CK_FILE] + ".data"]  # forced external data
        assert c[F.CK_DETAILS]["fp32_ops"]  # blocked ops recorded
        assert {v["precision"] for v in c[F.CK_VALIDATION]} == {"fp32", "fp16"}
    unet = b.component(UNET)
    assert unet[F.CK_DETAILS]["fp32_ops"].get("Sin") == 1 and unet[F.CK_DETAILS]["fp32_timestep_path_nodes"] > 0
    assert [c[F.QK_NAME] for c in b.concepts] == ["alice16"]  # the fp32 copy it replaced is gone


def test_batched_text_encoder_equals_single_calls_and_pytorch(bundle_fp32, tiny_model, concept, torch_graphs):
    """23 contexts in ONE call (negative prompt + super-class and concept contexts) == 23 calls."""
    from transformers import CLIPTokenizer

    from pm_export.validate import ort_session
    from pm_runtime.modeling.loading import add_placeholder_tokens, load_base_model
    from pm_runtime.modeling.text_encoder import EquilibriumTextEncoder, scatter_concept
    from pm_runtime.train.templates import NEGATIVE_PROMPT

    b = open_bundle(bundle_fp32)
    table = b.load_concept("alice")
    tok = CLIPTokenizer.from_pretrained(b.tokenizer_dir, local_files_only=True)
    tok.add_tokens(list(table.placeholder_tokens))
    ph_ids = tok.convert_tokens_to_ids(list(table.placeholder_tokens))
    concept_text = " ".join(table.placeholder_tokens)
    texts, ts = [NEGATIVE_PROMPT], [None]
    for i in range(22):
        if i % 3 == 0:
            texts.append(f"a photo of a {table.super_class} wearing a hat")
            ts.append(None)
        else:
            texts.append(f"a photo of {concept_text} on the beach")
            ts.append(400 + 19 * i)
    ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    n, D = len(texts), table.dim
    embeds, bypass = np.zeros((n, 77, D), np.float32), np.zeros((n, 77, D), np.float32)
    mask = np.isin(ids, ph_ids)
    for r, t in enumerate(ts):
        if t is not None:
            E, B = table.row(t)
            for k, pid in enumerate(ph_ids):
                embeds[r][ids[r] == pid], bypass[r][ids[r] == pid] = E[k], B[k]
    assert mask.sum() == 4 * sum(t is not None for t in ts) and n == 23
    feeds = {"input_ids": ids.astype(np.int64), "concept_embeds": embeds, "bypass": bypass, "concept_mask": mask}
    sess = ort_session(b.component_path(TEXT_ENCODER))
    c_k, c_v = sess.run(None, feeds)
    for r in range(n):
        one = sess.run(None, {k: v[r:r + 1] for k, v in feeds.items()})
        assert np.abs(one[0][0] - c_k[r]).max() <= 1e-5 and np.abs(one[1][0] - c_v[r]).max() <= 1e-5
    # against the PyTorch equilibrium text encoder fed by the mapper itself (not the table)
    base = load_base_model(tiny_model, with_unet=False, with_vae=False)
    ph = add_placeholder_tokens(base, table.super_class, table.num_tokens)
    assert list(ph.ids) == list(ph_ids)
    Et, Bt = torch.zeros(n, 4, D), torch.zeros(n, 4, D)
    rows = [r for r, t in enumerate(ts) if t is not None]
    with torch.no_grad():
        tt = torch.tensor([float(ts[r]) for r in rows])
        Et[rows], Bt[rows] = concept.mapper(tt, concept.reference_embedding[None].expand(len(rows), -1))
        ce, bp, m = scatter_concept(torch.from_numpy(ids), list(ph.ids), Et, Bt)
        ref_k, ref_v = EquilibriumTextEncoder(base.text_encoder)(torch.from_numpy(ids), ce, bp, m)
    assert np.abs(c_k - ref_k.numpy()).max() <= 1e-4 and np.abs(c_v - ref_v.numpy()).max() <= 1e-4
    assert np.abs(c_k - c_v)[~mask].max() == 0 and np.abs(c_k - c_v)[mask].min() > 0


def test_one_dynamic_unet_serves_two_resolutions_and_long_prompts(bundle_fp32, torch_graphs):
    """One UNet graph for every resolution and context length (a long prompt's chunks: 77 x 1..12)."""
    from pm_export.validate import compare

    path = open_bundle(bundle_fp32).component_path(UNET)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(path)).graph.input}
    assert dims["sample"] == ["batch", 4, "latent_height", "latent_width"]
    assert dims["c_k"] == dims["c_v"] == ["batch", "context_length", 32]
    assert open_bundle(bundle_fp32).dims.context_chunks == 12
    _, specs, modules = torch_graphs
    shapes = [{"batch": 2, "latent_height": 32, "latent_width": 32},  # 256 x 256 px
              {"batch": 1, "latent_height": 48, "latent_width": 40, "context_length": 3 * 77},  # 384 x 320 px
              {"batch": 2, "latent_height": 32, "latent_width": 32, "context_length": 12 * 77}]
    for c in compare(modules[UNET], specs[UNET], path, "fp32", seed=5, shapes=shapes):
        assert c.max_abs <= 1e-4, c.describe()


def test_vae_decoder_applies_the_scaling_factor(bundle_fp32, torch_graphs):
    from pm_export.validate import ort_session

    base, _, _ = torch_graphs
    latent = np.random.default_rng(3).standard_normal((1, 4, 32, 40)).astype(np.float32)
    [image] = ort_session(open_bundle(bundle_fp32).component_path(VAE_DECODER)).run(None, {"latent": latent})
    with torch.no_grad():
        want = base.vae.decode(torch.from_numpy(latent) / base.vae.config.scaling_factor).sample.numpy()
    assert image.shape == (1, 3, 256, 320) and np.abs(image - want).max() <= 1e-4
    assert open_bundle(bundle_fp32).manifest[F.BK_BASE_MODEL][F.BM_VAE_DECODER_APPLIES_SCALING] is True


# ---------------------------------------------------------------- bundle
def test_manifest_records_everything(bundle_fp32, tiny_model):
    import json

    b = open_bundle(bundle_fp32, verify=True)
    m = b.manifest
    assert m[F.BK_FORMAT] == F.BUNDLE_FORMAT and m[F.BK_VERSION] == F.BUNDLE_VERSION
    assert m[F.BK_SCHEDULER] == json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(m[F.BK_TOOLS])
    assert {e[F.FK_FILE] for e in m[F.BK_TOKENIZER][F.BK_TOKENIZER_FILES]} >= {"tokenizer/vocab.json", "tokenizer/merges.txt"}
    for c in b.components:
        assert sha256_file(bundle_fp32 / c[F.CK_FILE]) == c[F.CK_SHA256] and not c[F.CK_DATA_FILES]
        assert [i["name"] for i in c[F.CK_INPUTS]] == [i.name for i in onnx.load(str(bundle_fp32 / c[F.CK_FILE])).graph.input]
    assert b.concept("alice")[F.QK_STAGE] == [400, 800]


def test_concept_only_export(bundle_fp32, tmp_path, trained_concept):
    b = shutil.copytree(bundle_fp32, tmp_path / "b")
    before = {p.name: sha256_file(p) for p in b.glob("*.onnx")}
    src = tmp_path / "bob.pt"
    shutil.copyfile(trained_concept, src)
    r = run([src, "--bundle", b])
    assert r.exit_code == 0, r.output
    assert {p.name: sha256_file(p) for p in b.glob("*.onnx")} == before  # networks untouched
    bundle = open_bundle(b, verify=True)
    assert [c[F.QK_NAME] for c in bundle.concepts] == ["alice", "bob"]
    assert np.array_equal(bundle.load_concept("bob").E, bundle.load_concept("alice").E)
    assert_one_line_error(run([src, "--bundle", b]), "already has a concept named 'bob'")
    assert run([src, "--bundle", b, "--force"]).exit_code == 0
    assert [c[F.QK_NAME] for c in open_bundle(b).concepts] == ["alice", "bob"]
    # another edit holding the bundle (pm-bundle remove-concept, another pm-export --bundle): this one waits
    import threading

    from pm_runtime.bundle import manifest_lock

    results = []
    with manifest_lock(b):
        worker = threading.Thread(target=lambda: results.append(run([src, "--bundle", b, "--name", "carol"])))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive()
    worker.join(timeout=120)
    assert results[0].exit_code == 0 and "waiting for another edit" in results[0].output, results[0].output
    assert [c[F.QK_NAME] for c in open_bundle(b).concepts] == ["alice", "bob", "carol"]


def test_concept_only_refuses_another_base_model(bundle_fp32, trained_concept, tmp_path):
    import json

    b = shutil.copytree(bundle_fp32, tmp_path / "b")
    m = json.loads((b / F.BUNDLE_MANIFEST).read_text())
    m[F.BK_FINGERPRINT] = "sha256:" + "0" * 64  # a bundle of another model
    (b / F.BUNDLE_MANIFEST).write_text(json.dumps(m))
    assert_one_line_error(run([trained_concept, "--bundle", b, "--name", "bob"]), "different base model")
    assert sorted(p.name for p in (b / "concepts").iterdir()) == ["alice.safetensors"]


# ---------------------------------------------------------------- bad input
@pytest.fixture(scope="session")
def other_model(tmp_path_factory):
    from pm_runtime.train.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "other", seed=1)


def test_concept_of_another_base_model_refused(other_model, trained_concept, tmp_path):
    out = tmp_path / "b"
    assert_one_line_error(run([trained_concept, "--model", other_model, "--out", out]), "different base model")
    assert not out.exists() and no_temp_folders(tmp_path)


def test_model_defaults_to_the_folder_the_concept_was_trained_on(trained_concept, tiny_model, other_model, tmp_path,
                                                                  monkeypatch):
    """Without --model a full export takes the folder pm-train recorded (as given to it: found from the working
    folder or from the concept file's folder), says so, and still checks the fingerprint; a recorded folder
    that is not there, or another model behind its name, is a one-line error that asks for --model."""
    import shutil

    import torch

    r = run([trained_concept, "--out", tmp_path / "b", "--target", "torch"])
    assert r.exit_code == 0, r.output
    assert f"--model not given: {tiny_model}, the model folder" in r.output and (tmp_path / "b" / "bundle.json").is_file()
    d = torch.load(trained_concept, weights_only=True)
    d[F.K_BASE_MODEL]["model_dir"] = "sd"  # a relative path, as pm-train records `--model sd`
    (tmp_path / "proj").mkdir()
    rel = tmp_path / "proj" / "c.pt"
    torch.save(d, rel)
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run([rel, "--out", tmp_path / "c"]), "give --model DIR: ")
    assert "was trained on 'sd', which is not a folder from here (nor from" in run([rel, "--out", tmp_path / "c"]).output
    shutil.copytree(tiny_model, tmp_path / "proj" / "sd")  # beside the concept file
    r = run([rel, "--out", tmp_path / "c", "--target", "torch"])
    assert r.exit_code == 0 and f"--model not given: {tmp_path / 'proj' / 'sd'}" in r.output, r.output
    (tmp_path / "sd").mkdir()  # a folder of that name from here too: the model folder is preferred
    r = run([rel, "--out", tmp_path / "d", "--target", "torch"])
    assert r.exit_code == 0 and f"--model not given: {tmp_path / 'proj' / 'sd'}" in r.output, r.output
    shutil.rmtree(tmp_path / "proj" / "sd")
    shutil.copytree(other_model, tmp_path / "proj" / "sd")  # another model under the recorded name
    assert_one_line_error(run([rel, "--out", tmp_path / "e"]), "different base model")
    shutil.rmtree(tmp_path / "proj" / "sd")  # only the empty one: the export says what it is not
    assert_one_line_error(run([rel, "--out", tmp_path / "e"]), "sd is not a Stable Diffusion diffusers folder")
    assert not (tmp_path / "e").exists()


def test_not_a_concept_file(tiny_model, tmp_path):
    for content in (b"hello", pickle.dumps({"format": "something"}, protocol=2)):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(content)
        assert_one_line_error(run([bad, "--model", tiny_model, "--out", tmp_path / "b"]), "not a")
    assert_one_line_error(run([tmp_path / "none.pt", "--model", tiny_model, "--out", tmp_path / "b"]), "not found")
    assert not (tmp_path / "b").exists()


def test_pickle_with_code_refused_and_not_run(tiny_model, tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import torch

    evil.write_bytes(pickle.dumps({"format": Boom()}, protocol=2))  # a bare pickle: refused before torch.load
    assert_one_line_error(run([evil, "--model", tiny_model, "--out", tmp_path / "b"]), "not a PyTorch file")
    assert_one_line_error(run([evil, "--bundle", tmp_path / "b"]), "not")
    torch.save({"format": Boom()}, evil)  # the same in torch.save's container: torch.load(weights_only=True) refuses
    assert_one_line_error(run([evil, "--model", tiny_model, "--out", tmp_path / "b"]), "it holds Python objects")
    assert not marker.exists()


def test_existing_out_refused_without_force(bundle_fp32, trained_concept, tiny_model, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run([trained_concept, "--model", tiny_model, "--out", out]), "exists; use --force")
    # --force replaces bundles only, never an arbitrary folder
    assert_one_line_error(run([trained_concept, "--model", tiny_model, "--out", out, "--force"]), "not a bundle")
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_no_bundle(bundle_fp32, trained_concept, tiny_model, tmp_path, monkeypatch):
    from pm_export import validate

    monkeypatch.setitem(validate.TOLERANCES, "fp32", (-1.0, 0.0))  # every check now fails
    out = tmp_path / "new"
    assert_one_line_error(run([trained_concept, "--model", tiny_model, "--out", out]), "validation failed")
    assert not out.exists() and no_temp_folders(tmp_path)
    # a failed --force export keeps the old bundle intact
    old = shutil.copytree(bundle_fp32, tmp_path / "old")
    assert_one_line_error(run([trained_concept, "--model", tiny_model, "--out", old, "--force"]), "max abs")
    open_bundle(old, verify=True)
    assert no_temp_folders(tmp_path)


def test_full_disk_is_a_one_line_error(trained_concept, tiny_model, tmp_path, monkeypatch):
    """ENOSPC while writing the bundle (here at its first file, the concept table): one line naming the
    cause, no traceback, no bundle and no temporary folder left (a real 3 MB tmpfs, full at the UNet graph, gave a line of this form)."""
    import errno
    import os

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    out = tmp_path / "b"
    assert_one_line_error(run([trained_concept, "--model", tiny_model, "--out", out]),
                          f"No space left on device ({out}): free some space")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_disk_space_estimate_and_warning(bundle_fp32, bundle_fp16, trained_concept, tiny_model, tmp_path,
                                         monkeypatch):
    """The bytes pm-export expects to write, from parameter counts, against what it wrote (the tiny graphs
    carry proportionally more structure than weights: 1.16x fp32, 1.37x fp16; on the SD-1.5-shaped model the estimate,
    4.128 / 2.064 GB for fp32 / fp16, matched the network files of benchmarks/results/export-cpu.jsonl,
    4.128 / 2.066 GB); a warning before the work when the free space is smaller."""
    from pm_export import build
    from pm_runtime.modeling.graphs import graph_modules
    from pm_runtime.modeling.loading import load_base_model

    modules = graph_modules(load_base_model(tiny_model, with_safety_checker=True))
    for bundle, precision in ((bundle_fp32, "fp32"), (bundle_fp16, "fp16")):
        cfg = build.ExportConfig(concept=trained_concept, model=tiny_model, out=tmp_path / "x", precision=precision)
        estimate = build.estimated_bundle_bytes(modules, cfg, {"onnx"})
        written = sum(f.stat().st_size for f in bundle.rglob("*.onnx*") if f.name != "step.onnx")
        assert 1.0 <= written / estimate < 1.5, (precision, written, estimate)  # 1.16 / 1.37 here
    torch_too = build.estimated_bundle_bytes(modules, cfg, {"onnx", "torch"})
    assert torch_too - estimate == 2 * sum(p.numel() for m in modules.values() for p in m.parameters())  # fp16
    lines = []
    monkeypatch.setattr(build.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5, 5))
    build._warn_disk_space(tmp_path / "not" / "yet" / "b", 2 * 10**9, lines.append)
    assert lines == [f"warning: 0.0 MB free in {tmp_path}; this export writes about 2.00 GB there (if the disk "
                     "fills, it stops and leaves nothing behind)"]
    monkeypatch.setattr(build.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, 10**12))
    build._warn_disk_space(tmp_path / "b", 2 * 10**9, lines.append)
    assert len(lines) == 1


def test_usage_errors(trained_concept, tiny_model, tmp_path):
    assert_one_line_error(run([trained_concept]), "give --model DIR --out BUNDLE")
    assert_one_line_error(run([trained_concept, "--bundle", tmp_path, "--model", tiny_model]), "neither")
    assert_one_line_error(run([trained_concept, "--bundle", tmp_path / "nope"]), "bundle folder not found")
    assert_one_line_error(run([trained_concept, "--model", tiny_model, "--out", tmp_path / "b", "--name", "../x"]),
                          "concept name")
    assert_one_line_error(run([trained_concept, "--model", tiny_model, "--out", tmp_path / "b",
                               "--reference-image", tmp_path / "none.png"]), "not found")


# ---------------------------------------------------------------- TensorRT
def test_tensorrt_missing_gives_install_hint(trained_concept, tiny_model, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here; the install hint is not shown")
    except ImportError:
        pass
    r = run([trained_concept, "--model", tiny_model, "--out", tmp_path / "b", "--target", "tensorrt"])
    assert_one_line_error(r, "pip install 'personamagic-runtime[tensorrt]'")
    assert not (tmp_path / "b").exists()


def test_tensorrt_plans(trained_concept, tiny_model, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on this project's machines (not run)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT plans need a CUDA GPU")
    out = tmp_path / "b"
    r = run([trained_concept, "--model", tiny_model, "--out", out, "--target", "all", "--timing-cache",
             tmp_path / "timing.cache"])
    assert r.exit_code == 0, r.output
    b = open_bundle(out)
    for net in NETWORKS:
        plan = b.component(net, "tensorrt")
        assert plan[F.CK_DETAILS]["compute_capability"] and plan[F.CK_DETAILS]["tensorrt_version"]
    assert (tmp_path / "timing.cache").is_file()


def test_image_psnr_and_its_floor_in_a_check():
    """validate.image_psnr compares decoder outputs as the pipeline's images (clip(x / 2 + 0.5, 0, 1)); a
    Check of a precision with a PSNR floor fails under it even within the elementwise limit."""
    from pm_export.validate import Check, image_psnr

    a = np.linspace(-1, 1, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    assert image_psnr(a, a) == float("inf")
    assert abs(image_psnr(a + 0.02, a) - 40.0) < 0.2  # 0.01 on [0, 1] everywhere (but where clipped): ~40 dB
    assert image_psnr(a * 5, a * 3) == image_psnr(np.clip(a * 5, -1, 1), np.clip(a * 3, -1, 1))  # clipped first
    nan = a.copy()
    nan[0, 0, 0, 0] = np.nan
    assert image_psnr(nan, a) == float("-inf")
    kw = dict(network="vae_decoder", precision="int8-vae", axes={}, max_abs=0.1, max_rel=0.1, ref_max=1.0, atol=0.5,
              rtol=0.5, seed=0)
    assert Check(**kw, psnr_db=31.0, psnr_min=30.0).ok and not Check(**kw, psnr_db=29.0, psnr_min=30.0).ok
    assert not Check(**kw, psnr_db=None, psnr_min=30.0).ok and Check(**kw).ok  # no floor: elementwise only
    d = Check(**kw, psnr_db=29.0, psnr_min=30.0).to_dict()
    assert d["psnr_db"] == 29.0 and d["psnr_min_db"] == 30.0 and d["passed"] is False
    assert "psnr_db" not in Check(**kw).to_dict()
