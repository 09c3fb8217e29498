"""Prompt encoding (super-class / concept versions, truncation, concept words) and PNG parameters."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pm_runtime.errors import UserError
from pm_runtime.png import image_bytes, parameters_text, parse_parameters, png_bytes, read_parameters
from pm_runtime.prompt_encoding import ConceptWords, encode_plain, encode_prompt
from pm_runtime.tokenizer import ClipTokenizer

WORDS = ConceptWords("<persona>", "face", 4)
PH = " ".join(f"<pm-concept-{i + 1}>" for i in range(4))


@pytest.fixture(scope="module")
def toks(tiny_model):
    """Ours (no placeholder tokens needed) and transformers' with the placeholders added (the reference)."""
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer", local_files_only=True)
    ref.add_tokens(PH.split())
    return ClipTokenizer.from_folder(tiny_model / "tokenizer"), ref


def body(ids, tok):
    ids = list(ids)
    return ids[1:ids.index(tok.eos_id)]


@pytest.mark.parametrize("prompt", ["a photo of <persona> as a knight", "<persona>", "<persona>, on the beach",
                                    "a painting of <persona> and <persona> together",
                                    "Ein Foto von <persona> im Café, 東京の夜 🌃 naïve"])
def test_versions_equal_transformers_tokenization(toks, prompt):
    ours, ref = toks
    enc = encode_prompt(ours, prompt, WORDS)
    L = 77
    want_super = ref(prompt.replace("<persona>", "face"), padding="max_length", max_length=L, truncation=True).input_ids
    want_concept = ref(prompt.replace("<persona>", PH), padding="max_length", max_length=L, truncation=True).input_ids
    assert enc.super_ids.tolist() == want_super
    ph_ids = set(ref.convert_tokens_to_ids(PH.split()))
    face = ours.encode("face")[1]
    # our concept version holds the super-class id at the placeholders (ignored under the mask)
    assert [face if i in ph_ids else i for i in want_concept] == enc.concept_ids.tolist()
    assert [i in ph_ids for i in want_concept] == enc.mask.tolist()
    runs = prompt.count("<persona>")
    assert enc.uses_concept and enc.slots[enc.mask].tolist() == [0, 1, 2, 3] * runs and not enc.warnings


def test_unicode_prompt_keeps_its_bytes(toks):
    ours, _ = toks
    enc = encode_prompt(ours, "<persona> 東京の夜 🌃", WORDS)
    assert ours.unk_id not in body(enc.super_ids, ours)  # the byte-level vocabulary covers any text


def test_truncation_never_splits_the_placeholders_and_agrees(toks):
    """Slide the concept word across the 75-token limit: kept whole or refused, never cut in part,
    and the super-class version always holds the same words."""
    ours, _ = toks
    assert len(ours.encode("photo")) == 3  # one token
    face = ours.encode("face")[1]
    for m in range(69, 74):
        prompt = "photo " * m + "<persona> photo"
        if m >= 72:  # m + 4 > 75: the concept would not fit
            with pytest.raises(UserError, match="beyond the text encoder's 75-token limit"):
                encode_prompt(ours, prompt, WORDS)
            continue
        enc = encode_prompt(ours, prompt, WORDS)
        sb, cb = body(enc.super_ids, ours), body(enc.concept_ids, ours)
        assert enc.slots[enc.mask].tolist() == [0, 1, 2, 3] and len(cb) <= 75
        assert cb == sb[:m] + [face] * 4 + sb[m + 1:]  # the same words in both versions
        assert bool(enc.warnings) == (m == 71)  # m = 71: the last word is cut from both versions
        assert len(sb) == (m + 1 if m == 71 else m + 2)


def test_long_prompt_warns_and_keeps_both_versions_consistent(toks):
    ours, _ = toks
    prompt = "a photo of <persona> " + ", ".join(["very detailed"] * 40) + " <persona> at the end"
    enc = encode_prompt(ours, prompt, WORDS)
    assert enc.uses_concept and len(enc.warnings) == 1
    assert "occurrence(s) of <persona> cut off" in enc.warnings[0]
    assert enc.mask.sum() == 4  # the first occurrence kept, the second cut off whole
    assert enc.concept_ids[76] == ours.eos_id or ours.eos_id in enc.concept_ids.tolist()
    plain, warn = encode_plain(ours, " ".join(["photo"] * 100), 77, "negative prompt")
    assert plain[76] == ours.eos_id and "negative prompt is 100 tokens" in warn[0]


def test_concept_word_rules(toks):
    ours, _ = toks
    with pytest.raises(UserError, match="does not contain the concept word"):
        encode_prompt(ours, "a knight", WORDS)
    enc = encode_prompt(ours, "a knight", WORDS, allow_no_concept=True)
    assert not enc.uses_concept and not enc.mask.any() and np.array_equal(enc.super_ids, enc.concept_ids)
    with pytest.raises(UserError, match=r"two different concept words in one prompt \(<persona> and <bob>\)"):
        encode_prompt(ours, "<persona> and <bob>", WORDS)
    with pytest.raises(UserError, match="uses <bob>, but concept 'alice' is written <persona>"):
        encode_prompt(ours, "a photo of <bob>", WORDS, allow_no_concept=True, concept_name="alice")
    with pytest.raises(UserError, match="and <pm-concept-1>"):  # raw placeholder tokens are not a back door
        encode_prompt(ours, "<persona> <pm-concept-1>", WORDS)
    encode_prompt(ours, "<|startoftext|> <persona>", WORDS)  # CLIP's specials are not concept words


def test_a1111_syntax_is_recognised_and_plain_text_is_not():
    from pm_runtime.prompt_encoding import a1111_syntax

    for text in ("(smiling:1.2)", "(smiling: -0.5 )", "(word:.5)", "((masterpiece))", "[red]", "[cat:dog:0.5]"):
        said = a1111_syntax(f"a photo of <persona>, {text}, by the sea")
        assert len(said) == 1 and f'"{text}"' in said[0], text
    for text in ("a (1990s) photo", "time 10:30 (morning)", "photo, 35mm, f/1.8", "a <persona> portrait", "(a)"):
        assert a1111_syntax(text) == [], text
    for tag in ("<lora:add_detail:0.7>", "<lyco:x:1>", "<hypernet:h:1>", "<LoRA:y:1>"):
        with pytest.raises(UserError, match="LoRA / hypernetwork tags are not applied"):
            a1111_syntax(f"<persona> {tag}", "negative prompt")


def test_png_parameters_round_trip():
    text = parameters_text("a photo of <persona>, 東京\nsecond line", "lowres, bad", {
        "Steps": 50, "Sampler": "DPM++ 2M", "CFG scale": 8.0, "Seed": 233, "Size": "512x512",
        "Backend": "onnxruntime 1.32.0 CPUExecutionProvider fp32", "Concept stage": "400-800",
        "Note": 'has, comma: and "quotes"', "Skipped": None})
    assert text.splitlines()[-1].startswith("Steps: 50, Sampler: DPM++ 2M, CFG scale: 8.0, Seed: 233")
    p = parse_parameters(text)
    assert p["Prompt"] == "a photo of <persona>, 東京\nsecond line" and p["Negative prompt"] == "lowres, bad"
    assert p["Note"] == 'has, comma: and "quotes"' and "Skipped" not in p and p["Seed"] == "233"
    img = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    blob = png_bytes(img, text)
    assert blob == png_bytes(img, text)  # deterministic
    import io

    im = Image.open(io.BytesIO(blob))
    assert im.info["parameters"] == text and np.array_equal(np.asarray(im), img)


def test_jpeg_and_webp_carry_the_parameters_in_exif_usercomment():
    """Where A1111 puts them in these formats: EXIF UserComment (tag 0x9286 in the Exif IFD), "UNICODE\\0"
    then UTF-16 big-endian, piexif's encoding; read_parameters also reads ASCII-prefixed and bare comments."""
    import io

    text = parameters_text("a photo of <persona>, 東京 🌃", "lowres", {"Steps": 2, "Seed": 233})
    img = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    for fmt, name in (("jpeg", "JPEG"), ("webp", "WEBP")):
        blob = image_bytes(img, text, fmt)
        assert blob == image_bytes(img, text, fmt)  # deterministic
        im = Image.open(io.BytesIO(blob))
        assert im.format == name and im.size == (24, 16)
        assert im.getexif().get_ifd(0x8769)[0x9286] == b"UNICODE\0" + text.encode("utf-16-be")
        assert read_parameters(im) == text
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image_bytes(img, text, "webp")))), img)  # lossless
    for comment, want in ((b"ASCII\0\0\0Steps: 3", "Steps: 3"), (b"Steps: 4", "Steps: 4")):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = comment
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", exif=exif.tobytes())
        assert read_parameters(Image.open(buf)) == want
    assert read_parameters(Image.open(io.BytesIO(image_bytes(img, None, "jpeg")))) is None
    with pytest.raises(ValueError, match="does not fit a JPEG file's EXIF block"):
        image_bytes(img, "x" * 40000, "jpeg")  # a JPEG marker segment holds at most 64 KiB
    with pytest.raises(ValueError, match="unknown image format 'gif'"):
        image_bytes(img, text, "gif")
