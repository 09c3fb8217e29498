"""onnxruntime graph optimisation at export (export/optimize.py) on the tiny model, CPU.

Two bundles per session through the command line: the default (`--optimize auto`) and
`--optimize none`. The optimised graphs must match PyTorch within the fp32 tolerance, hold the
fused ops the manifest says they hold, and `none` must leave the graphs as exported.
"""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from pm_export.cli import main
from pm_runtime import formats as F
from pm_runtime.bundle import open_bundle
from pm_runtime.specs import NETWORKS, TEXT_ENCODER, UNET, VAE_DECODER

MS = "com.microsoft:"


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def export(tiny_model, trained_concept, out, *extra):
    r = run([trained_concept, "--model", tiny_model, "--out", out, *extra])
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.fixture(scope="module")
def auto_bundle(default_export):
    return default_export  # the default is --optimize auto (conftest.py: shared with test_export)


@pytest.fixture(scope="module")
def plain_bundle(tiny_model, trained_concept, tmp_path_factory):
    return export(tiny_model, trained_concept, tmp_path_factory.mktemp("opt") / "none", "--optimize", "none")


@pytest.fixture(scope="module")
def torch_graphs(tiny_model):
    from pm_runtime.modeling.graphs import graph_modules, model_dims
    from pm_runtime.modeling.loading import load_base_model
    from pm_runtime.specs import network_specs

    base = load_base_model(tiny_model)
    return network_specs(model_dims(base)), graph_modules(base)


def ops(path):
    from pm_export.optimize import op_counts

    return op_counts(onnx.load(str(path), load_external_data=False))


def graph_opt(bundle, net):
    return open_bundle(bundle).component(net)[F.CK_DETAILS]["graph_optimization"]


# ---------------------------------------------------------------- the table
def test_pass_table_per_provider_and_precision():
    from pm_export.optimize import ALL_PASSES, PASSES, passes_for

    assert set(PASSES) == {"cpu"}  # the only provider measured here
    for net in NETWORKS:
        assert set(passes_for(net)) <= set(ALL_PASSES)
    assert "cross_attention_split_kv" in passes_for(UNET) and "self_attention" in passes_for(UNET)
    assert passes_for(VAE_DECODER) == ()
    # fp16: nothing that swallows an op of fp16.FP32_OPS (LayerNormalization, Softmax)
    swallowing = {"skip_layer_norm", "self_attention", "cross_attention_split_kv"}
    for net in NETWORKS:
        assert not swallowing & set(passes_for(net, "cpu", "fp16"))
    with pytest.raises(ValueError, match="no optimisation table"):
        passes_for(UNET, "coreml")


# ---------------------------------------------------------------- auto (default)
@pytest.mark.parametrize("net", NETWORKS)
def test_optimised_graphs_match_pytorch(net, auto_bundle, torch_graphs):
    from pm_export.validate import TOLERANCES, compare

    root, _ = auto_bundle
    comp = open_bundle(root).component(net)
    assert comp[F.CK_VALIDATION] and all(v["passed"] for v in comp[F.CK_VALIDATION])  # validated after optimising
    specs, modules = torch_graphs
    atol, _ = TOLERANCES["fp32"]
    for c in compare(modules[net], specs[net], root / comp[F.CK_FILE], "fp32", seed=7):
        assert c.max_abs <= atol, c.describe()


def test_manifest_records_passes_and_fused_ops(auto_bundle, plain_bundle):
    from pm_export.optimize import passes_for

    root, output = auto_bundle
    b = open_bundle(root, verify=True)
    assert "onnxruntime graph optimisation (CPU:" in output
    for net in NETWORKS:
        rec, path = graph_opt(root, net), b.component_path(net, "onnx")
        assert rec["provider"] == "CPUExecutionProvider" and rec["passes"] == list(passes_for(net))
        got = ops(path)
        for op, n in rec["fused"].items():  # every recorded fused op is in the file, as many as recorded
            if op not in ("self_attention", "cross_attention_split_kv"):
                assert got.get(MS + op, 0) == n, (net, op)
        for op, (before, after) in rec.get("op_counts_changed", {}).items():
            assert got.get(op, 0) == after and ops(plain_bundle[0] / f"{net}.onnx").get(op, 0) == before, (net, op)
    # The UNet: every attention fused, cross-attention included despite the split K/V contexts.
    plain_unet, unet = ops(plain_bundle[0] / "unet.onnx"), ops(b.component_path(UNET, "onnx"))
    rec = graph_opt(root, UNET)
    n_attn = plain_unet["Softmax"]
    assert n_attn > 0 and "Softmax" not in unet and unet[MS + "MultiHeadAttention"] == n_attn
    assert rec["fused"]["self_attention"] == rec["fused"]["cross_attention_split_kv"] == n_attn // 2
    assert rec["fused"]["SkipLayerNormalization"] > 0 and rec["nodes"][1] < rec["nodes"][0]
    # Nothing without a CPU kernel.
    for net in NETWORKS:
        assert not {MS + op for op in ("GroupNorm", "SkipGroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd")} & set(
            ops(b.component_path(net, "onnx")))
    assert graph_opt(root, VAE_DECODER)["passes"] == [] and "no CPU kernel" in graph_opt(root, VAE_DECODER)["reason"]


def test_optimised_unet_runs_both_resolutions_and_equals_plain(auto_bundle, plain_bundle, torch_graphs):
    specs, _ = torch_graphs
    sessions = [ort.InferenceSession(str(r / "unet.onnx"), providers=["CPUExecutionProvider"])
                for r in (auto_bundle[0], plain_bundle[0])]
    rng = np.random.default_rng(3)
    for axes in ({"batch": 2, "latent_height": 32, "latent_width": 32},
                 {"batch": 1, "latent_height": 48, "latent_width": 40, "context_length": 2 * 77}):
        feeds = specs[UNET].dummy_inputs(rng, "opt", **axes)
        fused, plain = (s.run(None, feeds)[0] for s in sessions)
        assert np.abs(fused - plain).max() <= 1e-5


# ---------------------------------------------------------------- none
def test_optimize_none_skips_it(plain_bundle):
    root, output = plain_bundle
    assert "graph optimisation" not in output
    b = open_bundle(root, verify=True)
    for net in NETWORKS:
        rec = graph_opt(root, net)
        assert rec["passes"] == [] and rec["reason"] == "--optimize none"
        assert not [op for op in ops(b.component_path(net, "onnx")) if op.startswith(MS)]


def test_optimize_not_for_concept_only(plain_bundle, trained_concept, tmp_path):
    b = shutil.copytree(plain_bundle[0], tmp_path / "b")
    for option in (["--optimize", "none"], ["--int8-vae"]):
        r = run([trained_concept, "--bundle", b, *option])
        assert r.exit_code != 0 and "apply to a full export" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- the optimiser itself
@pytest.fixture(scope="module")
def plain_unet_external(plain_bundle, tmp_path_factory):
    """The plain tiny UNet with every weight in ONNX external data (the > 2 GB layout)."""
    from pm_export.onnx_export import save_onnx

    path = tmp_path_factory.mktemp("ext") / "unet.onnx"
    save_onnx(onnx.load(str(plain_bundle[0] / "unet.onnx")), path, "always")
    return path


def test_external_data_is_streamed_not_loaded(plain_unet_external, plain_bundle, tmp_path, monkeypatch):
    from pm_export import optimize
    from pm_runtime.bundle import sha256_file

    def refuse(*a, **k):
        raise AssertionError("the optimiser must not load every external weight")

    monkeypatch.setattr(onnx, "load_external_data_for_model", refuse)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", refuse)
    src_data = plain_unet_external.with_name("unet.onnx.data")
    before = sha256_file(src_data)
    res = optimize.optimize_graph(plain_unet_external, tmp_path / "unet.onnx", UNET)
    assert [p.name for p in res.files] == ["unet.onnx", "unet.onnx.data"]
    assert sha256_file(src_data) == before  # the source is not touched
    model = onnx.load(str(tmp_path / "unet.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        if onnx.external_data_helper.uses_external_data(t):
            info = onnx.external_data_helper.ExternalDataInfo(t)
            assert info.location == "unet.onnx.data" and info.offset % 4096 == 0
        else:
            assert len(t.raw_data) < 1024
    feeds = {"sample": np.random.default_rng(0).standard_normal((2, 4, 32, 32), dtype=np.float32),
             "timestep": np.array([10.0, 700.5], np.float32),
             "c_k": np.random.default_rng(1).standard_normal((2, 77, 32), dtype=np.float32),
             "c_v": np.random.default_rng(2).standard_normal((2, 77, 32), dtype=np.float32)}
    want = ort.InferenceSession(str(plain_bundle[0] / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert np.abs(got[0] - want[0]).max() <= 1e-5
    with pytest.raises(ValueError, match="dst must differ"):
        optimize.optimize_graph(plain_unet_external, plain_unet_external, UNET)


@pytest.mark.parametrize("net", [UNET, TEXT_ENCODER])
def test_fp16_passes_convert_and_match(net, plain_bundle, torch_graphs, tmp_path):
    """fp16 bundles are converted from the graph optimised with the fp16 row of the table."""
    from pm_export import fp16
    from pm_export.onnx_export import save_onnx
    from pm_export.optimize import optimize_graph
    from pm_export.validate import compare

    res = optimize_graph(plain_bundle[0] / f"{net}.onnx", tmp_path / "opt.onnx", net, precision="fp16")
    assert res.fused and not {"MultiHeadAttention", "SkipLayerNormalization"} & set(res.fused)
    half, _ = fp16.to_fp16(tmp_path / "opt.onnx")
    save_onnx(half, tmp_path / "half.onnx")
    specs, modules = torch_graphs
    for c in compare(modules[net], specs[net], tmp_path / "half.onnx", "fp16", seed=11):
        assert c.ok, c.describe()


def test_ctrl_c_inside_the_optimiser_import_is_an_interrupt(tiny_model, trained_concept, tmp_path, monkeypatch):
    """Ctrl-C while onnxruntime's C extension was being imported by the optimiser came back as an
    ImportError (SIGINT sent into `import onnxruntime.capi._pybind_state` in a fresh process: "import numpy
    failed" with nothing attached, or "initialization failed" raised from the KeyboardInterrupt), which the
    optimiser's fallback took for a fusion failure (then a validation traceback): it is an interrupt,
    exit 130, nothing written. Both forms, the unchained one with a real SIGINT to this process."""
    import signal

    from pm_export import optimize
    from test_interrupts import interrupted_chained, interrupted_unchained  # the two forms, as fakes

    for body in (interrupted_chained, interrupted_unchained):
        monkeypatch.setattr(optimize, "_fuse", lambda model, network, passes, body=body: body())
        r = run([trained_concept, "--model", tiny_model, "--out", tmp_path / "b"])
        assert r.exit_code == 130 and "interrupted; nothing was written" in r.output, (body.__name__, r.output)
        assert "Traceback" not in r.output and "warning: onnxruntime graph optimisation" not in r.output
        assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_optimiser_failure_ships_the_plain_graph(tiny_model, trained_concept, tmp_path, monkeypatch):
    """onnxruntime's fusion code raising on an unexpected graph is a warning, not a failed export."""
    from pm_export import optimize

    def boom(model, network, passes):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(optimize, "_fuse", boom)
    root, output = export(tiny_model, trained_concept, tmp_path / "b")
    assert "warning: onnxruntime graph optimisation of unet failed (TypeError" in output
    b = open_bundle(root, verify=True)
    for net in (UNET, TEXT_ENCODER):
        rec = graph_opt(root, net)
        assert rec["passes"] == [] and rec["reason"].startswith("optimiser failed: TypeError")
        assert not [op for op in ops(b.component_path(net, "onnx")) if op.startswith(MS)]
        assert all(v["passed"] for v in b.component(net)[F.CK_VALIDATION])
