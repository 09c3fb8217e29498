"""The device-side loop (pm_runtime/backends/device_loop.py) and its step graph (export/step_graph.py).

The GPU backends (TensorRT) run denoise_on_device with their own buffers; here the same loop runs
with HostOps (numpy buffers, onnxruntime engines) and must give what the host loop gives, for every
scheduler; the step graph must compute its numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from pm_runtime import schedulers  # noqa: E402
from pm_runtime.backends.base import CheckedNetwork  # noqa: E402
from pm_runtime.backends.device_loop import HostOps, denoise_on_device, step_coefficients  # noqa: E402
from pm_runtime.backends.onnxruntime import OnnxRuntimeBackend, OrtNetwork  # noqa: E402
from pm_runtime.schedulers.linear import linear_steps  # noqa: E402
from pm_runtime.specs import STEP, STEP_COEF_COLUMNS, ModelDims, network_specs  # noqa: E402

SCHEDULERS = ("dpmpp-2m", "ddim", "euler", "euler-a", "dpmpp-2m-sde-karras")  # the last: history + noise
SD15_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False, "set_alpha_to_one": False,
               "prediction_type": "epsilon"}


def step_network(dims: ModelDims) -> CheckedNetwork:
    from pm_export.step_graph import step_model

    spec = network_specs(dims)[STEP]
    sess = ort.InferenceSession(step_model(spec).SerializeToString(), providers=["CPUExecutionProvider"])
    return CheckedNetwork(OrtNetwork(sess, spec.output_names), spec)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_graph_matches_its_reference(name):
    """Every step's real coefficient row (and a clamped one) on random inputs: the ONNX step graph
    under onnxruntime == the float64 numpy reference."""
    from pm_export.step_graph import reference_step

    dims = ModelDims(text_dim=32)
    net = step_network(dims)
    lin = linear_steps(schedulers.make_tables(name, SD15_CONFIG, 12))
    table = step_coefficients(lin, 7.5)
    rng = np.random.default_rng(3)
    for i in (0, 1, 6, 11):
        for clip in (np.inf, 1.0):
            feeds = net.spec.dummy_inputs(rng, "opt", batch=2, latent_height=32, latent_width=40)
            feeds["coef"] = table[i].copy()
            feeds["coef"][STEP_COEF_COLUMNS.index("clip")] = clip
            got = net.run(feeds)
            want = reference_step(feeds)
            for k, w in want.items():
                assert got[k].shape == w.shape
                np.testing.assert_allclose(got[k], w, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(w).max()))
            if np.isfinite(clip):
                assert np.abs(got["x0"]).max() <= clip


def test_step_coefficients_columns():
    lin = linear_steps(schedulers.make_tables("euler", SD15_CONFIG, 5))
    t = step_coefficients(lin, 8.0)
    col = STEP_COEF_COLUMNS.index
    assert t.shape == (5, len(STEP_COEF_COLUMNS)) and t.dtype == np.float32
    np.testing.assert_allclose(t[:, :10], lin.coef.astype(np.float32))
    assert (t[:, col("guidance")] == 8.0).all() and np.isinf(t[:, col("clip")]).all()
    np.testing.assert_allclose(t[:-1, col("next_input_scale")], lin.input_scale[1:].astype(np.float32))
    assert t[-1, col("next_input_scale")] == 1.0


class DeviceLoopOnHost(OnnxRuntimeBackend):
    """The onnxruntime backend with the device loop (HostOps buffers) instead of the host loop."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.step_net = step_network(self.bundle.dims)
        self.ops_made = []

    def denoise(self, unet, job):
        ops = HostOps()
        self.ops_made.append(ops)
        return denoise_on_device(ops, unet, self.step_net, job)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_device_loop_equals_host_loop(run_bundle, name):
    """The whole generation through denoise_on_device == through denoise_on_host (same bundle,
    engines, seed): per-step context rows, timesteps, coefficients, noise, double buffers."""
    from pm_runtime.bundle import open_bundle
    from pm_runtime.pipeline import Pipeline

    bundle = open_bundle(run_bundle)
    kw = dict(seed=11, steps=7, scheduler=name, height=256, width=256, num_images=2, concept_stage=(400, 700))
    host = Pipeline(bundle, OnnxRuntimeBackend(bundle), concept="alice", safety_checker=False)
    dev_backend = DeviceLoopOnHost(bundle)
    dev = Pipeline(bundle, dev_backend, concept="alice", safety_checker=False)
    seen = []
    a = host.generate("a photo of <persona> in a garden", **kw).images.astype(int)
    b = dev.generate("a photo of <persona> in a garden", callback=lambda i, n: seen.append((i, n)), **kw).images
    assert dev_backend.ops_made and dev_backend.ops_made[0].made > 0  # the device loop ran
    assert seen == [(i, 7) for i in range(1, 8)]
    assert np.abs(a - b.astype(int)).max() <= 1


def test_device_loop_takes_scheduled_negative_prompts_and_long_prompts(run_bundle):
    """A negative prompt that changes between steps (its row per step) and contexts of several chunks:
    the device loop's pairs of rows give the host loop's image."""
    from pm_runtime.bundle import open_bundle
    from pm_runtime.pipeline import Pipeline

    bundle = open_bundle(run_bundle)
    kw = dict(seed=5, steps=5, scheduler="dpmpp-2m", height=256, width=256, negative_prompt="[ugly|blurry], " * 60)
    host = Pipeline(bundle, OnnxRuntimeBackend(bundle), concept="alice", safety_checker=False)
    dev_backend = DeviceLoopOnHost(bundle)
    dev = Pipeline(bundle, dev_backend, concept="alice", safety_checker=False)
    a = host.generate("a photo of <persona> in a garden", **kw)
    b = dev.generate("a photo of <persona> in a garden", **kw)
    assert set(a.negative_step_texts) == {"ugly, " * 60, "blurry, " * 60} and a.chunks > 1
    assert dev_backend.ops_made and np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1


def test_device_loop_cancel(run_bundle):
    from pm_runtime.bundle import open_bundle
    from pm_runtime.pipeline import Cancelled, Pipeline

    bundle = open_bundle(run_bundle)
    pipe = Pipeline(bundle, DeviceLoopOnHost(bundle), concept="alice", safety_checker=False)
    steps_done = []
    flag = lambda: len(steps_done) >= 2  # noqa: E731
    with pytest.raises(Cancelled, match="before step 3"):
        pipe.generate("a photo of <persona>", seed=1, steps=6, height=256, width=256, cancel=flag,
                      callback=lambda i, n: steps_done.append(i))
    assert steps_done == [1, 2]


def test_step_graph_written_and_validated(tmp_path):
    """What pm-export does before building step.plan: write the graph atomically, validate it."""
    from pm_export.step_graph import validate_step_graph, write_step_graph

    spec = network_specs(ModelDims(text_dim=32))[STEP]
    path = write_step_graph(spec, tmp_path / "step.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["step.onnx"]
    checks = validate_step_graph(spec, path)
    assert len(checks) == 2 and all(c.ok and c.max_rel < 1e-5 for c in checks)


class DeviceLoopOrtValues(OnnxRuntimeBackend):
    """The onnxruntime backend with the device loop on OrtOps: OrtValues + IOBinding by address, on
    the CPU device here (the CUDA provider uses the same code with device "cuda")."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.step_net = step_network(self.bundle.dims)
        self.ops_made = []

    def denoise(self, unet, job):
        from pm_runtime.backends.device_loop import OrtOps

        ops = OrtOps(self.ort, "cpu", 0)
        self.ops_made.append(ops)
        return denoise_on_device(ops, unet, self.step_net, job)


@pytest.mark.parametrize("name", ["dpmpp-2m", "euler-a"])
def test_ort_iobinding_loop_equals_host_loop(run_bundle, name):
    from pm_runtime.bundle import open_bundle
    from pm_runtime.pipeline import Pipeline

    bundle = open_bundle(run_bundle)
    kw = dict(seed=5, steps=6, scheduler=name, height=256, width=320, num_images=2)
    a = Pipeline(bundle, OnnxRuntimeBackend(bundle), concept="alice", safety_checker=False).generate(
        "<persona> reading a book", **kw).images.astype(int)
    backend = DeviceLoopOrtValues(bundle)
    b = Pipeline(bundle, backend, concept="alice", safety_checker=False).generate("<persona> reading a book", **kw)
    assert len(backend.ops_made) == 1 and not backend.ops_made[0].values  # ran, then released its buffers
    assert np.abs(a - b.images.astype(int)).max() <= 1


def test_padded_rows_and_row_addresses():
    from pm_runtime.backends.device_loop import ALIGN, DeviceBuf, padded_rows

    a = np.arange(3 * 13, dtype=np.float32).reshape(3, 13)
    host, pitch = padded_rows(a)
    assert pitch % ALIGN == 0 and pitch >= 13 * 4 and host.shape == (3, pitch // 4)
    np.testing.assert_array_equal(host[:, :13], a)
    buf = DeviceBuf(1 << 20, a.shape, pitch)
    assert [buf.row(i).ptr % ALIGN for i in range(3)] == [0, 0, 0] and buf.row(2).shape == (13,)


def test_exported_bundle_has_the_step_graph(run_bundle):
    """pm-export ships step.onnx (validated) with the ONNX graphs; the onnxruntime backend provides it."""
    import json

    from pm_runtime.bundle import open_bundle

    comps = json.loads((run_bundle / "bundle.json").read_text())["components"]
    step = next(c for c in comps if c["network"] == STEP)
    assert step["format"] == "onnx" and step["precision"] == "fp32" and step["file"] == "step.onnx"
    assert step["validation"] and all(v["passed"] for v in step["validation"])
    assert OnnxRuntimeBackend(open_bundle(run_bundle)).provides(STEP)
    import onnx

    # every graph at its opset's oldest IR version (8 for opset 17), not the installed onnx's newest:
    # onnxruntime 1.30 refused the step graph written at onnx 1.23's default IR 14
    versions = {p.name: onnx.load(str(p), load_external_data=False).ir_version for p in run_bundle.rglob("*.onnx")}
    assert "step.onnx" in versions and set(versions.values()) == {8}, versions


def test_onnxruntime_uses_the_device_loop_with_the_cuda_provider(run_bundle, monkeypatch):
    """Which loop the onnxruntime backend picks: host loop on the CPU provider; the device loop
    (OrtOps) with the CUDA provider. CUDA cannot run here: the step session is created on the CPU
    first, then the provider list says CUDA and OrtOps is pointed at the CPU device."""
    import pm_runtime.backends.onnxruntime as B
    from pm_runtime.backends import device_loop
    from pm_runtime.bundle import open_bundle
    from pm_runtime.pipeline import Pipeline

    bundle = open_bundle(run_bundle)
    made = []

    def cpu_ops(ort, device, device_id):
        assert (device, device_id) == ("cuda", 1)
        made.append(device_loop.OrtOps(ort, "cpu", 0))
        return made[-1]

    monkeypatch.setattr(B, "OrtOps", cpu_ops)
    kw = dict(seed=2, steps=4, height=256, width=256)
    backend = B.OnnxRuntimeBackend(bundle)
    pipe = Pipeline(bundle, backend, concept="alice", safety_checker=False)
    a = pipe.generate("a photo of <persona>", **kw).images
    assert made == []  # CPU provider: the host loop
    with backend.network(STEP):
        pass  # the step session exists (on the CPU), cached
    backend.providers = [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    b = pipe.generate("a photo of <persona>", **kw).images
    assert len(made) == 1
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_a_device_provider_that_fell_back_to_the_cpu_is_refused(run_bundle, monkeypatch):
    """onnxruntime-gpu without the CUDA / cuDNN libraries it needs only warns and runs the session on
    the CPU provider: the backend says so in one line instead of running on the CPU under the GPU's
    name. A stand-in session class reports the providers a real one would (get_providers)."""
    import types

    from pm_runtime.backends import onnxruntime as B
    from pm_runtime.bundle import open_bundle
    from pm_runtime.errors import UserError

    backend = B.OnnxRuntimeBackend(open_bundle(run_bundle))
    real = backend.ort.InferenceSession
    started = {"providers": ["CPUExecutionProvider"]}

    class Session:
        def __init__(self, path, opts, providers):
            self.inner = real(path, opts, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return started["providers"]

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(backend, "ort", types.SimpleNamespace(
        **{k: getattr(backend.ort, k) for k in ("SessionOptions", "GraphOptimizationLevel", "ExecutionMode",
                                                 "__version__")}, InferenceSession=Session))
    backend.providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    with pytest.raises(UserError, match="could not start CUDAExecutionProvider for step.onnx"):
        with backend.network(STEP):
            pass
    started["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # it did start: no complaint
    with backend.network(STEP) as step:
        assert step.engine is not None
