"""The tiny random SD 1.x folder (pm_runtime.train.tiny_model): layout, loading, determinism,
tokenizer coverage and the pm-make-tiny-model CLI. CPU only, a few seconds."""

import json
import pathlib

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from pm_runtime.train import tiny_model  # noqa: E402
from pm_runtime.train.tiny_model import bytes_to_unicode, make_tiny_model, template_words  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.CLIPTokenizer.from_pretrained(model_dir / "tokenizer")


def _file_bytes(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout(model_dir):
    names = set(_file_bytes(model_dir))
    assert {
        "model_index.json", "scheduler/scheduler_config.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "image_encoder/config.json", "image_encoder/model.safetensors",
        "image_encoder/preprocessor_config.json",
    } <= names
    assert not any(p.name.startswith(".model") for p in model_dir.parent.iterdir())  # no temp left


def test_pipeline_loads_and_runs(pipe):
    assert isinstance(pipe.unet, diffusers.UNet2DConditionModel)
    assert isinstance(pipe.vae, diffusers.AutoencoderKL)
    assert isinstance(pipe.text_encoder, transformers.CLIPTextModel)
    assert isinstance(pipe.scheduler, diffusers.PNDMScheduler)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    out = pipe("a photo of a face", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)


def test_scheduler_is_sd15(pipe, model_dir):
    cfg = pipe.scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert cfg.num_train_timesteps == 1000 and cfg.steps_offset == 1 and cfg.skip_prk_steps
    assert not cfg.set_alpha_to_one and cfg.prediction_type == "epsilon"
    assert cfg.trained_betas is None
    # SD 1.5's file has no timestep_spacing: each scheduler class then uses its own default
    assert "timestep_spacing" not in json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())


def test_every_unet_attn2_is_cross_attention(pipe):
    attn2 = [m for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    attn1 = [m for n, m in pipe.unet.named_modules() if n.endswith("attn1")]
    assert attn2 and len(attn2) == len(attn1)  # every transformer block has one
    assert all(m.is_cross_attention for m in attn2)
    assert all(m.to_k.in_features == pipe.text_encoder.config.hidden_size for m in attn2)


def test_vae_scale_factor_is_8(pipe):
    assert pipe.vae_scale_factor == 8
    z = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 8, 8)
    assert pipe.vae.config.scaling_factor == 0.18215


def test_text_encoder_ids_match_tokenizer(pipe, tokenizer):
    cfg = pipe.text_encoder.config
    assert cfg.vocab_size == len(tokenizer)
    assert cfg.bos_token_id == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<|startoftext|>")
    assert cfg.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert cfg.pad_token_id == tokenizer.pad_token_id == cfg.eos_token_id  # SD 1.5: pad = eos
    assert tokenizer.model_max_length == 77


def test_tokenizer_face_is_one_token(tokenizer):
    ids = tokenizer("face").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["face</w>"]


def test_tokenizer_has_full_byte_alphabet(tokenizer):
    vocab = tokenizer.get_vocab()
    symbols = list(bytes_to_unicode().values())
    assert len(set(symbols)) == 256
    for s in symbols:
        assert s in vocab and s + "</w>" in vocab, s


@pytest.mark.parametrize("fast", [False, True])
def test_unicode_prompt_has_no_unk(model_dir, fast):
    cls = transformers.CLIPTokenizerFast if fast else transformers.CLIPTokenizer
    tok = cls.from_pretrained(model_dir / "tokenizer")
    ids = tok("café 東京 🙂 naïve Straße ÆØÅ").input_ids
    inner = ids[1:-1]
    assert inner and tok.unk_token_id not in inner  # unk = <|endoftext|>, only the last id
    assert ids[-1] == tok.eos_token_id


def test_every_template_word_is_one_token(tokenizer):
    words = template_words()
    assert {"face", "person", "portrait", "photo", "knight", "astronaut", "halloween"} <= set(words)
    for w in words:
        assert len(tokenizer(w, add_special_tokens=False).input_ids) == 1, w
    # whole templates split into exactly their words (no sub-word pieces)
    text = tiny_model.templates.SCENE_TEMPLATES[1].format("person")
    toks = tokenizer.tokenize(text)
    assert toks == [w + "</w>" for w in text.lower().split()]


def test_image_encoder_embeds_512(model_dir):
    enc = transformers.CLIPVisionModelWithProjection.from_pretrained(model_dir / "image_encoder")
    proc = transformers.CLIPImageProcessor.from_pretrained(model_dir / "image_encoder")
    assert proc.crop_size == {"height": 224, "width": 224}
    with torch.no_grad():
        out = enc(pixel_values=torch.randn(1, 3, 224, 224))
    assert out.image_embeds.shape == (1, 512)


def test_determinism(model_dir, tmp_path):
    same = _file_bytes(make_tiny_model(tmp_path / "same", seed=0))
    assert same == _file_bytes(model_dir)
    other = _file_bytes(make_tiny_model(tmp_path / "other", seed=1))
    assert other.keys() == same.keys()
    assert other["unet/diffusion_pytorch_model.safetensors"] != same["unet/diffusion_pytorch_model.safetensors"]
    assert other["tokenizer/vocab.json"] == same["tokenizer/vocab.json"]  # tokenizer is not random


def test_refuses_non_empty_dir(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_tiny_model(out)
    assert (out / "keep.txt").read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (make_tiny_model(empty) / "model_index.json").is_file()  # an empty OUT is fine


def test_cli(tmp_path):
    runner = CliRunner()
    help_ = runner.invoke(tiny_model.main, ["--help"])
    assert help_.exit_code == 0 and "RANDOM" in help_.output and "--force" in help_.output

    out = tmp_path / "cli"
    res = runner.invoke(tiny_model.main, [str(out), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "model_index.json" in res.output and "MiB" in res.output
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    res = runner.invoke(tiny_model.main, [str(out)])
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "not empty" in lines[0]
    assert "Traceback" not in res.output

    (out / "stale.txt").write_text("old")
    res = runner.invoke(tiny_model.main, [str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert not (out / "stale.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # no temp/old folders left

    # --force replaces a model folder, never any other folder or a file (a typo such as `.` or `~`)
    for other in (tmp_path / "notes", tmp_path / "notes.txt"):
        if other.suffix:
            other.write_text("keep me")
        else:
            other.mkdir()
            (other / "keep.txt").write_text("keep me")
        res = runner.invoke(tiny_model.main, [str(other), "--force"])
        lines = res.output.strip().splitlines()
        assert res.exit_code != 0 and len(lines) == 1 and "not a diffusers model folder" in lines[0], res.output
        assert (other / "keep.txt" if other.is_dir() else other).read_text() == "keep me"
