"""CLIPSeg soft masks on a tiny random CLIPSegForImageSegmentation saved to disk (no hub, CPU, fast)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPTokenizer  # noqa: E402

from pm_runtime.train.clipseg import clipseg_masks, load_clipseg  # noqa: E402
from pm_runtime.train.templates import CLIPSEG_TEMPLATES  # noqa: E402


def _bytes_to_unicode():
    # GPT-2/CLIP byte -> printable unicode symbols, in table order
    from pm_runtime.train.tiny_model import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _char_level_clip_tokenizer(src):
    # Character-level CLIP BPE: 256 byte symbols, the same with "</w>", then <|startoftext|>=512, <|endoftext|>=513.
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(src)


def _tiny_model_clip_tokenizer(src):
    # The repo's tiny SD folder (whole-word BPE over the method's prompts), when that module exists.
    try:
        from pm_runtime.train.tiny_model import make_tiny_model
    except ImportError:
        pytest.skip("pm_runtime.train.tiny_model not available")
    return CLIPTokenizer.from_pretrained(make_tiny_model(src / "sd", seed=0) / "tokenizer")


@pytest.fixture(scope="module", params=["char_bpe", "tiny_model_bpe"])
def tiny_clipseg(request, tmp_path_factory):
    make_tok = _char_level_clip_tokenizer if request.param == "char_bpe" else _tiny_model_clip_tokenizer
    tok = make_tok(tmp_path_factory.mktemp("clip_tok_src"))
    out = tmp_path_factory.mktemp("clipseg_tiny")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    # eos_token_id = the real <|endoftext|> id, so the text model pools at the first EOS (not argmax(ids)).
    text = dict(vocab_size=max(tok.get_vocab().values()) + 1, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    # image_size 64 / patch 16 -> 4x4 position grid, bicubically interpolated to 22x22 for a 352 input.
    vision = dict(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2)
    config = CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=16, extract_layers=[0, 1, 2],
                           reduce_dim=16, decoder_num_attention_heads=2, decoder_intermediate_size=32,
                           conditional_layer=0, use_complex_transposed_convolution=True)
    model = CLIPSegForImageSegmentation(config).eval()
    with torch.no_grad():  # widen the random init so the masks are not a flat 0.5
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    return out


def _images():
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))  # non-square, W 500 > 352 > H 300
    yy, xx = np.mgrid[0:200, 0:200]
    b = Image.fromarray(((xx + yy) % 256).astype(np.uint8)).convert("L")  # square, grayscale, upscaled
    return [a, b]


def _reference_mask(model, tokenizer, image, super_class):
    # Straightforward re-implementation: ToTensor -> Normalize -> Resize(352, bilinear, antialias), one prompt
    # at a time, sigmoid, mean over prompts, (pred * 255).astype(uint8).
    x = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    x = torch.from_numpy(x).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(352, 352), mode="bilinear", align_corners=False, antialias=True)
    preds = []
    with torch.no_grad():
        for t in CLIPSEG_TEMPLATES:
            ids = tokenizer(t.format(super_class), return_tensors="pt")["input_ids"]
            preds.append(torch.sigmoid(model(input_ids=ids, pixel_values=x).logits.reshape(352, 352)))
    return (torch.stack(preds).mean(0).numpy() * 255).astype(np.uint8), torch.stack(preds).mean(0).numpy()


def test_masks_shape_and_match_reference(tiny_clipseg):
    model, tokenizer = load_clipseg(tiny_clipseg, "cpu")
    assert not model.training
    images = _images()
    masks = clipseg_masks(model, tokenizer, images, "face", "cpu")
    assert len(masks) == 2
    for img, m in zip(images, masks):
        assert m.shape == (352, 352) and m.dtype == np.uint8
        assert m.std() > 1.0 and int(m.max()) - int(m.min()) > 10  # not flat
        ref, ref_f = _reference_mask(model, tokenizer, img, "face")
        # Batched (padded) vs per-prompt forwards differ by float rounding only: allow one truncation step.
        assert np.abs(m.astype(int) - ref.astype(int)).max() <= 1
        assert (m == ref).mean() > 0.99
        assert np.abs(m.astype(np.float32) - ref_f * 255).max() < 1.0 + 1e-3
    assert not np.array_equal(masks[0], masks[1])


def test_prompts_are_padded_but_padding_is_inert(tiny_clipseg):
    _, tokenizer = load_clipseg(tiny_clipseg, "cpu")
    lens = {len(tokenizer(t.format("face"))["input_ids"]) for t in CLIPSEG_TEMPLATES}
    assert len(lens) > 1  # the batch really exercises padding + attention_mask


def test_load_rejects_non_clipseg_folder(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_clipseg(tmp_path / "missing", "cpu")
    with pytest.raises(ValueError, match="no readable config.json"):
        load_clipseg(tmp_path, "cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="model_type='clip'"):
        load_clipseg(tmp_path, "cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clipseg"}))  # right type, no weights
    with pytest.raises(ValueError, match="could not load CLIPSeg") as err:
        load_clipseg(tmp_path, "cpu")
    assert "\n" not in str(err.value)


def test_trainer_makes_masks_with_clipseg(tiny_clipseg, tiny_model, photos, tmp_path):
    from conftest import train_config
    from pm_runtime.train.clipseg import clipseg_masks
    from pm_runtime.train.data import load_images, mask_to_latent
    from pm_runtime.train.trainer import Trainer

    tr = Trainer(train_config(tiny_model, photos, tmp_path / "c.pt", clipseg=str(tiny_clipseg)), warn=lambda m: None)
    model, tok = load_clipseg(tiny_clipseg, "cpu")
    imgs = load_images(photos, 64, False, lambda m: None)
    made = clipseg_masks(model, tok, [im.source for im in imgs], "face", "cpu")
    expect = np.stack([mask_to_latent(Image.fromarray(m), 8) for m in made])
    assert tr.masks.shape == (3, 1, 8, 8)
    assert np.array_equal(tr.masks.numpy(), expect)
