"""pm_runtime.modeling.standalone: the networks built with PyTorch alone compute what the Hugging Face
classes compute on the same weights (SD 1.x-like and SD 2.x-like configs), refuse what they do
not compute, and keep diffusers/transformers out of a torch-cuda process (its start-up time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from pm_runtime.errors import UserError  # noqa: E402
from pm_runtime.modeling import standalone  # noqa: E402
from pm_runtime.modeling.bundle_weights import save_weights  # noqa: E402
from pm_runtime.modeling.graphs import (SafetyCheckerGraph, TextEncoderGraph, UNetGraph, VaeDecoderGraph,  # noqa: E402
                                        VaeEncoderGraph)
from pm_runtime.specs import SAFETY_CHECKER, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER  # noqa: E402
from pm_runtime.train.tiny_model import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, VISION_CONFIG  # noqa: E402

# SD 2.x-like: linear projections in the transformers, a head count per block, a 3-block UNet with
# a plain (attention-free) last down block, GELU in the text encoder.
UNET_SD2 = dict(UNET_CONFIG, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
                use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture(autouse=True)
def kernels_mode():
    """Without CUDA the FastUNet runs the kernels' PyTorch references (the Triton interpreter is slow;
    tests/test_kernels.py covers it)."""
    import pm_kernels

    pm_kernels.set_enabled(torch.cuda.is_available())
    yield
    pm_kernels.set_enabled(True)


def _hf_config(module) -> dict:
    cfg = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _state(module, keep=None) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if keep is None or k.startswith(keep)}


def _tiny_decoders() -> tuple:
    """(the tiny model's diffusers AutoencoderKL, the standalone VAE decoder built from its weights)."""
    torch.manual_seed(1)
    hf = diffusers.AutoencoderKL(**VAE_CONFIG).eval()
    return hf, standalone.build(VAE_DECODER, _state(hf, keep=("decoder.", "post_quant_conv.")), _hf_config(hf))


def _close(a, b, rel=1e-5):
    err = float((a - b).abs().max())
    assert err <= rel * max(float(b.abs().max()), 1.0), err
    return err


@pytest.mark.parametrize("config", [UNET_CONFIG, UNET_SD2], ids=["sd1", "sd2"])
def test_unet_tree_computes_diffusers_unet(config):
    from pm_runtime.modeling.attention import install_split_kv
    from pm_runtime.modeling.fast_unet import FastUNet

    torch.manual_seed(0)
    hf = diffusers.UNet2DConditionModel(**config).eval()
    install_split_kv(hf)
    tree = standalone.build(UNET, _state(hf), _hf_config(hf))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 8, generator=g)
    t = torch.tensor([999.0, 17.0])
    c_k, c_v = torch.randn(2, 2, 77, 32, generator=g)
    with torch.no_grad():
        ref = UNetGraph(hf)(x, t, c_k, c_v)
        fast_hf = FastUNet(hf)(x, t, c_k, c_v)
        fast_sa = FastUNet(tree)(x, t, c_k, c_v)
    assert torch.equal(fast_sa, fast_hf)  # same computation, same weights: the same numbers
    _close(fast_sa, ref, 1e-4)
    chunked = FastUNet(tree)
    chunked.ff_chunk = 37  # 128 tokens at the first level: 4 chunks, the last one short; 32 tokens below: whole
    with torch.no_grad():
        _close(chunked(x, t, c_k, c_v), fast_sa, 1e-6)  # low-memory mode's chunked feed-forward: same values
    # every parameter of the HF module is in the tree, the same tensor values
    n_tree = sum(p.numel() for p in tree.parameters())
    assert n_tree == sum(p.numel() for p in hf.parameters())


def test_vae_decoder_decodes_as_diffusers():
    hf, vae = _tiny_decoders()
    z = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = VaeDecoderGraph(hf)(z)
        out = VaeDecoderGraph(vae)(z)
    assert out.shape == ref.shape == (2, 3, 48, 80)
    _close(out, ref)
    # the ResNets' fused epilogues (default) against the plain blocks, on the references and, for one
    # block with a shortcut, under the Triton interpreter (pm_kernels' own paths)
    resnets = [m for m in vae.modules() if isinstance(m, standalone.Resnet)]
    assert any(r.conv_shortcut is not None for r in resnets) and all(r.fused_epilogues for r in resnets)
    for r in resnets:
        r.fused_epilogues = False
    with torch.no_grad():
        _close(VaeDecoderGraph(vae)(z), out)
    import pm_kernels

    r = next(r for r in resnets if r.conv_shortcut is not None)
    x = torch.randn(1, r.conv1.in_channels, 5, 7, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = r(x)
        r.fused_epilogues = True
        pm_kernels.set_enabled(True)
        try:
            assert pm_kernels.kernel_path("add_bias_residual", x) == ("triton" if os.environ.get("TRITON_INTERPRET")
                                                                     == "1" else "reference")
            _close(r(x), plain)
        finally:
            pm_kernels.set_enabled(torch.cuda.is_available())


def test_vae_encoder_encodes_as_diffusers():
    """The standalone encoder half (img2img) gives diffusers' encode(x).latent_dist.mode() x scaling_factor,
    on odd sizes too (the stride-2 convolutions' one-sided padding); its weights file keeps that half only."""
    torch.manual_seed(3)
    hf = diffusers.AutoencoderKL(**VAE_CONFIG).eval()
    enc = standalone.build(VAE_ENCODER, _state(hf, keep=("encoder.", "quant_conv.")), _hf_config(hf))
    for shape in [(2, 3, 48, 80), (1, 3, 40, 24)]:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(shape[2])) * 2 - 1
        with torch.no_grad():
            ref = hf.encode(x).latent_dist.mode() * hf.config.scaling_factor
            graph = VaeEncoderGraph(hf)(x)
            out = VaeEncoderGraph(enc)(x)
        f = 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
        assert out.shape == ref.shape == (shape[0], 4, shape[2] // f, shape[3] // f)
        _close(graph, ref, 1e-6)
        _close(out, ref)
    assert sum(p.numel() for p in enc.parameters()) == sum(
        p.numel() for n, p in hf.named_parameters() if n.startswith(("encoder.", "quant_conv.")))
    with pytest.raises(UserError, match="VAE encoder: down blocks"):
        standalone.build(VAE_ENCODER, {}, {**_hf_config(hf), "down_block_types": ["DownBlock2D"]})


def test_vae_decoder_consuming_blocks_same_values_less_memory():
    """The decoder's blocks take their inputs from a list they pop (Resnet.consume, _Sampler.upsample)
    and normalise dead inputs in place: under the Triton interpreter (in-place GroupNorm kernels)
    the same image as the plain blocks; at SD 1.5's shapes on the meta device (512 px, fp16) the
    activation peak is 256 MiB where the same blocks holding their inputs reach 320 MiB."""
    import pm_kernels

    from pm_bench.live_memory import peak_of
    from pm_bench.random_models import SD15_VAE_CONFIG

    _, vae = _tiny_decoders()
    z = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(2))
    pm_kernels.set_enabled(True)
    try:
        if os.environ.get("TRITON_INTERPRET") == "1":
            assert pm_kernels.kernel_path("group_norm_silu", z) == "triton"
        with torch.no_grad():
            out = vae(z)
            with torch.enable_grad():
                held = vae(z)  # with autograd on, the blocks keep their inputs (nothing in place)
        _close(out, held)
    finally:
        pm_kernels.set_enabled(torch.cuda.is_available())
    with torch.device("meta"):
        big = diffusers.AutoencoderKL(**SD15_VAE_CONFIG).to(torch.float16).eval()
    state = {k: v for k, v in big.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    ours = standalone.build(VAE_DECODER, state, dict(big.config)).eval()
    zm = torch.empty(1, 4, 64, 64, device="meta", dtype=torch.float16)
    peak, _ = peak_of(lambda: ours(zm))
    assert peak == 256 * 2**20
    for r in ours.modules():  # the blocks as they were: each holds its input while it runs
        if isinstance(r, standalone.Resnet):
            r.consume = lambda box, r=r: r(box.pop())
    peak_held, _ = peak_of(lambda: ours.forward_plain(zm))
    assert peak_held >= 320 * 2**20


def test_vae_decoder_channels_last_same_image():
    """torch-cuda's default VAE layout (vae_channels_last): the decoder's weights channels-last, its
    activations following, under the Triton interpreter (the GroupNorm's channels-last path, in
    place included), whole and in row bands: the NCHW decoder's image."""
    import copy

    import pm_kernels

    _, vae = _tiny_decoders()
    nhwc = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    z = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(2))
    pm_kernels.set_enabled(True)
    try:
        with torch.no_grad():
            for bands in (None, 16):
                vae.band_rows = nhwc.band_rows = bands
                ref, out = vae(z), nhwc(z)
                assert out.is_contiguous(memory_format=torch.channels_last) or bands
                _close(out, ref)
    finally:
        pm_kernels.set_enabled(torch.cuda.is_available())


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_text_encoder_contexts_and_attention_as_transformers(act):
    torch.manual_seed(2)
    cfg = transformers.CLIPTextConfig(**TEXT_CONFIG, vocab_size=300, hidden_act=act)
    hf = transformers.CLIPTextModel(cfg).eval()
    te = standalone.build(TEXT_ENCODER, _state(hf), _hf_config(hf))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (2, 77), generator=g)
    mask = torch.zeros(2, 77, dtype=torch.bool)
    mask[:, 5:9] = True
    concept, bypass = torch.randn(2, 2, 77, 32, generator=g)
    with torch.no_grad():
        ref = TextEncoderGraph(hf)(ids, concept, bypass, mask)
        out = TextEncoderGraph(te)(ids, concept, bypass, mask)
        ref_p = TextEncoderGraph(hf).encoder(ids, concept, bypass, mask, return_last_attention=True)[2]
        out_p = TextEncoderGraph(te).encoder(ids, concept, bypass, mask, return_last_attention=True)[2]
    for a, b in zip(out, ref):
        _close(a, b)
    _close(out_p, ref_p)
    assert not torch.equal(out[0], out[1])  # the bypass made C_v differ from C_k


def test_safety_checker_scores_as_diffusers():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(3)
    vision = {k: v for k, v in VISION_CONFIG.items() if k != "projection_dim"}
    cfg = transformers.CLIPConfig(text_config=dict(TEXT_CONFIG), vision_config=vision, projection_dim=16)
    hf = StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():
        hf.concept_embeds.copy_(torch.randn_like(hf.concept_embeds))
        hf.special_care_embeds.copy_(torch.randn_like(hf.special_care_embeds))
    checker = standalone.build(SAFETY_CHECKER, _state(hf), _hf_config(hf))
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _close(SafetyCheckerGraph(checker)(pixels), SafetyCheckerGraph(hf)(pixels))


def test_configs_it_does_not_compute_are_refused_by_name():
    assert standalone.unsupported(UNET, dict(UNET_CONFIG, class_embed_type="timestep")) == "class_embed_type='timestep'"
    assert "block types" in standalone.unsupported(UNET, dict(UNET_CONFIG, down_block_types=["SimpleCrossAttnDownBlock2D"] * 2))
    assert standalone.unsupported(UNET, dict(UNET_CONFIG)) is None
    assert "activation" in standalone.unsupported(VAE_DECODER, dict(VAE_CONFIG, act_fn="gelu"))
    assert "activation" in standalone.unsupported(TEXT_ENCODER, {"hidden_act": "relu"})
    with pytest.raises(UserError, match="class_embed_type"):
        standalone.build(UNET, {}, dict(UNET_CONFIG, class_embed_type="timestep"))


def test_weights_that_do_not_fit_are_errors():
    torch.manual_seed(4)
    hf = diffusers.AutoencoderKL(**VAE_CONFIG).eval()
    state, cfg = _state(hf, keep=("decoder.", "post_quant_conv.")), _hf_config(hf)
    extra = dict(state, **{"decoder.stray.weight": torch.zeros(1)})
    with pytest.raises(UserError, match="1 tensors this network does not have"):
        standalone.build(VAE_DECODER, extra, cfg)
    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(UserError, match="decoder.conv_out.bias is missing"):
        standalone.build(VAE_DECODER, missing, cfg)


def test_loader_falls_back_to_the_hf_class_where_standalone_does_not_fit(tmp_path):
    from pm_runtime.modeling.bundle_weights import load_graph_module
    from pm_runtime.modeling.fast_unet import FastUNet
    from pm_runtime.modeling.graphs import UNetGraph as Graph

    torch.manual_seed(5)
    for config, expect in [(UNET_CONFIG, FastUNet), (dict(UNET_CONFIG, resnet_time_scale_shift="scale_shift"), Graph)]:
        hf = diffusers.UNet2DConditionModel(**config).eval()
        path = tmp_path / "unet.fp16.safetensors"
        details = save_weights(UNET, UNetGraph(hf), path, precision="fp32")
        got = load_graph_module(UNET, details, path, torch.device("cpu"), torch.float32)
        assert type(got) is expect
    assert type(load_graph_module(UNET, save_weights(UNET, UNetGraph(diffusers.UNet2DConditionModel(**UNET_CONFIG)),
                                                     path, precision="fp32"),
                                  path, torch.device("cpu"), torch.float32, standalone=False)) is Graph


def test_torch_cuda_process_imports_neither_diffusers_nor_transformers(run_bundle, tmp_path):
    """The start-up cost this module exists for: a new process that loads the bundle's torch weights
    and makes an image (cpu: the same code eagerly) never imports diffusers, transformers or dynamo,
    and works where diffusers and transformers are not installed."""
    code = (
        "import sys, importlib.abc\n"
        "class NotInstalled(importlib.abc.MetaPathFinder):  # as if diffusers/transformers were not installed\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('diffusers', 'transformers'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NotInstalled())\n"
        "from pm_runtime.pipeline import Pipeline\n"
        f"p = Pipeline.load({str(run_bundle)!r}, backend='torch-cuda', device='cpu', concept='alice')\n"
        "p.generate('a photo of <persona>', seed=1, steps=2, height=256, width=256)\n"
        "print(sorted(m for m in ('diffusers', 'transformers', 'torch._dynamo') if m in sys.modules))\n")
    env = dict(os.environ, PM_KERNELS="1" if torch.cuda.is_available() else "0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_pipeline_images_standalone_and_hf_modules_agree(run_bundle):
    """The torch-cuda backend (cpu: eager) with the standalone networks and with the Hugging Face classes
    (hf_modules=True) on the same bundle: the same image; low-memory mode tiles the standalone VAE decode in
    the pipeline (pm_runtime/vae_tiles.py) above 512 px."""
    import numpy as np

    from pm_runtime.modeling.fast_unet import FastUNet
    from pm_runtime.pipeline import Pipeline

    kw = dict(seed=4, steps=3, height=256, width=256)
    sa_pipe = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice")
    hf_pipe = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", hf_modules=True)
    assert isinstance(sa_pipe.backend.modules["unet"], FastUNet) and sa_pipe.backend.tiles_vae is False
    assert isinstance(hf_pipe.backend.modules["unet"], UNetGraph) and hf_pipe.backend.tiles_vae is True
    a, b = sa_pipe.generate("a photo of <persona>", **kw), hf_pipe.generate("a photo of <persona>", **kw)
    assert int(np.abs(a.images.astype(int) - b.images.astype(int)).max()) <= 1
    low = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", low_memory=True)
    big = low.generate("a photo of <persona>", seed=4, steps=2, height=640, width=576)
    assert big.images.shape == (1, 640, 576, 3) and big.timings["vae_calls"] == 4  # 2 x 2 tiles
    # vae_tiling=False: one piece, exactly the default mode's decode (same UNet arithmetic asked for)
    whole = Pipeline.load(run_bundle, backend="torch-cuda", device="cpu", concept="alice", low_memory=True,
                          vae_tiling=False, kv_tables=True, sequential_guidance=False)
    one = whole.generate("a photo of <persona>", seed=4, steps=2, height=640, width=576)
    ref = sa_pipe.generate("a photo of <persona>", seed=4, steps=2, height=640, width=576)
    assert one.timings["vae_calls"] == 1 and ref.timings["vae_calls"] == 1
    # equal on CPUs with AVX-512; on an AVX2-only EPYC oneDNN's kernels for the default mode's packed
    # convolution weights and low-memory's plain ones round differently: 16 of 1.1 M values off by 1
    assert int(np.abs(one.images.astype(int) - ref.images.astype(int)).max()) <= 1
    assert not np.array_equal(big.images, ref.images)  # the tiles' blended seams


def test_hf_fallback_without_diffusers_is_a_one_line_error(tmp_path, monkeypatch):
    import importlib.util

    from pm_runtime.modeling.bundle_weights import load_graph_module

    hf = diffusers.UNet2DConditionModel(**dict(UNET_CONFIG, resnet_time_scale_shift="scale_shift"))
    path = tmp_path / "unet.safetensors"
    details = save_weights(UNET, UNetGraph(hf), path, precision="fp32")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(UserError, match=r"needs diffusers and transformers \(resnet_time_scale_shift="):
        load_graph_module(UNET, details, path, torch.device("cpu"), torch.float32)


def test_torch_weights_are_checked_while_they_load(run_bundle, tmp_path):
    """torch-cuda hashes its files alongside their loading (Bundle.verifying): a damaged weight file
    is still refused before anything runs; the ONNX files it does not load are not hashed."""
    import shutil

    from pm_runtime.bundle import open_bundle
    from pm_runtime.pipeline import Pipeline

    copy = shutil.copytree(run_bundle, tmp_path / "b")
    with open(copy / "unet.onnx", "ab") as f:  # not used by torch-cuda: not even read
        f.write(b"x")
    pipe = Pipeline.load(copy, backend="torch-cuda", device="cpu", concept="alice")
    assert pipe.backend.bundle._verified == {(n, "torch") for n in ("unet", "text_encoder", "vae_decoder",
                                                                    "vae_encoder")}
    with pytest.raises(UserError, match=r"unet.onnx \(component unet\) fails its checksum"):
        open_bundle(copy).verify_all()  # all files: the damaged ONNX graph is found
    with open(copy / "torch" / "vae_decoder.fp16.safetensors", "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x00\x01")  # a weight's bytes change, the file still parses
    with pytest.raises(UserError, match=r"vae_decoder.fp16.safetensors \(component .*\) fails its checksum"):
        Pipeline.load(copy, backend="torch-cuda", device="cpu", concept="alice")
