"""export/quantize.py on the tiny model's exported (optimised fp32) UNet: same IO, runs in
onnxruntime, output close to fp32, atomic write, clear errors for graphs it cannot quantize."""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pm_export import quantize as Q
from pm_export.quantize import CALIBRATED, MODES, quantize_unet_int8
from pm_runtime.errors import UserError

# Relative L2 of the int8 UNet output against fp32 on the tiny model (one call, random inputs).
# Measured (onnxruntime 1.32, AVX-512 VNNI CPU): dynamic-matmul 0.006, dynamic-matmul-conv 0.028,
# nbits8 0.003, nbits8-fp32 0.0015, weight-only-qdq 0.011, static-qdq(-conv) 0.046 (calibrated on 4
# feeds of the same random distribution). The limits are ~3x that: a broken scale or a swapped
# weight layout gives >> 0.2.
REL_L2_LIMIT = {"dynamic-matmul": 0.02, "dynamic-matmul-conv": 0.08, "nbits8": 0.01, "nbits8-fp32": 0.005,
                "weight-only-qdq": 0.03, "static-qdq": 0.15,
                "static-qdq-conv": 0.15}


@pytest.fixture(scope="module")
def fp32_unet(run_bundle):
    return run_bundle / "unet.onnx"


def session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def io(sess):
    return ([(i.name, i.type, i.shape) for i in sess.get_inputs()],
            [(o.name, o.type, o.shape) for o in sess.get_outputs()])


def feed(sess, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    L, D = shapes["c_k"][1:]
    L = L if isinstance(L, int) else 2 * 77  # a dynamic context (long prompts): two chunks
    return {"sample": rng.standard_normal((2, 4, 32, 32), dtype=np.float32),
            "timestep": np.array([999.0, 500.0], np.float32),
            "c_k": rng.standard_normal((2, L, D), dtype=np.float32),
            "c_v": rng.standard_normal((2, L, D), dtype=np.float32)}


@pytest.mark.parametrize("mode", MODES)
def test_same_io_runs_and_close_to_fp32(mode, fp32_unet, tmp_path):
    dst = tmp_path / "unet.onnx"
    ref = session(fp32_unet)
    calibration = [feed(ref, seed=10 + i) for i in range(4)] if mode in CALIBRATED else None
    facts = quantize_unet_int8(fp32_unet, dst, mode=mode, calibration=calibration)
    assert facts["mode"] == mode and facts["quantized_nodes"] > 0
    assert facts["bytes_before"] == fp32_unet.stat().st_size and facts["bytes_after"] == dst.stat().st_size
    assert facts["files"] == ["unet.onnx"] and not (tmp_path / "unet.onnx.data").exists()  # inline in, inline out
    q = session(dst)
    assert io(q) == io(ref)
    f = feed(ref)
    a, b = q.run(None, f)[0], ref.run(None, f)[0]
    assert a.shape == b.shape and np.isfinite(a).all()
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert 0 < rel < REL_L2_LIMIT[mode], rel
    # quantized after the fp32 optimisation pass: its fused attention is still there
    ops = lambda p: [n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node]  # noqa: E731
    assert ops(dst).count("MultiHeadAttention") == ops(fp32_unet).count("MultiHeadAttention") > 0
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert not [p for p in fp32_unet.parent.iterdir() if ".typed-" in p.name or "-inferred" in p.name]
    if mode in CALIBRATED:  # every quantized node's activation has a calibrated range too (contrib ops' outputs typed)
        assert facts["weight_only_nodes"] == 0


def test_static_keeps_named_convs_fp32(fp32_unet, tmp_path):
    ref = session(fp32_unet)
    dst = tmp_path / "unet.onnx"
    facts = quantize_unet_int8(fp32_unet, dst, mode="static-qdq-conv", calibration=[feed(ref, seed=3)])
    assert facts["kept_fp32"] == list(Q.STATIC_KEEP_FP32) and facts["kept_fp32_nodes"] > 0
    g = onnx.load(str(dst)).graph
    inits = {t.name for t in g.initializer}
    kept = [n for n in g.node if n.op_type == "Conv" and any(f"/{k}/" in n.name for k in Q.STATIC_KEEP_FP32)]
    assert len(kept) == facts["kept_fp32_nodes"] and all(n.input[1] in inits for n in kept)  # float weight
    assert facts["quantized_nodes"] == sum(n.op_type == "Conv" for n in g.node) - len(kept)


def test_record_calibration_feeds_a_static_mode(run_bundle, fp32_unet, tmp_path):
    feeds = Q.record_calibration(run_bundle, prompts=("a photo of a face",), steps=3, resolution=256)
    assert len(feeds) == 3 and set(feeds[0]) == {"sample", "timestep", "c_k", "c_v"}
    assert feeds[0]["sample"].shape[0] == 2 and feeds[0]["timestep"][0] > feeds[-1]["timestep"][0]  # guidance batch
    facts = quantize_unet_int8(fp32_unet, tmp_path / "unet.onnx", mode="static-qdq", calibration=feeds,
                               calibrate="percentile")
    assert facts["calibration_feeds"] == 3 and facts["calibrate"] == "percentile"
    ref, q = session(fp32_unet), session(tmp_path / "unet.onnx")
    a, b = q.run(None, feeds[1])[0], ref.run(None, feeds[1])[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < REL_L2_LIMIT["static-qdq"]


def test_vae_decoder_int8_on_recorded_latents(run_bundle, fp32_unet, tmp_path):
    """record_calibration(vae_feeds=...) keeps each image's finished latent; quantize_vae_int8 turns the
    decoder's convolutions (but conv_in / conv_out) into int8 QDQ calibrated on them: same IO, every
    int8 weight's activation calibrated too, and a held-out latent's image within the export's floor."""
    from pm_export.validate import PSNR_MIN, image_psnr

    vae_feeds, progress = [], []
    Q.record_calibration(run_bundle, prompts=("a photo of a face", "a face at night"), steps=2, resolution=256,
                         vae_feeds=vae_feeds, callback=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]  # pm-export's calibration bar: every step of every prompt
    assert len(vae_feeds) == 2 and set(vae_feeds[0]) == {"latent"} and vae_feeds[0]["latent"].shape == (1, 4, 32, 32)
    src, dst = run_bundle / "vae_decoder.onnx", tmp_path / "vae_decoder.onnx"
    facts = Q.quantize_vae_int8(src, dst, calibration=vae_feeds[:1])
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(src)).graph.node)
    assert facts["mode"] == "static-qdq-conv" and facts["per_channel"] and facts["calibration_feeds"] == 1
    assert facts["kept_fp32_nodes"] == 2 and facts["quantized_nodes"] == convs - 2 and facts["weight_only_nodes"] == 0
    ref, q = session(src), session(dst)
    assert io(q) == io(ref)
    held_out = vae_feeds[1]
    assert image_psnr(q.run(None, held_out)[0], ref.run(None, held_out)[0]) >= PSNR_MIN["int8-vae"]
    with pytest.raises(UserError, match="not a VAE decoder graph"):
        Q.quantize_vae_int8(fp32_unet, tmp_path / "u.onnx", calibration=vae_feeds)
    with pytest.raises(UserError, match="needs calibration feeds"):
        Q.quantize_vae_int8(src, tmp_path / "v.onnx", calibration=[])


def test_per_channel_and_external_data(fp32_unet, tmp_path):
    dst = tmp_path / "out" / "unet.onnx"
    facts = quantize_unet_int8(fp32_unet, dst, mode="dynamic-matmul", per_channel=True, external_data="always")
    assert facts["per_channel"] and facts["external_data"]
    assert facts["files"] == ["unet.onnx", "unet.onnx.data"] and (dst.parent / "unet.onnx.data").is_file()
    ref, q = session(fp32_unet), session(dst)
    f = feed(ref, seed=1)
    a, b = q.run(None, f)[0], ref.run(None, f)[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < REL_L2_LIMIT["dynamic-matmul"]


def test_failure_leaves_nothing(fp32_unet, tmp_path, monkeypatch):
    def half_written(src, out, external, *a):
        out.write_bytes(b"half a graph")
        (out.parent / (out.name + ".data")).write_bytes(b"x" * 100)
        raise RuntimeError("disk full")

    monkeypatch.setattr(Q, "_dynamic", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        quantize_unet_int8(fp32_unet, tmp_path / "unet.onnx", mode="dynamic-matmul")
    assert list(tmp_path.iterdir()) == []
    # an earlier result at dst survives a failed rewrite untouched
    monkeypatch.undo()
    quantize_unet_int8(fp32_unet, tmp_path / "unet.onnx", mode="dynamic-matmul")
    before = (tmp_path / "unet.onnx").read_bytes()
    monkeypatch.setattr(Q, "_dynamic", half_written)
    with pytest.raises(RuntimeError):
        quantize_unet_int8(fp32_unet, tmp_path / "unet.onnx", mode="dynamic-matmul")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx"]
    assert (tmp_path / "unet.onnx").read_bytes() == before


def test_clear_errors(fp32_unet, run_bundle, tmp_path):
    with pytest.raises(UserError, match="unknown int8 mode"):
        quantize_unet_int8(fp32_unet, tmp_path / "a.onnx", mode="int4")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe not protobuf" * 10)
    with pytest.raises(UserError, match="not an ONNX graph"):
        quantize_unet_int8(junk, tmp_path / "b.onnx")
    with pytest.raises(UserError, match="not a UNet graph"):
        quantize_unet_int8(run_bundle / "vae_decoder.onnx", tmp_path / "c.onnx")
    with pytest.raises(UserError, match="needs calibration feeds"):
        quantize_unet_int8(fp32_unet, tmp_path / "s.onnx", mode="static-qdq")
    with pytest.raises(UserError, match="takes no calibration"):
        quantize_unet_int8(fp32_unet, tmp_path / "s.onnx", mode="nbits8", calibration=[{}])
    with pytest.raises(UserError, match="does not exist"):
        quantize_unet_int8(tmp_path / "missing.onnx", tmp_path / "d.onnx")
    with pytest.raises(UserError, match="dst must differ"):
        quantize_unet_int8(fp32_unet, fp32_unet)
    once = tmp_path / "once.onnx"
    quantize_unet_int8(fp32_unet, once, mode="dynamic-matmul")
    with pytest.raises(UserError, match="nothing to quantize|already quantized"):
        quantize_unet_int8(once, tmp_path / "twice.onnx", mode="dynamic-matmul")
    # a UNet without constant-weight MatMuls (weights as graph inputs: fp16 bundles look similar)
    m = onnx.load(str(fp32_unet))
    keep = {n.input[1] for n in m.graph.node if n.op_type in ("MatMul", "Gemm")}
    for t in list(m.graph.initializer):
        if t.name in keep:
            m.graph.initializer.remove(t)
            m.graph.node.insert(0, onnx.helper.make_node("Constant", [], [t.name], value=t))
    odd = tmp_path / "const.onnx"
    onnx.save(m, str(odd))
    with pytest.raises(UserError, match="nothing to quantize"):
        quantize_unet_int8(odd, tmp_path / "e.onnx", mode="nbits8")
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert sorted(leftovers) == ["const.onnx", "junk.onnx", "once.onnx"], leftovers
    shutil.rmtree(tmp_path)
