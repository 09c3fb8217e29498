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

Truncation (CLIP: 77 positions, start and end tokens included) drops whole units from the
end: a text token, or a whole concept occurrence (K placeholders, never split); the same
units are dropped from both versions, and a warning says so. One concept word used twice
gives two runs of the K placeholders, each with the same K rows. Two different concept words
in one prompt are refused: one concept per image.
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
# AUTOMATIC1111's emphasis: (words:1.3), ((words)), [words] (and its [from:to:when] prompt editing)
_EMPHASIS = re.compile(r"\([^()]*:\s*[-+]?(?:\d+\.?\d*|\.\d+)\s*\)|\(\([^()]*\)\)|\[[^\[\]]+\]")


@dataclass(frozen=True)
class ConceptWords:
    word: str  # what users write, e.g. "<persona>"
    super_class: str  # e.g. "face" (one token)
    num_tokens: int  # K


@dataclass(frozen=True, eq=False)
class EncodedPrompt:
    super_ids: np.ndarray  # (L,) int64: start, tokens, end, padding
    concept_ids: np.ndarray  # (L,) int64: the same, with K positions per concept occurrence
    slots: np.ndarray  # (L,) int64: k at placeholder k of concept_ids, -1 elsewhere
    uses_concept: bool  # the (kept part of the) prompt holds the concept word
    warnings: tuple[str, ...] = ()

    @property
    def mask(self) -> np.ndarray:
        return self.slots >= 0


def pad(ids: list[int], tok: ClipTokenizer, length: int) -> np.ndarray:
    out = np.full(length, tok.pad_id, dtype=np.int64)
    out[:len(ids)] = ids
    return out


def encode_plain(tok: ClipTokenizer, text: str, max_length: int, what: str = "prompt") -> tuple[np.ndarray, list[str]]:
    """(L,) ids of a prompt without concept handling (negative prompt, plain prompts)."""
    ids, cut = tok.encode_with_truncation_info(text, max_length)
    body = len(tok.encode(text)) - 2
    warn = [f"the {what} is {body} tokens, over the text encoder's {max_length - 2}: "
            f"the last {body - (max_length - 2)} were cut off"] if cut else []
    return pad(ids, tok, max_length), warn


def a1111_syntax(text: str, what: str = "prompt") -> list[str]:
    """What a prompt written for AUTOMATIC1111 would not get here: UserError for an extra-network tag
    (<lora:...>: pm-run would otherwise call it a second concept word), a warning for emphasis syntax,
    which CLIP then reads as words (the image is made from the plain text, brackets and numbers included)."""
    m = _EXTRA_NETWORK.search(text)
    if m:
        raise UserError(f"the {what} holds {m.group(0)}: AUTOMATIC1111's LoRA / hypernetwork tags are not applied "
                        "by pm-run (it runs the bundle's networks and concept only): remove it from the prompt")
    m = _EMPHASIS.search(text)
    if not m:
        return []
    return [f"the {what} uses AUTOMATIC1111's emphasis syntax, \"{m.group(0)}\": pm-run does not weight words: "
            "the brackets and numbers are read as words too (write the words alone)"]


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
                  allow_no_concept: bool = False, concept_name: str | None = None) -> EncodedPrompt:
    """Both versions of `prompt`. Without a concept (or without its word, when allowed) both
    versions are the plain prompt."""
    check_concept_words(prompt, concept, concept_name)
    if concept is None or concept.word not in prompt:
        if concept is not None and not allow_no_concept:
            raise UserError(f"the prompt does not contain the concept word {concept.word!r} (write it where the "
                            "person should appear, or allow prompts without it)")
        ids, warn = encode_plain(tok, prompt, max_length)
        return EncodedPrompt(ids, ids.copy(), np.full(max_length, -1, np.int64), False, tuple(warn))
    super_id = _super_class_id(tok, concept.super_class)
    K = concept.num_tokens
    # units: a text token id, or None for one concept occurrence
    units: list[int | None] = []
    for i, piece in enumerate(prompt.split(concept.word)):
        if i:
            units.append(None)
        units += tok.encode(piece)[1:-1] if piece else []
    room = max_length - 2
    kept, used = 0, 0
    for u in units:
        width = K if u is None else 1
        if used + width > room:
            break
        used += width
        kept += 1
    warnings = []
    if kept < len(units):
        total = sum(K if u is None else 1 for u in units)
        dropped_concepts = sum(u is None for u in units[kept:])
        warnings.append(
            f"the prompt is {total} tokens (the concept word counts {K}), over the text encoder's {room}: the end "
            f"was cut off at the same word for the super-class and the concept versions"
            + (f" ({dropped_concepts} occurrence(s) of {concept.word} cut off)" if dropped_concepts else ""))
        units = units[:kept]
        if None not in units:
            raise UserError(f"the concept word {concept.word} lies beyond the text encoder's {room}-token limit: "
                            "move it earlier in the prompt or shorten the prompt")
    super_ids, concept_ids, slots = [tok.bos_id], [tok.bos_id], [-1]
    for u in units:
        if u is None:
            super_ids.append(super_id)
            concept_ids += [super_id] * K
            slots += list(range(K))
        else:
            super_ids.append(u)
            concept_ids.append(u)
            slots.append(-1)
    super_ids.append(tok.eos_id)
    concept_ids.append(tok.eos_id)
    slots.append(-1)
    slot_arr = np.full(max_length, -1, np.int64)
    slot_arr[:len(slots)] = slots
    return EncodedPrompt(pad(super_ids, tok, max_length), pad(concept_ids, tok, max_length), slot_arr, True,
                         tuple(warnings))


def _super_class_id(tok: ClipTokenizer, word: str) -> int:
    ids = tok.encode(word)[1:-1]
    if len(ids) != 1:
        raise UserError(f"the super-class word {word!r} is {len(ids)} tokens for the bundle's tokenizer; "
                        "it must be one")
    return ids[0]
