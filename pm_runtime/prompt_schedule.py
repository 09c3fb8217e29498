"""AUTOMATIC1111's prompt editing and alternation: which text the prompt is at each sampling step. No torch.

  [from:to:when]  "from" until step `when`, then "to"; [to:when] nothing, then "to"; [from::when] "from",
                  then nothing. `when` with a decimal point is a fraction of the steps (0.25: a quarter),
                  without one a step number.
  [a|b|c]         a at step 1, b at step 2, c at step 3, a at step 4, ... (an empty alternative is nothing)

They nest, and may sit inside emphasis brackets, "([red:blue:0.5] hair:1.2)", whose syntax is kept for the
emphasis parser (prompt_encoding.parse_emphasis) to read in each step's text. A prompt this grammar does
not take (e.g. a "|" outside square brackets) is one text for every step, as in A1111; so is a prompt
without either construct.

`schedule(prompt, steps)` gives A1111's schedule, [(end_at_step, text), ...] with end_at_step ascending and
the last equal to `steps`; sampling step i (from 0) uses the first entry with i <= end_at_step (A1111's
reconstruct_cond_batch). Written from A1111's grammar and rules (modules/prompt_parser.py: its
get_learned_conditioning_prompt_schedules); its documented examples are the tests. The hires fix's second
pass (`first_pass_steps` given: the first pass's step count) counts on from the first pass as A1111 (1.6+,
not its "old scheduling") does: a fraction `when` is one of the whole run, 0 to 1 the first pass and 1 to 2
the second ([a:b:0.5]: b all through the second pass; [a:b:1.5]: its middle), a step number counts the
first pass's steps too ([a:b:25] after 20 first-pass steps: step 5 of the second).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

# a number as the grammar's SIGNED_NUMBER: an optional sign, digits with an optional decimal point (or a
# point and digits), an optional exponent
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)  # text without brackets, colons or bars; escapes kept
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class _Scheduled:
    before: tuple | None  # None: "[to:when]" (nothing before)
    after: tuple
    number: str  # as written: a decimal point makes it a fraction of the steps


@dataclass(frozen=True)
class _Alternate:
    options: tuple  # each a tuple of nodes; () for an empty alternative


class _NoParse(Exception):
    pass


class _Parser:
    """Recursive descent over A1111's grammar:
        start:      (prompt | one or more of "[ ] ( ) :")*
        prompt:     (emphasized | scheduled | alternate | plain | whitespace)*
        emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"   (kept as text)
        scheduled:  "[" [prompt ":"] prompt ":" [whitespace] number [whitespace] "]"
        alternate:  "[" prompt ("|" [prompt])+ "]"
    A prompt node list holds str (text, kept verbatim) and _Scheduled / _Alternate."""

    def __init__(self, text: str):
        self.text = text

    def start(self) -> tuple:
        nodes, pos = [], 0
        while pos < len(self.text):
            got, end = self.prompt(pos)
            if end > pos:
                nodes += got
                pos = end
            elif self.text[pos] in "[]():":  # a bracket or colon no rule takes, as text
                nodes.append(self.text[pos])
                pos += 1
            else:  # e.g. "|" outside square brackets: A1111 then takes the whole prompt as one text
                raise _NoParse
        return tuple(nodes)

    def prompt(self, pos: int) -> tuple[list, int]:
        """The longest prompt from pos (possibly empty)."""
        nodes = []
        while pos < len(self.text):
            for rule in (self._plain, self._space, self._round, self._square):
                got = rule(pos)
                if got is not None:
                    node, pos = got
                    nodes += node
                    break
            else:
                break
        return nodes, pos

    def _plain(self, pos):
        m = _PLAIN.match(self.text, pos)
        return ([m.group(0)], m.end()) if m else None

    def _space(self, pos):
        m = _SPACE.match(self.text, pos)
        return ([m.group(0)], m.end()) if m else None

    def _round(self, pos):
        """"(" prompt ")" or "(" prompt ":" prompt ")": emphasis, kept as its text around the inner nodes."""
        if self.text[pos] != "(":
            return None
        inner, end = self.prompt(pos + 1)
        if end < len(self.text) and self.text[end] == ")":
            return ["(", *inner, ")"], end + 1
        if end < len(self.text) and self.text[end] == ":":
            weight, end2 = self.prompt(end + 1)
            if end2 < len(self.text) and self.text[end2] == ")":
                return ["(", *inner, ":", *weight, ")"], end2 + 1
        return None

    def _square(self, pos):
        if self.text[pos] != "[":
            return None
        for rule in (self._scheduled, self._alternate):
            got = rule(pos + 1)
            if got is not None:
                return got
        inner, end = self.prompt(pos + 1)  # "[" prompt "]": emphasis, kept as text
        if end < len(self.text) and self.text[end] == "]":
            return ["[", *inner, "]"], end + 1
        return None

    def _number_end(self, pos):
        """[whitespace] number [whitespace] "]" from pos: (number, the position after "]") or None."""
        m = _SPACE.match(self.text, pos)
        pos = m.end() if m else pos
        n = _NUMBER.match(self.text, pos)
        if not n:
            return None
        end = n.end()
        m = _SPACE.match(self.text, end)
        end = m.end() if m else end
        if end < len(self.text) and self.text[end] == "]":
            return n.group(0), end + 1
        return None

    def _scheduled(self, pos):
        first, end = self.prompt(pos)
        if end >= len(self.text) or self.text[end] != ":":
            return None
        got = self._number_end(end + 1)  # [to:when]
        if got is not None:
            number, stop = got
            return [_Scheduled(None, tuple(first), number)], stop
        second, end2 = self.prompt(end + 1)  # [from:to:when]
        if end2 < len(self.text) and self.text[end2] == ":":
            got = self._number_end(end2 + 1)
            if got is not None:
                number, stop = got
                return [_Scheduled(tuple(first), tuple(second), number)], stop
        return None

    def _alternate(self, pos):
        options, end = [], pos
        first, end = self.prompt(end)
        options.append(tuple(first))
        while end < len(self.text) and self.text[end] == "|":
            option, end = self.prompt(end + 1)
            options.append(tuple(option))
        if len(options) < 2 or end >= len(self.text) or self.text[end] != "]":
            return None
        return [_Alternate(tuple(options))], end + 1


def _when(number: str, steps: int, first: int | None) -> int:
    """The step up to which a [from:to:when] reads `from` (A1111's CollectSteps; `first`: the first pass's
    steps where this is the hires pass, else None)."""
    value = float(number)
    if "." in number:
        value = (value - (0.0 if first is None else 1.0)) * steps
    else:
        value -= 0 if first is None else first
    return min(steps, int(value))


def _steps(nodes, steps: int, out: set, first: int | None) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = _when(node.number, steps, first)
            if when >= 1:
                out.add(when)
            _steps(node.before or (), steps, out, first)
            _steps(node.after, steps, out, first)
        elif isinstance(node, _Alternate):
            out.update(range(1, steps + 1))
            for option in node.options:
                _steps(option, steps, out, first)


def _text(nodes, step: int, steps: int, first: int | None) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            later = step > _when(node.number, steps, first)
            parts.append(_text(node.after if later else node.before or (), step, steps, first))
        else:
            parts.append(_text(node.options[(step - 1) % len(node.options)], step, steps, first))
    return "".join(parts)


def schedule(prompt: str, steps: int, first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """[(end_at_step, text), ...]: the text of every stretch of sampling steps, as A1111 schedules it (the
    hires fix's second pass where `first_pass_steps` is given)."""
    try:
        nodes = _Parser(prompt).start()
    except _NoParse:
        return [(steps, prompt)]
    ends = {steps}
    _steps(nodes, steps, ends, first_pass_steps)
    return [(t, _text(nodes, t, steps, first_pass_steps)) for t in sorted(ends)]


def texts_per_step(prompt: str, steps: int, first_pass_steps: int | None = None) -> tuple[list[str], list[int]]:
    """(the distinct texts, in order of first use; for each sampling step from 0, the index of its text)."""
    entries = schedule(prompt, steps, first_pass_steps)
    texts = list(dict.fromkeys(text for _, text in entries))
    index = {text: k for k, text in enumerate(texts)}
    ends = [end for end, _ in entries]
    last = len(entries) - 1
    return texts, [index[entries[min(bisect.bisect_left(ends, i), last)][1]] for i in range(steps)]


__all__ = ["schedule", "texts_per_step"]
