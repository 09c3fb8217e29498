"""The GPU fast path on the tiny model, run where this machine can run it (CPU: the same code
eagerly, with pm_kernels' Triton kernels under TRITON_INTERPRET=1 where conftest set it, else
their references); the `gpu` tests run it for real (fp16, channels-last, CUDA graph).

- FastUNet computes what UNetGraph (diffusers' UNet with split K/V) computes.
- StepGraph's device loop (affine scheduler form, device-side step counter) gives what the host
  loop gives, for every scheduler.
- The torch-cuda backend from a bundle's torch weights matches the onnxruntime backend's image.
- Bundles with torch weights only; clean refusals where CUDA or weights are missing.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import psnr, slow_unless  # noqa: E402
from pm_runtime import schedulers  # noqa: E402
from pm_runtime.backends.base import DenoiseJob, denoise_on_host  # noqa: E402
from pm_runtime.bundle import open_bundle  # noqa: E402
from pm_runtime.errors import UserError  # noqa: E402
from pm_runtime.pipeline import Pipeline  # noqa: E402

PROMPT = "a photo of <persona> as a knight"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def kernels_mode(request):
    """On CPUs the Triton kernels run under the (slow) interpreter: whole-pipeline tests use the
    kernels' PyTorch references; tests/test_kernels.py and the first FastUNet case run Triton."""
    import pm_kernels

    pm_kernels.set_enabled(torch.cuda.is_available() or "triton" in request.node.name)
    yield
    pm_kernels.set_enabled(True)


@pytest.fixture(scope="module")
def unet_graph(tiny_model):
    from pm_runtime.modeling.graphs import graph_modules
    from pm_runtime.modeling.loading import load_base_model

    return graph_modules(load_base_model(tiny_model))["unet"]


@pytest.mark.parametrize("n, h, w, kernels", [(2, 8, 8, "triton"), (1, 16, 24, "reference"), (3, 24, 8, "reference")])
def test_fast_unet_matches_the_plain_unet(unet_graph, n, h, w, kernels):
    import pm_kernels

    from pm_runtime.modeling.fast_unet import FastUNet, unsupported

    assert pm_kernels.kernel_path(torch.zeros(1)) == (kernels if not torch.cuda.is_available() else "reference")

    assert unsupported(unet_graph.unet) is None
    g = torch.Generator().manual_seed(n * 100 + h)
    x = torch.randn(n, 4, h, w, generator=g)
    t = torch.tensor([999.0, 421.0, 0.0][:n])
    c_k, c_v = torch.randn(2, n, 77, 32, generator=g)  # C_v != C_k: the split really matters
    with torch.no_grad():
        ref = unet_graph(x, t, c_k, c_v)
        fast = FastUNet(unet_graph.unet)(x, t, c_k, c_v)
        swapped = unet_graph(x, t, c_k, c_k)
    err = float((fast - ref).abs().max())
    assert err <= 1e-4 * float(ref.abs().max()), err
    assert float((swapped - ref).abs().max()) > 100 * err  # the test can tell C_v from C_k


@pytest.mark.parametrize("kernels", ["triton", "reference"])
def test_fast_unet_epilogues_and_time_tables(unet_graph, kernels):
    """The fused epilogues (conv biases folded into the time vector and the residual kernel, add +
    LayerNorm) against FastUNet without them and the plain UNet, and the GEGLU inside its GEMM
    (geglu_gemm, in feed-forward chunks; whole with the references); the time tables (every step's
    time vectors computed once, the call reads row t_index) against computing them in the call.
    Under the Triton interpreter (~4 s a UNet call) only the calls whose kernels differ run: the
    unfused path, the whole-GEMM GEGLU and the tables (PyTorch indexing) are the references' case."""
    from pm_runtime.modeling.fast_unet import FastUNet

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    c_k, c_v = torch.randn(2, 2, 77, 32, generator=g)
    steps = torch.tensor([981.0, 500.5, 1.0])
    fast = FastUNet(unet_graph.unet)
    assert all(r.pm_time_bias is not None and r.pm_out_bias is not None for r in fast.resnets)
    # conv_in's and the resamplers' biases left to the ResNets after them (input_shifts): the first
    # ResNet (identity residual) and up-path ResNets (concatenated skips, 1x1 shortcuts) carry shifts
    shifted = [r for r in fast.resnets if r.pm_in_shift is not None]
    assert fast.resnets[0] in shifted and any(r.conv_shortcut is not None for r in shifted)
    every = kernels == "reference" or torch.cuda.is_available()  # a GPU runs Triton at full speed
    outs = {}
    with torch.no_grad():
        ref = unet_graph(x, steps[1].expand(2), c_k, c_v)
        outs["fused"] = fused = fast(x, steps[1].expand(2), c_k, c_v)
        if every:
            fast.fused_epilogues = False
            outs["unfused"] = fast(x, steps[1].expand(2), c_k, c_v)
            fast.fused_epilogues = True
        fast.geglu_gemm = True  # the GEGLU in its projection's GEMM (pm_kernels.geglu_linear), whole and chunked
        if every:
            outs["in_gemm"] = fast(x, steps[1].expand(2), c_k, c_v)
        fast.ff_chunk = 37
        outs["in_gemm_chunked"] = fast(x, steps[1].expand(2), c_k, c_v)
        fast.geglu_gemm, fast.ff_chunk = False, None
        if every:
            fast.allocate_time_tables(8)
            assert fast.time_table.shape == (8, sum(r.norm2.weight.shape[0] for r in fast.resnets))
            fast.set_timesteps(steps)
            rows = [fast(x, steps[0], c_k, c_v, t_index=torch.tensor([i])) for i in (1, 2)]
            # timestep 1's vectors computed in the call: `fused` above (the same settings, before the tables)
            direct = [fused, fast(x, steps[2].expand(2), c_k, c_v)]
    scale = float(ref.abs().max())
    assert len(outs) == (4 if every else 2)
    for name, out in outs.items():
        assert float((out - ref).abs().max()) <= 1e-4 * scale, name
    if every:
        for row, want in zip(rows, direct):  # row i is timestep i's, whatever `timestep` says
            assert float((row - want).abs().max()) <= 1e-5 * scale
        assert float((rows[0] - rows[1]).abs().max()) > 1e-2 * scale  # the rows really differ


def test_fast_unet_two_row_step_contexts(unet_graph):
    """allocate_step_contexts / set_step_contexts (the torch-cuda step's kv_step): every cross-attention's
    to_k / to_v weights become views of ONE concatenated matrix each (no copy), a row of all layers'
    K and V comes from one GEMM each, and the UNet reading rows [0, 1] of the two-row buffers equals
    it reading the per-image tables' rows [0, r] and the contexts themselves."""
    import copy

    from pm_runtime.modeling.fast_unet import FastUNet

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([500.0, 500.0])
    c_k, c_v = torch.randn(2, 5, 77, 32, generator=g)  # 5 context rows: 0 the negative prompt's
    fast = FastUNet(copy.deepcopy(unet_graph.unet))
    assert fast.step_contexts_supported()
    with torch.no_grad():
        direct = fast(x, t, c_k[[0, 3]], c_v[[0, 3]])
        fast.allocate_context_tables(8, 77)
        fast.set_contexts(c_k, c_v)
        tables = fast(x, t, kv_index=torch.tensor([0, 3]))
        fast.allocate_step_contexts(77)
        fast.set_step_contexts(c_k[:1], c_v[:1], 0)
        fast.set_step_contexts(c_k[3:4], c_v[3:4], 1)
        two_rows = fast(x, t, kv_index=torch.tensor([0, 1]))
    scale = float(direct.abs().max())
    assert float((tables - direct).abs().max()) <= 1e-5 * scale
    assert float((two_rows - direct).abs().max()) <= 1e-5 * scale
    k_all = fast.pm_to_k_all
    assert k_all.shape[0] == sum(a.to_k.weight.shape[0] for a in fast.cross)
    assert all(a.to_k.weight.untyped_storage().data_ptr() == k_all.untyped_storage().data_ptr() for a in fast.cross)
    assert all(a.to_v.weight.untyped_storage().data_ptr() == fast.pm_to_v_all.untyped_storage().data_ptr()
               for a in fast.cross)
    fast.allocate_step_contexts(77)  # again: nothing fused twice
    assert fast.pm_to_k_all.data_ptr() == k_all.data_ptr()
    assert fast.step_kv_buffers[0].shape == (2, 77, k_all.shape[0])


def test_fast_unet_channels_last_in_place(unet_graph, monkeypatch):
    """The layout the GPU runs (channels-last activations), here on the CPU: there the residual GEMMs
    accumulate in place into views of the transformers' inputs, which NCHW tensors never exercise
    (their 2-D view is a copy); the result must still be the plain UNet's."""
    import copy

    from pm_runtime.modeling.fast_unet import FastUNet

    unet = copy.deepcopy(unet_graph.unet).to(memory_format=torch.channels_last)
    fast = FastUNet(unet)
    monkeypatch.setattr(fast, "sample_format", lambda device: torch.channels_last)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 16, 8, generator=g)
    t = torch.tensor([700.0, 20.0])
    c_k, c_v = torch.randn(2, 2, 77, 32, generator=g)
    seen = []
    real = fast._transformer

    def transformer(tr, h, ctx):
        out = real(tr, h, ctx)
        seen.append(h.is_contiguous(memory_format=torch.channels_last) and out.data_ptr() == h.data_ptr())
        return out

    monkeypatch.setattr(fast, "_transformer", transformer)
    with torch.no_grad():
        ref = unet_graph(x, t, c_k, c_v)
        out = fast(x, t, c_k, c_v)
    assert seen and all(seen)  # every transformer's output was written into its channels-last input
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_unsupported_unets_are_named(unet_graph):
    from pm_runtime.modeling.fast_unet import FastUNet, unsupported

    r = unet_graph.unet.down_blocks[0].resnets[0]
    old = r.output_scale_factor
    try:
        r.output_scale_factor = 2.0
        assert "ResNet" in unsupported(unet_graph.unet)
        with pytest.raises(ValueError, match="does not support"):
            FastUNet(unet_graph.unet)
    finally:
        r.output_scale_factor = old


LOOP_KINDS = ["plain", "fast-kv-tables", "plain-sequential", "fast-kv-tables-sequential", "fast-kv-step",
              "fast-kv-step-sequential", "plain-triton", "plain-triton-sequential"]
# the solvers (a -karras name steps as its solver does, on other coefficients: test_schedulers_linear), and
# DPM-Solver++ SDE: history and noise in one step
LOOP_SCHEDULERS = ["dpmpp-2m", "ddim", "euler", "euler-a", "dpmpp-2m-sde-karras"]


def loop_cover(name, unet_kind):
    """The default run's part of the grid: every loop with DPM-Solver++ SDE (each scheduler is the same affine
    step, on its own coefficients, and that one's has every term: history and noise), every scheduler in the
    plain loop and in the one whose step arithmetic is Triton's; -m slow: the rest."""
    return name == "dpmpp-2m-sde-karras" or unet_kind in ("plain", "plain-triton")


@pytest.mark.parametrize("name, unet_kind", slow_unless(
    [(name, kind) for kind in LOOP_KINDS for name in LOOP_SCHEDULERS], loop_cover))
def test_device_loop_matches_the_host_loop(unet_graph, name, unet_kind):
    """StepGraph (eager here) against denoise_on_host with the plain UNet, same contexts and noise;
    with FastUNet the step reads per-image K/V and time tables by row index (kv-step: two-row K/V
    buffers, the step's own row computed in the step: kv_step); `sequential` runs the
    unconditional and conditional halves as two UNet calls (low-memory mode's default); "triton":
    the step's own arithmetic (pm_kernels.scaled_copies, guided_update) in Triton (interpreter) around
    the plain UNet (FastUNet under the interpreter is test_fast_unet_*'s), else their references."""
    import pm_kernels

    assert pm_kernels.kernel_path("step_update", torch.zeros(1)) == ("triton" if "triton" in unet_kind
                                                                     else "reference")
    from pm_runtime.backends.torch import TorchNetwork
    from pm_runtime.modeling.fast_unet import FastUNet
    from pm_runtime.modeling.step_graph import StepGraph
    from pm_runtime.schedulers.linear import linear_steps

    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
              "set_alpha_to_one": False, "clip_sample": False}
    tables = schedulers.make_tables(name, config, 9)
    rng = np.random.default_rng(3)
    n, rows = 2, 4
    latents = rng.standard_normal((n, 4, 8, 8)).astype(np.float32) * np.float32(tables.init_noise_sigma)
    c_k = rng.standard_normal((rows, 77, 32)).astype(np.float32)
    c_v = rng.standard_normal((rows, 77, 32)).astype(np.float32)
    step_rows = np.array([1, 1, 2, 2, 2, 3, 3, 3, 3])
    noise = rng.standard_normal((9, n, 4, 8, 8)).astype(np.float32)
    net = TorchNetwork(unet_graph, ["sample", "timestep", "c_k", "c_v"], ["noise_pred"], "cpu", torch.float32)
    seen = []
    job = DenoiseJob(latents, c_k, c_v, step_rows, tables, 7.5, (lambda i: noise[i]), lambda i: None, seen.append)
    host = denoise_on_host(net, job)
    fast = unet_kind.startswith("fast")
    loop = StepGraph(FastUNet(unet_graph.unet) if fast else unet_graph, n=n, latent_shape=(4, 8, 8),
                     context_shape=(77, 32), rows=8, dtype=torch.float32, device="cpu",
                     sequential=unet_kind.endswith("sequential"), kv_step="kv-step" in unet_kind)
    assert loop.indexed == loop.timed == fast and loop.step_kv == ("kv-step" in unet_kind)
    with torch.inference_mode():
        dev = loop.run(latents, c_k, c_v, step_rows, linear_steps(tables), 7.5, noise, lambda i: None, seen.append)
    assert seen == list(range(9)) * 2
    scale = max(1.0, float(np.abs(host).max()))
    assert np.isfinite(dev).all() and float(np.abs(dev - host).max()) <= 2e-5 * scale
    # the same StepGraph serves the next image with other tables (buffers reloaded, counter reset)
    with torch.inference_mode():
        again = loop.run(latents, c_k, c_v, step_rows, linear_steps(tables), 7.5, noise, lambda i: None,
                         lambda i: None)
    np.testing.assert_array_equal(again, dev)


@pytest.fixture(scope="module")
def fast_pipe(run_bundle):
    return Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice")


@pytest.fixture(scope="module")
def ort_pipe_here(run_bundle):
    return Pipeline.load(run_bundle, backend="onnxruntime", concept="alice")


@pytest.mark.parametrize("scheduler", ["dpmpp-2m", "euler-a"])
def test_backend_matches_onnxruntime(fast_pipe, ort_pipe_here, scheduler):
    kw = dict(seed=233, steps=8, scheduler=scheduler, height=256, width=256, num_images=2)
    ref = ort_pipe_here.generate(PROMPT, **kw)
    fast = fast_pipe.generate(PROMPT, **kw)
    assert fast.backend.startswith("torch-cuda") and "cpu float32 (eager, " in fast.backend
    assert "convolutions packed for oneDNN" in fast.backend  # the CPU default (test_cpu_convs)
    assert fast.uses_concept and fast.timings["unet_steps"] == 8
    assert fast.timings["vae_calls"] == 2 and ref.timings["vae_calls"] == 1  # torch-cuda decodes image by image
    assert psnr(fast.images, ref.images) >= 40.0


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_image_equals_onnxruntimes(fast_pipe, ort_pipe_here, upscaler):
    """The hires fix (pipeline: a second pass at 1.5x the size, from its own schedule's step 3 of 6): torch-cuda
    runs that pass at its own size on its device as onnxruntime does (lanczos: through its VAE encoder)."""
    kw = dict(seed=5, steps=4, height=256, width=256, hires_scale=1.5, hires_steps=3, denoising_strength=0.5,
              hires_upscaler=upscaler)
    a, b = fast_pipe.generate(PROMPT, **kw), ort_pipe_here.generate(PROMPT, **kw)
    assert a.images.shape == (1, 384, 384, 3) and a.timings["unet_steps"] == 7
    assert int(np.abs(a.images.astype(int) - b.images.astype(int)).max()) <= 1


def test_img2img_image_equals_onnxruntimes(fast_pipe, ort_pipe_here):
    """img2img: torch-cuda's VAE encoder (the standalone module from the bundle's fp16 weights, parked in host
    memory between images) and its pass from a later step make onnxruntime's image."""
    from pm_runtime.specs import VAE_ENCODER

    photo = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    kw = dict(seed=5, steps=4, init_image=photo, denoising_strength=0.6)
    a, b = fast_pipe.generate(PROMPT, **kw), ort_pipe_here.generate(PROMPT, **kw)
    assert a.timings["unet_steps"] == 3 and VAE_ENCODER in fast_pipe.backend.modules
    assert int(np.abs(a.images.astype(int) - b.images.astype(int)).max()) <= 1


def test_emphasis_weighs_the_contexts_where_they_are(fast_pipe, ort_pipe_here, monkeypatch):
    """AUTOMATIC1111's emphasis: torch-cuda weighs the text encoder's outputs on its device (DeviceArray,
    no copy to the host), onnxruntime in numpy; the same image."""
    from pm_runtime.backends.torch import DeviceArray

    seen = []
    emphasised = DeviceArray.emphasised
    monkeypatch.setattr(DeviceArray, "emphasised", lambda self, *a: seen.append(a) or emphasised(self, *a))
    kw = dict(seed=233, steps=4, height=256, width=256)
    prompt = "a photo of (<persona>:1.3) as a [knight]"
    fast, ref = fast_pipe.generate(prompt, **kw), ort_pipe_here.generate(prompt, **kw)
    assert len(seen) == 2 and all(normalize for _, normalize in seen)  # c_k and c_v, "original"
    assert psnr(fast.images, ref.images) >= 40.0
    assert psnr(ref.images, ort_pipe_here.generate(prompt, emphasis="none", **kw).images) < 40.0  # it weighs


def test_long_prompts_regroup_the_chunks_where_they_are(fast_pipe, ort_pipe_here, monkeypatch):
    """A prompt of 2 chunks (A1111's 75-token chunks; BREAK starts the second) beside a negative prompt of
    3: torch-cuda lines the chunks up on its device (DeviceArray.regrouped, 6 chunks per row), onnxruntime
    in numpy; the same image, and a different one from the prompt cut to one chunk."""
    from pm_runtime.backends.torch import DeviceArray

    seen = []
    regrouped = DeviceArray.regrouped
    monkeypatch.setattr(DeviceArray, "regrouped", lambda self, i: seen.append(i.shape) or regrouped(self, i))
    kw = dict(seed=233, steps=4, height=256, width=256, negative_prompt="ugly, " * 100)
    prompt = "a photo of (<persona>:1.2) as a knight BREAK on a beach at sunset"
    fast, ref = fast_pipe.generate(prompt, **kw), ort_pipe_here.generate(prompt, **kw)
    assert seen and all(shape[1] == 6 for shape in seen) and not fast.warnings
    assert psnr(fast.images, ref.images) >= 40.0
    assert psnr(ref.images, ort_pipe_here.generate(prompt.replace("BREAK", ""), **kw).images) < 40.0


def test_a_scheduled_negative_prompt_reads_table_rows(fast_pipe, ort_pipe_here):
    """kv_step computes the negative prompt's K/V once per image; a negative prompt that changes between steps
    takes the step graph with a K/V table row per context instead (its own loop), the same image as
    onnxruntime's; a fixed negative prompt gets the kv_step graph back."""
    kw = dict(seed=233, steps=4, height=256, width=256, negative_prompt="[ugly:blurry:0.5]")
    fast, ref = fast_pipe.generate(PROMPT, **kw), ort_pipe_here.generate(PROMPT, **kw)
    loop = next(iter(fast_pipe.backend._loops.values()))
    assert not loop.step_kv and loop.indexed and fast.negative_step_texts == ref.negative_step_texts
    assert psnr(fast.images, ref.images) >= 40.0
    fast_pipe.generate(PROMPT, **{**kw, "negative_prompt": "ugly"})
    assert next(iter(fast_pipe.backend._loops.values())).step_kv


def test_kv_step_and_per_context_tables_give_the_same_image(run_bundle, fast_pipe):
    """kv_step (default): two-row K/V buffers, the step's own row computed in the step; kv_step=False:
    a table row per context, filled once per image. Same numbers (fp32 on the CPU)."""
    kw = dict(seed=9, steps=5, height=256, width=256)
    tables = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", kv_step=False)
    a, b = fast_pipe.generate(PROMPT, **kw), tables.generate(PROMPT, **kw)
    step, table = (next(iter(p.backend._loops.values())) for p in (fast_pipe, tables))
    assert step.step_kv and not table.step_kv and table.indexed
    assert step.unet.step_kv_buffers[0].shape[0] == 2 and next(iter(table.unet.kv_tables.values()))[0].shape[0] >= 32
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1


def test_the_tuning_note_reaches_the_pipeline_log(run_bundle):
    """Pipeline.load(log=...) gives the backend the log; the step graph calls the backend's note as a
    tuning session starts measuring (on a GPU: the gpu test above sees it in a real first image)."""
    notes = []
    pipe = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", log=notes.append)
    assert pipe.backend.log is not None
    pipe.backend._tuning_note(32, 40)
    import pm_kernels

    assert notes[-1].startswith("tuning kernels for this GPU at 256x320 px")
    assert str(pm_kernels.tuning.cache_file("cpu")) in notes[-1]
    assert f"at most {pm_kernels.tuning.BUDGET_S:g} s" in notes[-1]


def test_switching_concepts_reloads_nothing(fast_pipe):
    a = fast_pipe.generate(PROMPT, seed=1, steps=4, height=256, width=256)
    loads = dict(fast_pipe.backend.loads)
    fast_pipe.use_concept("alice-photo2")
    try:
        b = fast_pipe.generate(PROMPT, seed=1, steps=4, height=256, width=256)
    finally:
        fast_pipe.use_concept("alice")
    assert dict(fast_pipe.backend.loads) == loads and not np.array_equal(a.images, b.images)


def test_low_memory_mode_runs_and_frees(run_bundle, fast_pipe):
    low = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", low_memory=True)
    kw = dict(seed=5, steps=4, height=256, width=256)
    a, b = low.generate(PROMPT, **kw), fast_pipe.generate(PROMPT, **kw)
    assert low.backend.loads["unet"] == 1 and not low.backend._cache  # loaded for the stage, then freed
    assert low.backend.sequential_guidance and not low.backend.kv_tables  # low-memory defaults
    from pm_runtime.backends.torch_cuda import FF_CHUNK

    assert low.backend._load("unet").module.ff_chunk == FF_CHUNK and fast_pipe.backend.ff_chunk is None
    assert not low.backend._load("unet").module.geglu_gemm  # off by default; the option reaches FastUNet:
    low.backend._parked["unet"].detach()
    opted = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", geglu_gemm=True).backend
    assert opted._load("unet").module.geglu_gemm
    with pytest.raises(UserError, match="gn_impl"):
        Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", gn_impl="fast")
    with pytest.raises(UserError, match="ff_chunk"):
        Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", ff_chunk=-1)
    assert Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", low_memory=True, ff_chunk=0).backend.ff_chunk \
        is None
    parked = low.backend._parked
    assert set(parked) >= {"text_encoder", "unet", "vae_decoder"} and all(p.on_host() for p in parked.values())
    # the UNet's fused self-attention Q/K/V and the views of it rest in ONE host storage
    unet = parked["unet"]
    assert len(unet.bases) < len(unet.views)
    fused = [m for m in low.backend.modules["unet"].modules() if hasattr(m, "pm_qkv")]
    assert fused and all(a.to_q.weight.data_ptr() == a.pm_qkv.data_ptr() for a in fused)
    assert not fast_pipe.backend.sequential_guidance and fast_pipe.backend.kv_tables and fast_pipe.backend.kv_step
    assert psnr(a.images, b.images) >= 30.0  # tiled VAE decode blends tile seams (no tiles at 256 px: equal)


def test_offloaded_text_encoder(run_bundle, fast_pipe):
    """offload_text_encoder: the text encoder is attached for its call and detached after (its
    weights back on the host copies), the UNet stays; same image. (Its GPU memory effect is
    measured by pm-bench --gpu --ours torch-cuda-offload-te, not here.)"""
    pipe = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", offload_text_encoder=True)
    kw = dict(seed=9, steps=3, height=256, width=256)
    a = pipe.generate(PROMPT, **kw)
    b = pipe.generate(PROMPT, **kw)
    ref = fast_pipe.generate(PROMPT, **kw)
    backend = pipe.backend
    assert backend.loads["text_encoder"] == 2 and backend.loads["unet"] == 1
    assert "text_encoder" not in backend._cache and "unet" in backend._cache
    assert backend._parked["text_encoder"].on_host()
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.images, ref.images)


def test_torch_only_bundle(tiny_model, trained_concept, tmp_path):
    from pm_export.build import ExportConfig, export_bundle
    from pm_runtime.bundle import open_bundle

    out = export_bundle(ExportConfig(concept=trained_concept, model=tiny_model, out=tmp_path / "b", target="torch"),
                        log=lambda m: None)
    b = open_bundle(out)
    assert {c["format"] for c in b.components} == {"torch"}
    assert sorted(p.name for p in (out / "torch").iterdir()) == [
        "text_encoder.fp16.safetensors", "unet.fp16.safetensors", "vae_decoder.fp16.safetensors",
        "vae_encoder.fp16.safetensors"]
    with pytest.raises(UserError, match="no ONNX"):
        Pipeline.load(out, backend="onnxruntime")
    pipe = Pipeline.load(out, backend="torch-cuda", device="cpu")
    assert pipe.generate(PROMPT, seed=2, steps=2, height=256, width=256).images.shape == (1, 256, 256, 3)
    with pytest.raises(UserError, match="--target"):
        export_bundle(ExportConfig(concept=trained_concept, model=tiny_model, out=tmp_path / "c", target="onnx,gguf"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_without_cuda_auto_skips_and_explicit_request_explains(run_bundle):
    pipe = Pipeline.load(run_bundle, backend="auto", log=(lines := []).append)
    assert pipe.backend.name == "onnxruntime" and "torch-cuda: no CUDA device" in lines[0]
    with pytest.raises(UserError, match=r"backend torch-cuda: no CUDA device .* \(--device cpu runs it on the CPU"):
        Pipeline.load(run_bundle, backend="torch-cuda")  # no device named: the hint
    with pytest.raises(UserError, match="backend torch-cuda: no CUDA device is available to PyTorch here$"):
        Pipeline.load(run_bundle, backend="torch-cuda", device="cuda")  # cuda asked for: no hint to drop it


def test_auto_on_a_cpu_takes_torch_cuda_only_for_a_dtype_or_as_the_last_resort(run_bundle, cuda_bundle):
    """--device cpu with auto: onnxruntime (faster than torch-cuda's fp32 eager path); a dtype (e.g.
    bfloat16 on CPUs with AMX) is a PyTorch option: the exported-graph backends decline it, named or
    not; a torch-only bundle still runs on torch-cuda, the only backend that can."""
    from pm_runtime.backends.base import select_backend

    b, torch_only = open_bundle(run_bundle), open_bundle(cuda_bundle)
    cls, why = select_backend(b, "auto", device="cpu")
    assert cls.name == "onnxruntime" and "torch-cuda: on a CPU, auto leaves it to onnxruntime" in why
    cls, why = select_backend(b, "auto", device="cpu", dtype="bfloat16")
    assert cls.name == "torch-cuda"
    cls, why = select_backend(torch_only, "auto", device="cpu")
    assert cls.name == "torch-cuda" and "the only one" in why
    cls, _ = select_backend(b, "torch-cuda", device="cpu")  # named: runs
    assert cls.name == "torch-cuda"
    with pytest.raises(UserError, match="--dtype is for the PyTorch backends.*onnxruntime runs the precision"):
        select_backend(b, "onnxruntime", device="cpu", dtype="bfloat16")
    with pytest.raises(UserError, match="--dtype is for the PyTorch backends.*tensorrt"):
        select_backend(b, "tensorrt", dtype="float16")


def test_bfloat16_on_the_cpu_channels_last_close_to_float32(run_bundle, fast_pipe):
    """torch-cuda on a CPU in bfloat16: the same image as float32 within bfloat16's drift; the UNet's
    weights rest channels-last from the load on (no copy when a stage loads it, nor per call)."""
    kw = dict(seed=5, steps=4, height=256, width=256)
    bf = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", dtype="bfloat16")
    assert "bfloat16" in bf.backend.describe()
    # without Triton the fused epilogues' PyTorch paths add in fp32 copies: off in 16-bit on a CPU,
    # the VAE channels-last there (oneDNN's layout); fp32 on a CPU (the tests' GPU logic) keeps both
    assert not bf.backend.fused_epilogues and bf.backend.vae_channels_last
    assert fast_pipe.backend.fused_epilogues and not fast_pipe.backend.vae_channels_last
    unet = bf.backend.modules["unet"].unet
    convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and w.dtype == torch.bfloat16
                         for w in convs)
    before = [w.data_ptr() for w in convs]
    got = bf.generate(PROMPT, **kw).images
    assert [w.data_ptr() for w in convs] == before
    want = fast_pipe.generate(PROMPT, **kw).images  # float32
    assert psnr(got, want) >= 30.0 and not np.array_equal(got, want)
    vae = bf.backend.modules["vae_decoder"]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in vae.modules()
               if isinstance(m, torch.nn.Conv2d))


@pytest.mark.gpu
@needs_cuda
def test_gpu_fast_path_matches_the_reference(cuda_bundle, tiny_model):
    """fp16 + channels-last + Triton kernels + CUDA graph against the reference backend's fp32 image
    (the original modules, on the CPU)."""
    fast = Pipeline.load(cuda_bundle, backend="torch-cuda", device="cuda", concept="alice")
    ref = Pipeline.load(cuda_bundle, backend="torch", device="cpu", model=tiny_model, concept="alice")
    kw = dict(seed=233, steps=10, height=256, width=256)
    a, b = fast.generate(PROMPT, **kw), ref.generate(PROMPT, **kw)
    assert "CUDA graph" in a.backend
    assert psnr(a.images, b.images) >= 30.0
    # img2img: the fp16 encoder (weights parked in host memory, on the GPU for its call) from a's image
    i2i = dict(kw, init_image=a.images[0], denoising_strength=0.6)
    c, d = fast.generate(PROMPT, **i2i), ref.generate(PROMPT, **i2i)
    assert c.settings.img2img.start == 3 and psnr(c.images, d.images) >= 30.0


def test_integrated_gpus_keep_weights_in_place_in_low_memory_mode(run_bundle, monkeypatch):
    """Where the GPU's memory is the host's (torch_cuda.unified_memory: forced here, on the CPU
    device), low-memory mode parks nothing (a host copy frees nothing there) but keeps its other
    savings; the same image as the parked run; park_weights=True brings parking back."""
    from pm_runtime.backends import torch_cuda

    kw = dict(seed=5, steps=3, height=256, width=256)
    parked = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", low_memory=True)
    want = parked.generate(PROMPT, **kw).images
    assert parked.backend._parked and not parked.backend.unified_memory
    monkeypatch.setattr(torch_cuda, "unified_memory", lambda device: True)
    # (packed CPU convolutions would replace the weights this test follows; on a real integrated GPU
    # the device is CUDA, where nothing is packed)
    low = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", low_memory=True,
                        cpu_packed_convs=False)
    be = low.backend
    assert be.unified_memory and not be.park_weights and be._parked == {} and be.home == be.torch_device
    assert not be.offload_safety_checker and "integrated GPU" in be.describe()
    assert be.sequential_guidance and not be.kv_tables and be.ff_chunk  # the other low-memory savings stay
    weights = {n: p.data_ptr() for n, p in be.modules["unet"].named_parameters()}
    got = [low.generate(PROMPT, **kw).images for _ in range(2)]
    assert be.loads["unet"] == 2 and not be._cache and not be._loops  # loaded per stage, its graphs freed
    assert {n: p.data_ptr() for n, p in be.modules["unet"].named_parameters()} == weights  # never copied
    assert np.array_equal(got[0], want) and np.array_equal(got[1], want)
    forced = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", low_memory=True, park_weights=True).backend
    assert forced.park_weights and set(forced._parked) >= {"unet", "text_encoder", "vae_decoder"}
    on = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", offload_text_encoder=True).backend
    assert not on.offload_text_encoder and not on._parked


@pytest.mark.gpu
@needs_cuda
def test_gpu_low_memory_moves_keep_shared_weights_shared(cuda_bundle):
    """Low-memory mode attaches the UNet's host storages to the GPU once each: the fused Q/K/V and
    its views stay one copy on the device, 4-D weights arrive channels-last, and after the stage
    every weight points back at the pinned host copies."""
    low = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", low_memory=True)
    parked = low.backend._parked["unet"]
    assert all(b.is_pinned() for b in parked.bases)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    parked.attach()
    torch.cuda.synchronize()
    fused = [m for m in low.backend.modules["unet"].modules() if hasattr(m, "pm_qkv")]
    assert fused and all(a.pm_qkv.is_cuda and a.to_q.weight.data_ptr() == a.pm_qkv.data_ptr() for a in fused)
    grown = torch.cuda.memory_allocated() - before
    assert grown <= sum(b.nbytes() for b in parked.bases) + 512 * len(parked.bases)  # allocator rounding only
    convs = [m.weight for m in low.backend.modules["unet"].modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    parked.detach()
    assert parked.on_host()
    a = low.generate(PROMPT, seed=3, steps=4, height=256, width=256)
    b = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", low_memory=True, kv_tables=True,
                      sequential_guidance=False).generate(PROMPT, seed=3, steps=4, height=256, width=256)
    assert psnr(a.images, b.images) >= 35.0  # the low-memory defaults change the arithmetic order only


@pytest.mark.gpu
@needs_cuda
def test_gpu_repeated_captures_do_not_grow_memory(cuda_bundle):
    """Low-memory mode captures its step graph once per image; all captures warm up on one stream,
    so PyTorch does not keep one more cuBLAS workspace per capture (it did: +32 MiB allocated per
    image on an H200)."""
    low = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", low_memory=True)
    kw = dict(seed=3, steps=2, height=256, width=256)
    low.generate(PROMPT, **kw)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        low.generate(PROMPT, **kw)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 2**20


@pytest.mark.gpu
@needs_cuda
def test_gpu_vae_graph_and_offloaded_text_encoder_give_the_same_image(cuda_bundle):
    """vae_graph (the VAE decode captured in the step graph's memory pool), offload_text_encoder and
    the text encoder's CUDA graph change where memory lives and how kernels are launched, not the
    image: the same bytes as the default fast path (within one level)."""
    kw = dict(seed=4, steps=6, height=256, width=256)
    plain = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice")
    lean = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", vae_graph=True, offload_text_encoder=True)
    a = plain.generate(PROMPT, **kw).images
    b = lean.generate(PROMPT, **kw).images
    c = lean.generate(PROMPT, **{**kw, "height": 320})  # another shape: the decoder graph is captured again
    assert c.images.shape[1] == 320
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    np.testing.assert_array_equal(b, lean.generate(PROMPT, **kw).images)  # replayed again after a re-capture
    # the text encoder's CUDA graph (te_graph, default on; off when it is offloaded as in `lean`)
    eager_te = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", te_graph=False)
    assert np.abs(a.astype(int) - eager_te.generate(PROMPT, **kw).images.astype(int)).max() <= 1
    other = "a photo of <persona> reading a book, by a window"
    np.testing.assert_array_equal(plain.generate(other, **kw).images, plain.generate(other, **kw).images)
    # the VAE decoder channels-last (vae_channels_last, default on) against NCHW, and parked in
    # low-memory mode (its weights rest channels-last in host memory)
    nchw = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", vae_channels_last=False)
    assert plain.backend.modules["vae_decoder"].vae.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(a.astype(int) - nchw.generate(PROMPT, **kw).images.astype(int)).max() <= 1


@pytest.mark.gpu
@needs_cuda
def test_gpu_tuned_kernels_give_the_untuned_image_and_tune_once(cuda_bundle, tmp_path, monkeypatch):
    """tune (default on): before the first capture of a shape, one eager step in a pm_kernels.tuning
    session chooses each tunable call's implementation on this GPU; the image stays the untuned
    one's (other kernels, the same function: within fp16 rounding), the choices land in the cache
    file with the step's signature, and a second load of the same shape tunes nothing again."""
    import json

    import pm_kernels

    T = pm_kernels.tuning
    monkeypatch.setenv("PM_KERNELS_TUNE_DIR", str(tmp_path / "tuning"))  # nothing tuned yet
    # on, with a budget that finishes the session, whatever the environment says (the GPU check runs
    # the other tests with PM_KERNELS_TUNE=0: tuning the tiny model's shapes there only costs time)
    monkeypatch.setattr(T, "_ENABLED", True)
    monkeypatch.setattr(T, "BUDGET_S", max(T.BUDGET_S, 600.0))
    T.forget()
    kw = dict(seed=4, steps=6, height=256, width=256)
    untuned = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", tune=False).generate(PROMPT, **kw)
    assert not (tmp_path / "tuning").exists()
    notes = []
    tuned_pipe = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", log=notes.append)
    tuned = tuned_pipe.generate(PROMPT, **kw)
    assert [n for n in notes if n.startswith("tuning kernels for this GPU at 256x256 px")], notes
    assert psnr(tuned.images, untuned.images) >= 35
    loop = next(iter(tuned_pipe.backend._loops.values()))
    data = json.loads(T.cache_file("cuda").read_text())
    assert loop.signature() in data["sessions"]
    ops = {k.split("|")[0] for k in data["choices"]}
    assert {"attention", "group_norm_silu", "geglu_projection"} <= ops, ops
    for key, entry in data["choices"].items():
        assert entry["choice"] in entry["us"] and "rejected" not in entry, (key, entry)
    T.forget()  # a new process: the file only
    notes.clear()
    again = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", log=notes.append).generate(PROMPT, **kw)
    assert not [n for n in notes if n.startswith("tuning kernels")], notes
    np.testing.assert_array_equal(again.images, tuned.images)
    assert json.loads(T.cache_file("cuda").read_text()) == data  # nothing measured or added
    T.forget()  # (the next tests' tables come from their own folder again)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kv_step", [False, True])
def test_gpu_shared_pool_same_images_one_pool(cuda_bundle, kv_step):
    """shared_pool: the VAE decode, the K/V fill (kv_step=False; kv_step's two-row buffers sit
    outside the pool), the step and (from the second image) the text
    encoder captured into ONE pool, their warm-ups allocating from it, the K/V tables left for the
    decode to reuse: the default's images (the K/V GEMMs run over every row of the buffers here, so
    within one level), images that stay the same over repeated calls, a prompt with other contexts,
    another size (all graphs captured again in a new pool), and the step alone replayed after the
    decode once refilled."""
    kw = dict(seed=4, steps=6, height=256, width=256)
    plain = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice")
    shared = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", shared_pool=True, kv_step=kv_step)
    a = plain.generate(PROMPT, **kw).images
    first = shared.generate(PROMPT, **kw).images  # the text encoder eagerly: no pool before the step graph
    assert (next(iter(shared.backend._loops.values())).kv_fill is None) == kv_step
    second = shared.generate(PROMPT, **kw).images  # the text encoder captured into the pool now
    backend = shared.backend
    pools = backend.graph_pools()
    assert len(pools) == 1 and set(next(iter(pools.values())).split("+")) == {"step", "vae_decoder", "text_encoder"}
    assert np.abs(a.astype(int) - first.astype(int)).max() <= 1
    assert np.abs(first.astype(int) - second.astype(int)).max() <= 1  # the text encoder eager, then graphed
    np.testing.assert_array_equal(second, shared.generate(PROMPT, **kw).images)  # replays: the same bytes
    other = "a photo of <persona> reading a book, by a window"
    assert np.abs(plain.generate(other, **kw).images.astype(int)
                  - shared.generate(other, **kw).images.astype(int)).max() <= 1
    old_pool = backend._pool
    c = shared.generate(PROMPT, **{**kw, "height": 320})
    assert c.images.shape[1] == 320 and backend._pool is not old_pool
    np.testing.assert_array_equal(second, shared.generate(PROMPT, **kw).images)
    # the text encoder parked in host memory, its weights borrowing the pool's memory from the second image
    lean = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", shared_pool=True,
                         offload_text_encoder=True, kv_step=kv_step)
    for _ in range(2):
        assert np.abs(a.astype(int) - lean.generate(PROMPT, **kw).images.astype(int)).max() <= 1
    loop = next(iter(backend._loops.values()))
    x = loop.x.clone()
    loop.refill()
    loop.step.zero_()
    loop.graph.replay()  # the step alone after the decode overwrote the tables' memory: refilled first
    assert torch.isfinite(loop.x).all() and not torch.equal(loop.x, x)


def test_shared_pool_order_and_bookkeeping_with_stand_in_graphs(run_bundle, fast_pipe, monkeypatch):
    """shared_pool's logic on the CPU: CUDA graphs are replaced by stand-ins that run the captured
    function again at every replay (copying into the outputs it returned at capture), so the
    backend's own code decides what is captured, when, into which pool, and what each replay
    reads. The images equal the eager path's; the VAE decode is captured first (largest
    activations first into a new pool), then the K/V fill, then the step, all into that one pool;
    the text encoder runs eagerly in the first image (no pool yet) and is captured into the pool in
    the second; the K/V tables are dropped once the step is captured (the fill graph allocates
    them again at each replay here, as its captured allocation would be rewritten on a GPU); a new
    image size releases every graph and makes a new pool."""
    import contextlib

    from pm_runtime.modeling import step_graph as sg

    captures, pools, routed = [], [], []

    class Pool:
        def __init__(self, device):
            self.id = (0, 100 + len(pools))
            self.captures = 0
            pools.append(self)

        def routing(self):
            routed.append(self)
            return contextlib.nullcontext()

    class Graph:
        def __init__(self, fn, pool, out):
            self.fn, self._pool, self.out = fn, pool, out

        def replay(self):
            out = self.fn()
            for static, new in zip(self.out or (), out or ()):
                static.copy_(new)

        def pool(self):
            return self._pool.id

    def capture(fn, device, warm_up, pool=None):
        assert isinstance(pool, Pool), "every shared_pool capture goes to the shared pool"
        with pool.routing() if pool.captures else contextlib.nullcontext():  # as capture_graph routes them
            for call in warm_up:
                call()
        out = fn()
        pool.captures += 1
        name = getattr(getattr(fn, "__self__", None), "name", None) or fn.__name__
        captures.append((name, pool))
        return Graph(fn, pool, out), out

    from pm_runtime.modeling.fast_unet import FastUNet

    drop = FastUNet.drop_context_tables
    monkeypatch.setattr(FastUNet, "drop_context_tables", lambda self: (captures.append(("drop", None)), drop(self)))
    monkeypatch.setattr(sg, "graphs_available", lambda device: True)
    monkeypatch.setattr(sg, "GraphPool", Pool)
    monkeypatch.setattr(sg, "capture_graph", capture)
    # the per-context K/V tables (kv_step=False): their fill graph and its hand-over to the pool are what
    # is followed here (kv_step's two-row buffers are allocated outside the graphs, as the time tables)
    shared = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", shared_pool=True,
                           kv_step=False)
    backend = shared.backend
    assert backend.shared_pool and backend.cuda_graph
    kw = dict(seed=5, steps=3, height=256, width=256)
    ref = fast_pipe.generate(PROMPT, **kw).images
    a = shared.generate(PROMPT, **kw).images
    # the fill's warm-up drops its eager tables before the capture; the step's capture is followed by
    # the drop that leaves the captured tables' memory to the pool
    assert [n for n, _ in captures] == ["vae_decoder", "drop", "fill", "_step", "drop"] and len(pools) == 1
    assert all(p is pools[0] for n, p in captures if n != "drop") and routed  # warm-ups routed to the pool
    assert next(iter(backend._loops.values())).kv_fill is not None
    b = shared.generate(PROMPT, **kw).images
    assert [n for n, _ in captures][5:] == ["text_encoder"] and captures[5][1] is pools[0]
    assert psnr(a, ref) > 60 and np.array_equal(a, b)
    (names,) = backend.graph_pools().values()  # one pool
    assert sorted(names.split("+")) == ["step", "text_encoder", "vae_decoder"]
    c = shared.generate(PROMPT, **{**kw, "height": 320})
    assert c.images.shape[1] == 320 and len(pools) == 2
    assert [n for n, p in captures if p is pools[1]] == ["vae_decoder", "fill", "_step"]
    assert [n for n, _ in captures][-2:] == ["_step", "drop"]
    assert backend._graphed[0].graph is None or backend._graphed[0].key[1] is pools[1]  # nothing left in the old pool
    np.testing.assert_array_equal(shared.generate(PROMPT, **kw).images, a)
    # close() lets every graph, engine and the pool go (a graphed network's module stayed referenced
    # before); a later image loads and captures anew, the same bytes
    graphed = list(backend._graphed)
    shared.close()
    assert backend._graphed == [] and backend._pool is None and not backend._loops
    assert all(g.graph is None and g.static_out == () for g in graphed)
    np.testing.assert_array_equal(shared.generate(PROMPT, **kw).images, a)
    assert len(backend._graphed) == 2 and not set(backend._graphed) & set(graphed)  # decoder, text encoder: new
    # a text encoder parked in host memory (offload_text_encoder): its weights copied into the pool for
    # its stage once the pool exists (not in the first image's, before the step graph made it)
    borrowed = []

    @contextlib.contextmanager
    def allocating_in(pool, device):
        borrowed.append(pool)
        yield

    monkeypatch.setattr(sg, "allocating_in", allocating_in)
    lean = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", shared_pool=True,
                         offload_text_encoder=True)
    first = lean.generate(PROMPT, **kw).images
    assert borrowed == [] and len(lean.backend._graphed) == 1  # the decode's graph; the parked encoder is eager
    second = lean.generate(PROMPT, **kw).images
    assert borrowed == [lean.backend._pool]
    np.testing.assert_array_equal(first, second)
    assert psnr(first, ref) > 60


@pytest.mark.gpu
@needs_cuda
def test_gpu_one_stream_same_images_nothing_on_the_default_stream(cuda_bundle):
    """one_stream: each stage's work on the graphs' stream; the images of the default path (same
    kernels; the stream only orders them), in default and low-memory mode, and the contexts' NaN
    check between stages sees finished values (the default stream waits on leaving a stage)."""
    kw = dict(seed=4, steps=6, height=256, width=256)
    for options in ({}, {"low_memory": True}, {"shared_pool": True}):
        plain = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", **options)
        one = Pipeline.load(cuda_bundle, backend="torch-cuda", concept="alice", one_stream=True, **options)
        a, b = plain.generate(PROMPT, **kw).images, one.generate(PROMPT, **kw).images
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, options
        np.testing.assert_array_equal(b, one.generate(PROMPT, **kw).images)


def test_graph_pool_routes_with_a_device_index(monkeypatch):
    """torch.cuda.use_mem_pool refuses a "cuda" device without an index (ValueError from
    _get_device_index, which it calls on its device argument): GraphPool("cuda") gives it one. The
    MemPool and use_mem_pool stood in for, the latter making the same device check."""
    import contextlib

    from torch.cuda._utils import _get_device_index

    from pm_runtime.modeling import step_graph as sg

    class MemPool:
        id = (0, 3)

    checked = []

    def use_mem_pool(pool, device=None):
        checked.append(_get_device_index(device))  # what use_mem_pool does with a device it is given
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    class Device(contextlib.nullcontext):  # torch.cuda.device (a class: _get_device_index tests against it)
        pass

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "MemPool", MemPool, raising=False)
    monkeypatch.setattr(torch.cuda, "use_mem_pool", use_mem_pool, raising=False)
    with pytest.raises(ValueError, match="index"):
        use_mem_pool(MemPool(), torch.device("cuda"))  # the stand-in refuses what the real one refuses
    pool = sg.GraphPool("cuda")
    assert pool.id == (0, 3) and pool.device == torch.device("cuda", 0)
    with pool.routing():
        pass
    assert checked == [0]


def test_capture_graph_routes_warm_ups_into_a_used_shared_pool(monkeypatch):
    """step_graph.capture_graph with a GraphPool, torch.cuda's stream/graph calls stood in for:
    cuBLAS's workspace is made before any routing; the first capture's warm-ups run outside the
    pool (their cached blocks go back before the capture), later ones inside it; every capture
    takes the pool's id."""
    import contextlib
    import types

    from pm_runtime.modeling import step_graph as sg

    log = []

    class FakePool(sg.GraphPool):
        def __init__(self):
            self.id, self.captures, self.mem_pool = (0, 7), 0, None

        @contextlib.contextmanager
        def routing(self):
            log.append("route in")
            yield
            log.append("route out")

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        log.append(("capture", pool))
        yield

    fake_cuda = types.SimpleNamespace(stream=lambda s: contextlib.nullcontext(), current_stream=lambda d: side,
                                      CUDAGraph=object, graph=graph, empty_cache=lambda: log.append("empty"))
    side = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(sg, "_side_stream", lambda device: side)
    monkeypatch.setattr(sg, "_blas_outside_pools", lambda stream, device: log.append("blas"))
    monkeypatch.setattr(sg.torch, "cuda", fake_cuda)
    pool = FakePool()
    for _ in range(2):
        g, out = sg.capture_graph(lambda: log.append("fn") or 5, "cuda", warm_up=[lambda: log.append("warm")],
                                  pool=pool)
        assert out == 5
    assert log == ["blas", "warm", ("capture", (0, 7)), "fn", "empty",
                   "blas", "route in", "warm", "route out", ("capture", (0, 7)), "fn", "empty"]
    assert pool.captures == 2


def test_contexts_stay_on_the_device(fast_pipe, monkeypatch):
    """torch-cuda's text encoder returns DeviceArrays: the NaN check runs where they are and the step
    graph copies them in place, so they never go to host memory (their lazy host copy stays unmade);
    as numpy they read as the float32 contexts; NaN in them stops the pipeline as before."""
    from pm_runtime.backends import torch as tb
    from pm_runtime.pipeline import NonFiniteError, _check_finite

    made = []
    real = tb.DeviceArray.__init__

    def spy(self, tensor):
        real(self, tensor)
        made.append(self)

    monkeypatch.setattr(tb.DeviceArray, "__init__", spy)
    g = fast_pipe.generate(PROMPT, seed=5, steps=2, height=256, width=256)
    assert g.images.shape == (1, 256, 256, 3) and len(made) == 2  # c_k and c_v
    assert all(d._host is None for d in made)  # never copied to the host
    host = np.asarray(made[0])
    assert host.dtype == np.float32 and host.shape == made[0].shape and len(made[0]) == host.shape[0]
    bad = tb.DeviceArray(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(NonFiniteError, match="1 of 2"):
        _check_finite("text encoder output (contexts)", bad)


def test_masked_inputs_upload_only_what_the_network_reads(fast_pipe):
    """torch-cuda's text encoder network uploads its concept embeddings and bypass only at the
    concept positions (zeros elsewhere): the network reads them nowhere else, so the contexts equal
    those of a dense upload even with garbage outside the mask."""
    from pm_runtime.backends.torch import TorchNetwork

    with fast_pipe.backend.network("text_encoder") as te:
        sparse = te.engine
        assert sparse.masked_inputs == {"concept_embeds": "concept_mask", "bypass": "concept_mask"}
        dense = TorchNetwork(sparse.module, sparse.input_names, sparse.output_names, sparse.device, sparse.dtype)
        rng = np.random.default_rng(0)
        n, length, d = 3, 77, fast_pipe.bundle.dims.text_dim
        mask = np.zeros((n, length), bool)
        mask[0, 5:7] = mask[2, 9] = True
        feed = {"input_ids": rng.integers(0, 100, (n, length)).astype(np.int64),
                "concept_embeds": rng.standard_normal((n, length, d)).astype(np.float32),
                "bypass": rng.standard_normal((n, length, d)).astype(np.float32), "concept_mask": mask}
        a, b = sparse.run(feed), dense.run(feed)
        for name in ("c_k", "c_v"):
            np.testing.assert_array_equal(np.asarray(a[name]), b[name])
        none = sparse.run({**feed, "concept_mask": np.zeros_like(mask)})  # no concept position at all
        assert np.asarray(none["c_k"]).shape == (n, length, d)


def test_graphed_network_copies_in_and_out(fast_pipe):
    """torch-cuda's _GraphedNetwork (the text encoder as a CUDA graph per input shape; here, without
    CUDA, the same code eagerly on its static buffers): the same contexts as the plain network, each
    call's outputs its own (a later call does not overwrite them), a new shape captured anew."""
    from pm_runtime.backends.torch_cuda import _GraphedNetwork

    with fast_pipe.backend.network("text_encoder") as te:
        plain = te.engine
        graphed = _GraphedNetwork(plain)
        rng = np.random.default_rng(1)
        d = fast_pipe.bundle.dims.text_dim

        def feed(n):
            mask = np.zeros((n, 77), bool)
            mask[0, 4:6] = True
            return {"input_ids": rng.integers(0, 100, (n, 77)).astype(np.int64),
                    "concept_embeds": rng.standard_normal((n, 77, d)).astype(np.float32),
                    "bypass": rng.standard_normal((n, 77, d)).astype(np.float32), "concept_mask": mask}

        feeds = [feed(3), feed(3), feed(2)]
        outs = [graphed.run(f) for f in feeds]
        for f, out in zip(feeds, outs):  # the first call's outputs survive the later calls
            want = plain.run(f)
            for name in ("c_k", "c_v"):
                np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(want[name]))
        assert graphed.captures == 2  # (3, 77) twice: one capture; then (2, 77)
        assert not np.array_equal(np.asarray(outs[0]["c_k"]), np.asarray(outs[1]["c_k"]))


def test_parked_module_drops_what_was_derived_on_the_device():
    """_Parked (low-memory mode's weights in host memory): a buffer registered while the module was
    attached (FastUNet's fused Q/K/V or bias buffers on a diffusers UNet) is dropped on detach, so
    nothing stays on the device between stages; the parked weights and buffers stay."""
    from pm_runtime.backends.torch_cuda import _Parked

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    parked = _Parked(m, "cpu")
    parked.attach()
    m[0].register_buffer("pm_derived", m[0].weight.sum(0), persistent=False)
    parked.detach()
    assert "pm_derived" not in m[0]._buffers and parked.on_host()
    assert m[1].running_mean is not None and m[0].weight.shape == (4, 3)  # the slots themselves stay


def test_the_captured_work_never_touches_host_memory():
    """What a CUDA graph captures (the whole step in every variant, the VAE decode of vae_graph),
    run on the meta device at SD-1.5 shapes, never reads or writes a CPU tensor and never reads a
    value back to the host (.item(), nonzero): a host tensor in a captured op is baked into the graph
    at capture (a CPU scalar tensor's value) or cannot be captured at all (a pageable copy, a sync)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from pm_bench.live_memory import sd15_networks, sd15_step_graph
    from pm_runtime.modeling.fast_unet import FastUNet

    class HostTouches(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.total = collections.Counter(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.total += 1
            name = func.overloadpacket.__name__
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            if name in ("_local_scalar_dense", "nonzero", "item") or any(t.device.type != "meta" for t in tensors):
                self.ops[name] += 1
            return out

    unet, _, vae = sd15_networks(torch.float16)
    fast = FastUNet(unet)
    for sequential in (False, True):
        for time_tables, step_kernels, kv_tables, kv_step in ((True, True, True, True), (True, True, True, False),
                                                              (False, False, False, False)):
            loop = sd15_step_graph(fast, 512, torch.float16, sequential=sequential, time_tables=time_tables,
                                   step_kernels=step_kernels, kv_tables=kv_tables, kv_step=kv_step)
            assert loop.step_kv == kv_step
            mode = HostTouches()
            with torch.inference_mode(), mode:
                loop._step()
            assert mode.total > 200 and not mode.ops, (sequential, time_tables, step_kernels, dict(mode.ops))
    mode = HostTouches()
    with torch.inference_mode(), mode:
        vae(torch.empty(1, 4, 64, 64, device="meta", dtype=torch.float16))
    assert mode.total > 50 and not mode.ops, dict(mode.ops)
