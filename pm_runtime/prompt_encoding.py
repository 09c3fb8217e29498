"""Prompt -> token ids for the two versions the stage schedule needs (DESIGN §1). No torch.

  super-class version: the concept word -> the super-class word ("face"), one token
  concept version:     the concept word -> the K placeholder positions, whose input embeddings
                       (E[t]) and bypass vectors (B[t]) the text encoder takes per position

The prompt is cut at each concept word; the text between is tokenized once and shared by both
versions, so they always hold the same words. Placeholder positions are marked by `slots`
(k = 0..K-1, -1 elsewhere); their ids are the super-class id (the text encoder ignores ids
where the mask is set), so no placeholder token is ever added to the vocabulary. Where the
concept word is set off by spaces or punctuation (the usual case) the ids equal
transformers' tokenization of the replaced prompts; glued to letters ("x<persona>y") it is
still one concept, where a whole-string tokenization would merge the super-class word into
the neighbouring letters.

Long prompts (AUTOMATIC1111's chunks): CLIP reads 77 positions, 75 tokens between its start and end
tokens. A longer prompt is cut into chunks of 75 as A1111 cuts it (`chunk_units`: at BREAK, and where a
chunk fills up within 20 tokens after a comma, after that comma; a concept occurrence is never split),
each chunk encoded as its own 77 positions; the UNet reads the chunks' contexts one after the other. A
bundle says how many chunks its UNet takes (`max_chunks`: 4 from pm-export 0.3; 1 before, where BREAK is
ignored). Beyond that the end is cut: whole units, a text token or a whole concept occurrence, the same
units from both versions, and a warning says so. One concept word used twice
gives two runs of the K placeholders, each with the same K rows. Two different concept words
in one prompt are refused: one concept per image.

Emphasis (AUTOMATIC1111's prompt weighting, its "Emphasis" setting; `EMPHASIS_MODES`): "(words)"
weighs words 1.1, "[words]" 1/1.1, "(words:1.3)" 1.3, nested brackets multiply, "\\(" is a literal
bracket. The prompt is split into runs of one weight, each run tokenized on its own (as A1111 does),
and every token carries its run's weight (the concept word's K placeholders too; start, end and
padding 1). After the text encoder each chunk's context is multiplied by its tokens' weights and, in the
"original" mode, scaled back to its mean before weighting (`apply_emphasis`); "no-norm" skips that
rescaling, "ignore" removes the syntax without weighting, "none" reads the brackets as words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .tokenizer import ClipTokenizer

# What looks like a concept word: <name> (not CLIP's <|startoftext|>-style specials).
_CONCEPT_LIKE = re.compile(r"<(?!\|)[^<>\s]+>")
# AUTOMATIC1111's extra-network tags (<lora:name:0.8>, <hypernet:name:1>): A1111 takes them out of the prompt
# and applies those weights to its networks; a bundle has no such weights
_EXTRA_NETWORK = re.compile(r"<(?:lora|lyco|locon|loha|lokr|hypernet):[^<>]*>", re.IGNORECASE)
# AUTOMATIC1111's emphasis modes (its "Emphasis" setting), pm-run's name -> the name its images record
EMPHASIS_MODES = {"original": "Original", "no-norm": "No norm", "ignore": "Ignore", "none": "None"}
WEIGHTED_MODES = ("original", "no-norm")  # the modes that weight the text encoder's outputs
# one piece of emphasis syntax: an escaped character, a lone backslash, an opening bracket, ":weight)", a
# closing bracket, plain text, or a colon that closes nothing
_EMPHASIS_PIECE = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_BREAK_MARK = ("BREAK", -1.0)  # where A1111 starts a new 75-token chunk (only at exactly this weight)
# what pm-run (--emphasis none) reads as words but AUTOMATIC1111 as weights: (words:1.3), ((words)), [words]
_EMPHASIS = re.compile(r"\([^()]*:\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*\)|\(\([^()]*\)\)|\[[^\[\]]+\]")


@dataclass(frozen=True)
class ConceptWords:
    word: str  # what users write, e.g. "<persona>"
    super_class: str  # e.g. "face" (one token)
    num_tokens: int  # K


@dataclass(frozen=True, eq=False)
class EncodedPrompt:
    """Both versions as chunks of L positions, each chunk: start, tokens, end, padding (a short prompt: one
    chunk; the versions may differ in their number of chunks)."""

    super_ids: np.ndarray  # (chunks * L,) int64
    concept_ids: np.ndarray  # (chunks * L,) int64: the same, with K positions per concept occurrence
    slots: np.ndarray  # like concept_ids, int64: k at placeholder k of concept_ids, -1 elsewhere
    uses_concept: bool  # the (kept part of the) prompt holds the concept word
    warnings: tuple[str, ...] = ()
    # float32 emphasis weight of every position of super_ids / concept_ids; None: all 1 (nothing weighted)
    super_weights: np.ndarray | None = None
    concept_weights: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray:
        return self.slots >= 0

    def version(self, concept_stage: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids, weights) the text encoder reads for a context: the concept version in a concept stage, else the
        super-class version (a text without the concept word: both are its plain ids)."""
        return (self.concept_ids, self.concept_weights) if concept_stage else (self.super_ids, self.super_weights)


def encode_plain(tok: ClipTokenizer, text: str, max_length: int, what: str = "prompt", emphasis: str = "none",
                 max_chunks: int = 1) -> EncodedPrompt:
    """A text without concept handling (the negative prompt, a prompt without the concept word) as an
    EncodedPrompt: both versions encode_text's ids, no placeholder slots."""
    ids, weights, warn = encode_text(tok, text, max_length, what, emphasis, max_chunks)
    return EncodedPrompt(ids, ids.copy(), np.full(len(ids), -1, np.int64), False, tuple(warn), weights,
                         None if weights is None else weights.copy())


def check_emphasis_mode(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise UserError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {emphasis!r}")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """`text` as runs of (text, weight) by AUTOMATIC1111's emphasis rules (its parse_prompt_attention):
    "(" and "[" open a group, ")" closes the innermost "(" group with weight 1.1, "]" the innermost "["
    group with 1/1.1, ":W)" the innermost "(" group with W; a group left open takes its bracket's weight;
    "\\(" "\\)" "\\[" "\\]" "\\\\" are the characters themselves, a lone backslash is dropped; a closing
    bracket or ":W)" with no group open is text. BREAK (a word on its own) is kept as ("BREAK", -1.0).
    Weights multiply from the innermost group out; neighbouring runs of equal weight are merged."""
    runs: list[list] = []
    open_round: list[int] = []  # index of the first run inside each open "(" group
    open_square: list[int] = []

    def scale(first: int, factor: float) -> None:
        for run in runs[first:]:
            run[1] *= factor

    for m in _EMPHASIS_PIECE.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece[0] == "\\":
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(runs))
        elif piece == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise UserError(f"emphasis weight {weight!r} in {piece.strip()!r} is not a number") from None
            scale(open_round.pop(), factor)
        elif piece == ")" and open_round:
            scale(open_round.pop(), 1.1)
        elif piece == "]" and open_square:
            scale(open_square.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    runs.append(list(_BREAK_MARK))
                runs.append([part, 1.0])
    for first in open_round:
        scale(first, 1.1)
    for first in open_square:
        scale(first, 1 / 1.1)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, float(w)) for t, w in merged]


def _runs(text: str, emphasis: str, breaks: bool = False) -> tuple[list[tuple[str, float]], bool]:
    """(the runs of text to tokenize, each with its weight; whether the text holds a BREAK). `breaks`: keep
    each BREAK as the run ("BREAK", -1.0) where A1111 starts a new chunk (else it is dropped)."""
    check_emphasis_mode(emphasis)
    if emphasis == "none":
        return [(text, 1.0)], False
    runs = parse_emphasis(text)
    kept = [r for r in runs if breaks or r != _BREAK_MARK]
    if emphasis not in WEIGHTED_MODES:
        kept = [r if r == _BREAK_MARK else (r[0], 1.0) for r in kept]
    return kept, _BREAK_MARK in runs


def encode_text(tok: ClipTokenizer, text: str, max_length: int, what: str = "prompt", emphasis: str = "none",
                max_chunks: int = 1) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """((chunks * L,) ids, (chunks * L,) emphasis weights or None, warnings) of a text without concept
    handling (the negative prompt, a prompt without the concept word), in up to `max_chunks` chunks of L
    positions (chunk_units)."""
    units = _units(tok, text, None, emphasis, max_chunks)
    room = max_length - 2
    kept = _fit(units, room, 1, max_chunks)
    total, cut = _tokens(units), _tokens(units[kept:])
    warn = ([f"the {what} is {total} tokens, over {_limit(room, max_chunks)}: the last {cut} were cut off"]
            if cut else [])
    ids, weights, _ = _assemble(chunk_units(units[:kept], room, 1), tok, max_length)
    return ids, weights, warn


# AUTOMATIC1111's "Prompt word wrap length limit" (comma_padding_backtrack) at its default: where a chunk
# fills up within this many tokens after a comma, the words after the comma move to the next chunk
COMMA_BACKTRACK = 20
_BREAK_UNIT = "BREAK"  # a unit: start a new chunk here


def _units(tok: ClipTokenizer, text: str, concept_word: str | None, emphasis: str, max_chunks: int
           ) -> list[tuple]:
    """The text as units (token id, weight, is-comma); a concept occurrence's id is None (K positions), a
    BREAK's _BREAK_UNIT (kept where the text may take several chunks, else dropped). Each run of one weight
    is tokenized on its own, cut at the concept word (as AUTOMATIC1111 tokenizes its runs)."""
    comma = tok.vocab.get(",</w>")
    runs, _ = _runs(text, emphasis, breaks=max_chunks > 1)
    units: list[tuple] = []
    for text_, weight in runs:
        if (text_, weight) == _BREAK_MARK:
            units.append((_BREAK_UNIT, 1.0, False))
            continue
        for i, piece in enumerate(text_.split(concept_word) if concept_word else [text_]):
            if i:
                units.append((None, weight, False))
            units += [(u, weight, u == comma) for u in tok.encode(piece)[1:-1]] if piece else []
    return units


def chunk_units(units: list[tuple], room: int, width: int, super_id: int | None = None) -> list[list[tuple]]:
    """AUTOMATIC1111's chunking of a prompt (its tokenize_line): units -> chunks of at most `room` positions,
    each position (id, weight, slot). A chunk is closed when full, at a BREAK (an empty one too), and where
    it fills up within COMMA_BACKTRACK tokens after a comma the tokens after that comma move on to the next
    chunk; a concept occurrence (`width` positions, slots 0..width-1, id -1 (_assemble writes the fill id);
    or one position of `super_id` where that is given) is never split: it starts a new chunk where it does
    not fit."""
    chunks: list[list[tuple]] = []
    chunk: list[tuple] = []
    last_comma = -1
    for u, w, is_comma in units:
        if u == _BREAK_UNIT:
            chunks.append(chunk)
            chunk, last_comma = [], -1
            continue
        if is_comma:
            last_comma = len(chunk)
        elif len(chunk) == room and last_comma != -1 and len(chunk) - last_comma <= COMMA_BACKTRACK:
            chunks.append(chunk[:last_comma + 1])
            chunk, last_comma = chunk[last_comma + 1:], -1
        if len(chunk) == room:
            chunks.append(chunk)
            chunk, last_comma = [], -1
        if u is not None:
            chunk.append((u, w, -1))
        elif super_id is not None:
            chunk.append((super_id, w, -1))
        else:
            if len(chunk) + width > room:
                chunks.append(chunk)
                chunk, last_comma = [], -1
            chunk += [(-1, w, k) for k in range(width)]
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def _fit(units: list[tuple], room: int, width: int, max_chunks: int, super_id: int | None = None) -> int:
    """The most units (a prefix) whose chunks number at most `max_chunks` with concept occurrences `width`
    wide and, where `super_id` is given, also as one `super_id` position (the super-class version)."""
    versions = [None] if super_id is None else [None, super_id]  # chunk_units' super_id of each version

    def fits(n: int) -> bool:
        return all(len(chunk_units(units[:n], room, width, s)) <= max_chunks for s in versions)

    lo, hi = 0, len(units)  # fits(lo) always: a prefix never needs more chunks than a longer one
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _assemble(chunks: list[list[tuple]], tok: ClipTokenizer, length: int, fill_id: int = 0
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Chunks -> ((chunks * length,) ids, weights or None where all are 1, slots): each chunk start, its
    positions, end, padding; a placeholder position's id is `fill_id`."""
    n = len(chunks)
    ids = np.full((n, length), tok.pad_id, np.int64)
    weights = np.ones((n, length), np.float32)
    slots = np.full((n, length), -1, np.int64)
    for c, chunk in enumerate(chunks):
        ids[c, 0], ids[c, len(chunk) + 1] = tok.bos_id, tok.eos_id
        for j, (u, w, k) in enumerate(chunk, start=1):
            ids[c, j], weights[c, j], slots[c, j] = (fill_id if k >= 0 else u), w, k
    return ids.ravel(), None if (weights == 1).all() else weights.ravel(), slots.ravel()


def _tokens(units: list[tuple], width: int = 1) -> int:
    """How many positions `units` take, a concept occurrence `width` (BREAKs none)."""
    return sum(width if u is None else u != _BREAK_UNIT for u, _, _ in units)


def _limit(room: int, max_chunks: int, limit: bool = False) -> str:
    if max_chunks == 1:
        return f"the text encoder's {room}-token limit" if limit else f"the text encoder's {room}"
    return f"the {max_chunks * room} tokens the bundle's UNet takes ({max_chunks} chunks of {room})"


def apply_emphasis(z: np.ndarray, weights: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Contexts (rows, L, D) with every position multiplied by its weight (rows, L), each row then scaled
    back to its mean before weighting where `normalize` (AUTOMATIC1111's "Original" emphasis; its "No norm"
    without). A row whose weights are all 1 is returned as it was, bit for bit. New float32 array."""
    z = np.array(z, dtype=np.float32)
    for r in np.flatnonzero((weights != 1).any(axis=1)):
        before = z[r].mean(dtype=np.float64)
        z[r] *= weights[r][:, None]
        if normalize:
            after = z[r].mean(dtype=np.float64)
            z[r] *= np.float32(before / after)
    return z


def a1111_syntax(text: str, what: str = "prompt", emphasis: str = "original", max_chunks: int = 1) -> list[str]:
    """What a prompt written for AUTOMATIC1111 would not get here: UserError for an extra-network tag
    (<lora:...>: pm-run would otherwise call it a second concept word); warnings for BREAK where emphasis is
    parsed and the bundle takes one chunk (`max_chunks` 1: A1111 starts a second 75-token chunk there), and
    for emphasis syntax, which CLIP then reads as words, with emphasis "none"."""
    m = _EXTRA_NETWORK.search(text)
    if m:
        raise UserError(f"the {what} holds {m.group(0)}: AUTOMATIC1111's LoRA / hypernetwork tags are not applied "
                        "by pm-run (it runs the bundle's networks and concept only): remove it from the prompt")
    check_emphasis_mode(emphasis)
    if emphasis == "none":
        m = _EMPHASIS.search(text)
        return [f"the {what} uses AUTOMATIC1111's emphasis syntax, \"{m.group(0)}\", which --emphasis none reads "
                "as words (the brackets and numbers too)"] if m else []
    said = []
    if max_chunks == 1 and _runs(text, emphasis)[1]:
        said.append(f"the {what} uses BREAK: AUTOMATIC1111 starts a second 75-token chunk there; this bundle's UNet "
                    "takes one chunk (bundles exported by pm-export 0.3 or later take four), so the text after BREAK "
                    "continues in it")
    return said


def concept_words_in(prompt: str) -> list[str]:
    return _CONCEPT_LIKE.findall(prompt)


def check_concept_word(word: str) -> None:
    """A new concept's word must look like <name>: prompts are cut at every occurrence of it, so a plain
    word ("face") would also match inside other words ("surface") and could never be written as itself,
    an empty one matches everywhere, and the runtime tells concepts apart by their <name> form."""
    if not isinstance(word, str) or not _CONCEPT_LIKE.fullmatch(word):
        raise UserError(f"--concept-word must be a name in angle brackets without spaces, like <persona> or <anna> "
                        f"(it stands apart from ordinary words in a prompt), got {word!r}")


def check_concept_words(prompt: str, concept: ConceptWords | None, concept_name: str | None = None) -> None:
    """Refuse a prompt holding a concept-like word (<name>) that is not the active concept's."""
    others = sorted({w for w in concept_words_in(prompt) if concept is None or w != concept.word})
    if not others:
        return
    if concept is None:
        raise UserError(f"the prompt uses {others[0]}, but no concept is active (the bundle has none)")
    if concept.word in prompt:
        raise UserError(f"two different concept words in one prompt ({concept.word} and {others[0]}): "
                        "one concept per image")
    which = f"concept {concept_name!r}" if concept_name else "the active concept"
    raise UserError(f"the prompt uses {others[0]}, but {which} is written {concept.word} "
                    "(pick another concept, or write its word)")


def encode_prompt(tok: ClipTokenizer, prompt: str, concept: ConceptWords | None, max_length: int = 77,
                  allow_no_concept: bool = False, concept_name: str | None = None, emphasis: str = "none",
                  max_chunks: int = 1) -> EncodedPrompt:
    """Both versions of `prompt`, each in up to `max_chunks` chunks of `max_length` positions (chunk_units;
    the two versions may take different numbers). Without a concept (or without its word, when allowed) both
    versions are the plain prompt. `emphasis`: one of EMPHASIS_MODES ("none": the text as CLIP reads it)."""
    runs, _ = _runs(prompt, emphasis)
    plain = "".join(t for t, _ in runs)  # the prompt without its emphasis syntax
    check_concept_words(plain, concept, concept_name)
    if concept is not None and sum(t.count(concept.word) for t, _ in runs) != plain.count(concept.word):
        raise UserError(f"the concept word {concept.word} is split by emphasis brackets: put the brackets around "
                        f"the whole word, e.g. ({concept.word}:1.2)")
    if concept is None or concept.word not in plain:
        if concept is not None and not allow_no_concept:
            raise UserError(f"the prompt does not contain the concept word {concept.word!r} (write it where the "
                            "person should appear, or allow prompts without it)")
        return encode_plain(tok, prompt, max_length, emphasis=emphasis, max_chunks=max_chunks)
    super_id = _super_class_id(tok, concept.super_class)
    K = concept.num_tokens
    units = _units(tok, prompt, concept.word, emphasis, max_chunks)  # a concept occurrence: id None
    room = max_length - 2
    kept = _fit(units, room, K, max_chunks, super_id)
    warnings = []
    if kept < len(units):
        total = _tokens(units, K)
        dropped_concepts = sum(u is None for u, _, _ in units[kept:])
        warnings.append(
            f"the prompt is {total} tokens (the concept word counts {K}), over {_limit(room, max_chunks)}: the end "
            f"was cut off at the same word for the super-class and the concept versions"
            + (f" ({dropped_concepts} occurrence(s) of {concept.word} cut off)" if dropped_concepts else ""))
        units = units[:kept]
        if all(u is not None for u, _, _ in units):
            raise UserError(f"the concept word {concept.word} lies beyond {_limit(room, max_chunks, True)}: "
                            "move it earlier in the prompt or shorten the prompt")
    super_ids, super_w, _ = _assemble(chunk_units(units, room, K, super_id), tok, max_length)
    concept_ids, concept_w, slots = _assemble(chunk_units(units, room, K), tok, max_length, super_id)
    return EncodedPrompt(super_ids, concept_ids, slots, True, tuple(warnings), super_w, concept_w)


def pad_chunks(enc: EncodedPrompt, super_chunks: int, concept_chunks: int, tok: ClipTokenizer, length: int
               ) -> EncodedPrompt:
    """`enc` with empty chunks (start, end, padding; weights 1) appended to its versions up to `super_chunks` /
    `concept_chunks` chunks of `length`: what AUTOMATIC1111 does to the shorter texts of a prompt editing
    schedule, which it encodes as one batch (chunk by chunk, an empty chunk where a text has no more)."""
    def grow(a: np.ndarray, n: int, what: int) -> np.ndarray:  # what: ids (0) or slots (2) of empty chunks
        more = n - len(a) // length
        return a if more <= 0 else np.concatenate([a, _assemble([[]] * more, tok, length)[what]])

    def weights(w: np.ndarray | None, ids: np.ndarray) -> np.ndarray | None:  # 1 in the added chunks
        return None if w is None else np.concatenate([w, np.ones(len(ids) - len(w), np.float32)])

    super_ids, concept_ids = grow(enc.super_ids, super_chunks, 0), grow(enc.concept_ids, concept_chunks, 0)
    return EncodedPrompt(super_ids, concept_ids, grow(enc.slots, concept_chunks, 2), enc.uses_concept, enc.warnings,
                         weights(enc.super_weights, super_ids), weights(enc.concept_weights, concept_ids))


def _super_class_id(tok: ClipTokenizer, word: str) -> int:
    ids = tok.encode(word)[1:-1]
    if len(ids) != 1:
        raise UserError(f"the super-class word {word!r} is {len(ids)} tokens for the bundle's tokenizer; "
                        "it must be one")
    return ids[0]
