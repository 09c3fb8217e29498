"""CLIP BPE tokenizer in pure Python (stdlib + numpy), id-for-id equal to transformers' CLIPTokenizer.

The runtime side of the torch line (DESIGN.md §3) must tokenize without torch, transformers or the
`tokenizers` package. This reproduces transformers 5's CLIPTokenizer (the `tokenizers`-backed one;
without ftfy transformers 4's slow tokenizer differs from it, this file follows the fast one):

1. added tokens are cut out first, as whole units: those with ``normalized=False`` (the
   ``<|startoftext|>``/``<|endoftext|>`` specials) on the raw text, then the normalized ones (what
   ``add_tokens`` adds, e.g. ``<pm-concept-1>``) on the normalized text; leftmost, then longest;
2. the rest is normalized: NFC, every run of Unicode White_Space -> one space, per-character
   lower-casing (no Greek final-sigma rule, as in Rust);
3. pre-tokenized with CLIP's pattern ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|
   \\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`` (whitespace dropped); the ByteLevel step after it splits
   only a literal ``<|startoftext|>``/``<|endoftext|>`` further (into ``<|``, the word, ``|>``);
4. each piece -> UTF-8 bytes -> GPT-2's byte symbols -> BPE (lowest merge rank first, ``</w>`` on
   the last symbol); unknown symbols -> the unk token; then ``[bos] + ids + [eos]``.

Stdlib ``re`` has no ``\\p{..}``: the classes are built once from ``re``'s ``\\w``/``\\d`` (``\\w`` is
exactly L|N|_ in Python's Unicode database) plus the explicit Nl/No characters found by
``unicodedata``. Known differences: Python's Unicode database version (14.0 in 3.11) may differ from
the one compiled into `tokenizers` (Oniguruma, Rust std, unicode-normalization) for characters
assigned in later versions; ``single_word`` added tokens are matched like plain ones.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import unicodedata

import numpy as np

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Unicode White_Space: what Oniguruma's \s and Rust's char::is_whitespace match (Python's \s also
# matches \x1c-\x1f, which `tokenizers` keeps as text, so it is spelled out here).
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WS_RUN = re.compile(f"[{_WS}]+")


def _ranges(chars: list[str]) -> str:
    """Characters (sorted) -> a regex class body of escaped ranges."""
    out, cps = [], [ord(c) for c in chars]
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        out.append(f"\\U{cps[i]:08x}" + (f"-\\U{cps[j]:08x}" if j > i else ""))
        i = j + 1
    return "".join(out)


@functools.cache
def char_classes() -> tuple[str, str, str]:
    """Regex fragments (letters, number, other) = \\p{L}+, [\\p{N}], [^\\s\\p{L}\\p{N}]+ for stdlib `re`."""
    cps = np.r_[0:0xD800, 0xE000:0x110000].astype("<u4")  # every code point but surrogates
    text = cps.tobytes().decode("utf-32-le")  # ~0.1 s, once per process
    # [^\W\d_] = L | Nl | No (| any numeric char that is neither L nor N): find the non-letters.
    odd = sorted(c for run in re.findall(r"[^\W\d_]+", text) if not run.isalpha()
                 for c in run if not c.isalpha())
    nums = _ranges([c for c in odd if unicodedata.category(c)[0] == "N"])  # Nl, No
    extra = _ranges([c for c in odd if unicodedata.category(c)[0] != "N"])  # empty in Unicode 14
    return (f"[^\\W\\d_{nums}{extra}]+", f"[\\d{nums}]", f"(?:[^\\w{_WS}]|[_{extra}])+")


@functools.cache
def _pretokenizer() -> re.Pattern:
    letters, number, other = char_classes()
    return re.compile(rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|{letters}|{number}|{other}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable symbol map (256 entries)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_SYMBOLS = bytes_to_unicode()
_BYTE_TABLE = str.maketrans({chr(b): s for b, s in _BYTE_SYMBOLS.items()})


def normalize(text: str) -> str:
    """NFC, White_Space runs -> " ", lower-case per character (tokenizers' CLIP normalizer)."""
    text = _WS_RUN.sub(" ", unicodedata.normalize("NFC", text))
    return text.lower() if text.isascii() else "".join(c.lower() for c in text)


class ClipTokenizer:
    """CLIP BPE tokenizer read from a diffusers ``tokenizer/`` folder (vocab.json, merges.txt, ...)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, bos: str = BOS,
                 eos: str = EOS, pad: str = EOS, unk: str = EOS, model_max_length: int = 77,
                 added: list[dict] = ()):
        self.vocab = dict(vocab)
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.model_max_length = int(model_max_length)
        self._added: dict[str, dict] = {}  # content -> {"id", "normalized", "lstrip", "rstrip", ...}
        self._cache: dict[str, tuple[int, ...]] = {}
        for tok in added:  # explicit ids first (added_tokens_decoder / added_tokens.json)
            self._add(**tok)
        for tok in (unk, bos, eos, pad):  # the specials: matched on the raw text unless told otherwise
            self._add(**{**(tok if isinstance(tok, dict) else {"content": tok}), "special": True})
        name = lambda t: t["content"] if isinstance(t, dict) else t  # noqa: E731
        self.bos_id, self.eos_id = self.token_to_id(name(bos)), self.token_to_id(name(eos))
        self.pad_id, self.unk_id = self.token_to_id(name(pad)), self.token_to_id(name(unk))
        self._compile()

    @classmethod
    def from_folder(cls, path) -> ClipTokenizer:
        folder = pathlib.Path(path)

        def read(name: str) -> dict:
            return json.loads((folder / name).read_text("utf-8")) if (folder / name).is_file() else {}

        vocab = read("vocab.json")
        lines = (folder / "merges.txt").read_text("utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        config, kw, added = read("tokenizer_config.json"), {}, []
        for key in ("bos", "eos", "pad", "unk"):  # special_tokens_map.json wins, as in transformers
            value = read("special_tokens_map.json").get(f"{key}_token") or config.get(f"{key}_token")
            if value is not None:
                kw[key] = value
        for i, tok in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            added.append({**tok, "id": int(i)})
        added += [{"content": c, "id": int(i)}
                  for c, i in sorted(read("added_tokens.json").items(), key=lambda kv: kv[1])]
        return cls(vocab, merges, model_max_length=min(int(config.get("model_max_length", 77)), 10**6),
                   added=added, **kw)

    # ---- vocabulary -------------------------------------------------------------------------
    def _add(self, content: str, special: bool = False, normalized: bool | None = None, lstrip: bool = False,
             rstrip: bool = False, id: int | None = None, **_) -> int:
        if content in self._added:  # first registration wins, as in tokenizers' AddedVocabulary
            return self._added[content]["id"]
        if id is None:
            id = self.vocab.get(content)
        if id is None:  # tokenizers: after the model vocab and after every added id
            id = max([len(self.vocab)] + [t["id"] + 1 for t in self._added.values()])
        normalized = (not special) if normalized is None else bool(normalized)
        self._added[content] = dict(id=int(id), normalized=normalized, lstrip=lstrip, rstrip=rstrip,
                                    key=normalize(content) if normalized else content)
        return int(id)

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add tokens matched as whole units (normalized, not special: transformers' add_tokens)."""
        ids = [self._add(t) for t in tokens]
        self._compile()
        return ids

    def _compile(self) -> None:
        """Alternations of the added tokens, longest first (= tokenizers' leftmost-longest match)."""
        self._id_of = {t["id"]: t for t in self._added.values()}
        self._splitters = []
        for normalized in (False, True):
            toks = sorted((t for t in self._added.values() if t["normalized"] == normalized and t["key"]),
                          key=lambda t: (-len(t["key"]), t["key"]))
            alts = [f"({'[%s]*' % _WS if t['lstrip'] else ''}{re.escape(t['key'])}"
                    f"{'[%s]*' % _WS if t['rstrip'] else ''})" for t in toks]
            self._splitters.append((re.compile("|".join(alts)), [t["id"] for t in toks]) if toks else None)

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]["id"]
        return self.vocab.get(token)

    def get_vocab(self) -> dict[str, int]:
        return {**self.vocab, **{c: t["id"] for c, t in self._added.items()}}

    @property
    def vocab_size(self) -> int:
        """Every id in use, added tokens included (= len() of a transformers tokenizer)."""
        return len(self.get_vocab())

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encoding ---------------------------------------------------------------------------
    @staticmethod
    def _split(text: str, splitter) -> list[str | int]:
        """Cut added tokens out of `text`: a list of text pieces (str) and token ids (int)."""
        if splitter is None:
            return [text]
        pattern, ids = splitter
        out, pos = [], 0
        for m in pattern.finditer(text):
            out += [text[pos:m.start()], ids[m.lastindex - 1]]
            pos = m.end()
        return out + [text[pos:]]

    def _bpe(self, word: str) -> tuple[int, ...]:
        """BPE of one pre-token (byte symbols): merge the lowest-ranked pair everywhere, repeat."""
        syms = [*word[:-1], word[-1] + "</w>"]
        ranks = self.ranks
        while len(syms) > 1:
            pair = min(zip(syms, syms[1:]), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == pair:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            syms = merged
        return tuple(self.vocab.get(s, self.unk_id) for s in syms)

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split(text, self._splitters[0]):  # raw-text added tokens (the specials)
            if isinstance(piece, int):
                ids.append(piece)
                continue
            for part in self._split(normalize(piece), self._splitters[1]):  # normalized added tokens
                if isinstance(part, int):
                    ids.append(part)
                    continue
                for word in _pretokenizer().findall(part):
                    # ByteLevel's GPT-2 split changes only these two: "<|", "startoftext", "|>"
                    for w in ((word[:2], word[2:-2], word[-2:]) if word in (BOS, EOS) else (word,)):
                        if w not in self._cache:
                            self._cache[w] = self._bpe(w.encode("utf-8").decode("latin-1").translate(_BYTE_TABLE))
                        ids += self._cache[w]
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids with start and end tokens, not truncated or padded."""
        return [self.bos_id, *self._encode_text(text), self.eos_id]

    def encode_with_truncation_info(self, text: str, max_length: int | None = None) -> tuple[list[int], bool]:
        """(ids truncated to max_length keeping the end token, not padded; whether anything was cut)."""
        n = (max_length or self.model_max_length) - 2
        body = self._encode_text(text)
        return [self.bos_id, *body[:n], self.eos_id], len(body) > n

    def __call__(self, texts: str | list[str], max_length: int | None = None) -> np.ndarray:
        """(N, max_length) int64 ids: truncated keeping the end token, padded with the pad token."""
        max_length = max_length or self.model_max_length
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)
        for row, text in zip(out, texts):
            ids = self.encode_with_truncation_info(text, max_length)[0]
            row[:len(ids)] = ids
        return out
