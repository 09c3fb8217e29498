"""Prompt handling shared by the trainer, the reference generator and the runtime (no torch)."""

from __future__ import annotations

from .errors import UserError


def placeholder_text(placeholder_tokens) -> str:
    """The K placeholder tokens as they appear in a prompt (published: joined by spaces)."""
    return " ".join(placeholder_tokens)


def check_concept_prompt(prompt: str, concept_word: str, allow_no_concept: bool = False) -> bool:
    """Whether `prompt` uses the concept word; refuses a prompt without it unless allowed."""
    if concept_word in prompt:
        return True
    if not allow_no_concept:
        raise UserError(f"the prompt does not contain the concept word {concept_word!r} "
                        "(write it where the person should appear, or allow prompts without it)")
    return False


def super_class_prompt(prompt: str, concept_word: str, super_class: str) -> str:
    return prompt.replace(concept_word, super_class)


def concept_prompt(prompt: str, concept_word: str, placeholder_tokens) -> str:
    return prompt.replace(concept_word, placeholder_text(placeholder_tokens))
