"""The pure-Python CLIP tokenizer gives transformers' CLIPTokenizer ids, id for id (DESIGN §3, §4)."""

import json
import random
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from pm_runtime.tokenizer import ClipTokenizer, char_classes
from pm_runtime.train import templates

PLACEHOLDERS = [f"<pm-concept-{i}>" for i in range(1, 5)]

PROMPTS = [
    "", " ", "   \t\n ", "a", "A", "a photo of a face", "A PHOTO OF A FACE", "MiXeD CaSe WoRdS",
    "hello, world!", "what?! no... (yes) [maybe] {ok} <tag> \"quoted\" 'single'",
    "it's they're we've I'm you'll he'd don't 'stop 's 'S IT'S", "''s !'s", "a--b__c..d//e\\\\f",
    "email@example.com #hashtag $100 50% a&b a*b=c a+b~c ^_^ `code` |pipe|",
    "1 12 123 3.14 -5 1e10 2024-01-01 10:30pm 1,000,000", "v1.5 sd2 x2y3z4",
    "café naïve résumé Zürich São Paulo Ångström", "cafe\u0301 e\u0301 a\u0308\u0323 n\u0303",
    "Ünïcödé ÀÉÎÕÜ ß ẞ ǅ ǈ", "ΟΔΟΣ σοφός Σ", "İstanbul ıi", "Москва Привет", "東京タワー 日本語 中文字符 한국어",
    "emoji 😀🎨👩‍🚀 🇫🇷 ❤️ ✨", "Ⅻ ½ ² ³ ① ٣ ५ 〇 一二三", "\u0300\u0301 leading marks", "x\u200by\u200dz\ufeff",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic\u2028ls\x85nel", "ctrl\x1c\x1d\x1e\x1f\x00\x07 chars",
    "<|startoftext|> a <|endoftext|> b", "<|ENDOFTEXT|>x<|StartOfText|>", "!<|endoftext|>!", "<|endoftext",
    "a\u180eb \u200a c", "the knight astronaut on the moon, oil painting, van gogh style",
    templates.NEGATIVE_PROMPT,
    " ".join(["word"] * 100), "a photo of " + "very " * 80 + "detailed", "1" * 200, "😀" * 40,
    ", ".join(f"tag{i}" for i in range(60)),
]
TEMPLATE_TEXTS = [*templates.IMAGENET_TEMPLATES_SMALL, *templates.SCENE_TEMPLATES, *templates.CLIPSEG_TEMPLATES]
PLACEHOLDER_PROMPTS = [
    "a photo of <pm-concept-1> <pm-concept-2>, smiling", "<pm-concept-1><pm-concept-2><pm-concept-3>",
    "x<pm-concept-1>y", "(<pm-concept-1>)!", "<PM-CONCEPT-1> <Pm-Concept-4>", "<pm-concept-1 <pm-concept->",
    "<pm-concept-12> <pm-concept-1>2", "it's<pm-concept-3>'s", "<|endoftext|><pm-concept-1><|endoftext|>",
    "café<pm-concept-2>東京 😀<pm-concept-4>😀", "a photo of <pm-concept-1>" * 30,
]
ALPHABET = list("abcxyzABCXYZ0123456789 ,.!?'\"-_()<>|/\\:;@#&*+=~`^%$") + [
    " ", " ", " ", "\t", "\n", "\u3000", "\x85", "\x1c", "\u00a0", "'s", "'t", "'re", "'ll", "'d", "'m", "'ve",
    "é", "e\u0301", "ü", "Ñ", "ß", "ẞ", "İ", "ı", "Σ", "ς", "σ", "Ω", "ж", "Я", "東", "京", "日", "한", "あ", "ア",
    "😀", "🎨", "👩\u200d🚀", "🇫🇷", "❤️", "\u0301", "\u0308", "\u20dd", "Ⅻ", "½", "²", "٣", "५", "〇", "一",
    "\u200b", "\ufeff", "\u180e", "\x00", "\x7f", "\ud7ff", "\U0010fffd", "ǅ", "ﬁ", "Å", "Å", "<|endoftext|>",
    "<|startoftext|>", "<|", "|>", "word", "photo", "knight", "<pm-concept-1>", "<pm-concept-2>", "<PM-CONCEPT-3>",
]


def random_texts(n=300, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def folder(tiny_model):  # conftest's session model: make_tiny_model(tmp dir, seed=0)
    return tiny_model / "tokenizer"


def load_pair(folder, placeholders=()):
    from transformers import CLIPTokenizer

    hf, ours = CLIPTokenizer.from_pretrained(folder, local_files_only=True), ClipTokenizer.from_folder(folder)
    if placeholders:
        hf.add_tokens(list(placeholders))
        assert ours.add_tokens(list(placeholders)) == hf.convert_tokens_to_ids(list(placeholders))
    return hf, ours


def assert_same(hf, ours, texts):
    for text in texts:
        assert ours.encode(text) == hf(text).input_ids, repr(text)
        ids, cut = ours.encode_with_truncation_info(text)
        assert ids == hf(text, max_length=77, truncation=True).input_ids, repr(text)
        assert cut == (len(hf(text).input_ids) > 77), repr(text)
    ref = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    got = ours(texts)
    assert got.dtype == np.int64 and got.shape == (len(texts), 77)
    np.testing.assert_array_equal(got, ref)


def test_prompts_and_templates(folder):
    hf, ours = load_pair(folder)
    texts = PROMPTS + [t.format("face") for t in TEMPLATE_TEXTS] + [t.replace("{}", "") for t in TEMPLATE_TEXTS]
    assert_same(hf, ours, texts)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.vocab_size == len(hf) and ours.get_vocab() == hf.get_vocab()
    assert ours.encode("") == [ours.bos_id, ours.eos_id]


def test_placeholder_tokens(folder):
    hf, ours = load_pair(folder, PLACEHOLDERS)
    assert_same(hf, ours, PLACEHOLDER_PROMPTS + [t.format(" ".join(PLACEHOLDERS)) for t in TEMPLATE_TEXTS])
    ids = ours.encode("a photo of <pm-concept-1> <pm-concept-2>, smiling")
    assert [ours.token_to_id(p) for p in PLACEHOLDERS[:2]] == ids[4:6] and ours.vocab_size == len(hf)
    assert hf.add_tokens(PLACEHOLDERS[:1]) == 0  # added again: nothing new, the same id
    assert ours.add_tokens(PLACEHOLDERS[:1]) == hf.convert_tokens_to_ids(PLACEHOLDERS[:1])
    assert ours.vocab_size == len(hf)
    hf, ours = load_pair(folder, ["<x>", "<x><y>", "<y>", "face"])  # longest match wins; a vocab word as a unit
    assert_same(hf, ours, ["<x><y><x> <y><x><y>", "<x><y", "facefaces <x>face", "<X><Y>"])


def test_fuzz(folder):
    hf, ours = load_pair(folder)
    assert_same(hf, ours, random_texts(300, seed=0))
    hf, ours = load_pair(folder, PLACEHOLDERS[:2] + ["<PM-CONCEPT-3>"])
    assert_same(hf, ours, random_texts(100, seed=1))


def test_bpe_merge_order(tmp_path):
    """A vocabulary learned from words over a tiny alphabet: long merge chains, overlapping pairs ("a a a")."""
    from pm_runtime.train.tiny_model import build_bpe

    rng = random.Random(3)
    words = ["".join(rng.choice("aaabbcé東") for _ in range(rng.randint(1, 12))) for _ in range(300)]
    vocab, merges = build_bpe(words)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    hf, ours = load_pair(tmp_path)
    texts = ["".join(rng.choice("aaabbcé東 ") for _ in range(rng.randint(0, 60))) for _ in range(200)]
    assert_same(hf, ours, texts + words)


def test_truncation(folder):
    ours = load_pair(folder)[1]
    ids, cut = ours.encode_with_truncation_info("a photo of " + "very " * 80 + "detailed")
    assert cut and len(ids) == 77 and ids[0] == ours.bos_id and ids[-1] == ours.eos_id
    ids, cut = ours.encode_with_truncation_info(" ".join(["face"] * 75))  # 75 one-token words: exactly fits
    assert not cut and len(ids) == 77
    assert ours.encode_with_truncation_info(" ".join(["face"] * 76))[1]
    assert ours(["a face", "x"], max_length=8).tolist() == [
        ours.encode("a face") + [ours.pad_id] * 4, ours.encode("x") + [ours.pad_id] * 5]


def test_sd15_style_config(folder, tmp_path):
    """Real SD folders: added_tokens_decoder with normalized specials, dict-valued special tokens, SD 2's '!' pad."""
    dst = shutil.copytree(folder, tmp_path / "tokenizer")
    vocab = json.loads((dst / "vocab.json").read_text("utf-8"))
    def tok(c):
        return {"content": c, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    specials = {"<|startoftext|>", "<|endoftext|>"}
    (dst / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": tok("<|startoftext|>"), "eos_token": tok("<|endoftext|>"), "pad_token": "!",
        "unk_token": tok("<|endoftext|>")}))
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(vocab[c]): {**tok(c), "special": True} for c in specials},
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!", "unk_token": "<|endoftext|>",
        "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}))
    hf, ours = load_pair(dst, PLACEHOLDERS)
    assert ours.pad_id == hf.pad_token_id == 0
    assert_same(hf, ours, PROMPTS[:40] + PLACEHOLDER_PROMPTS + random_texts(60, seed=2))


def test_char_classes_match_unicode_categories():
    """The stdlib-re emulation of \\p{L}+, [\\p{N}], [^\\s\\p{L}\\p{N}]+ agrees with unicodedata everywhere."""
    import re

    text = "".join(chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c < 0xE000)
    letters, number, other = (re.compile(p) for p in char_classes())
    cls = ["-"] * len(text)
    for mark, pattern in (("L", letters), ("N", number), ("P", other)):
        for m in pattern.finditer(text):
            cls[m.start():m.end()] = mark * (m.end() - m.start())
    space = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {chr(c) for c in range(0x2000, 0x200B)}
    want = ["-" if c in space else k[0] if k[0] in "LN" else "P" for c, k in zip(text, map(unicodedata.category, text))]
    assert cls == want


def test_imports_without_torch_transformers_tokenizers():
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'tokenizers', 'regex', 'ftfy', 'diffusers'):\n"
            "    sys.modules[name] = None\n"
            "import pm_runtime.tokenizer as t\n"
            "assert t.normalize('A  B') == 'a b'\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
