"""Stage regulation (DESIGN §1): which text context each denoising step uses.

For a scheduler timestep t (may be fractional):
  t > hi         super-class stage: the concept word is replaced by the super-class word.
  lo <= t <= hi  concept stage: the concept word becomes the K placeholders, whose embeddings
                 come from table row round(t) (rows cover every integer t in [lo, hi]).
  t < lo         late stage: LATE_REUSE (published code) repeats the previous step's context;
                 LATE_SUPER_CLASS uses the super-class context.
A plan is computed once per image; all distinct contexts are then encoded in one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

LATE_REUSE = "reuse"
LATE_SUPER_CLASS = "super-class"
LATE_POLICIES = (LATE_REUSE, LATE_SUPER_CLASS)


@dataclass(frozen=True)
class Context:
    """A distinct text context: the super-class prompt (t=None) or the concept prompt at integer t."""

    t: int | None = None

    @property
    def is_concept(self) -> bool:
        return self.t is not None


SUPER_CLASS = Context(None)


def round_half_up(t: float) -> int:
    # Python's round() rounds halves to even; a table row must not depend on that subtlety.
    return int(math.floor(float(t) + 0.5))


def stage_plan(timesteps: Sequence[float], lo: int, hi: int, late: str = LATE_REUSE) -> list[Context]:
    """One Context per step, in step order."""
    if late not in LATE_POLICIES:
        raise ValueError(f"late-stage policy must be one of {LATE_POLICIES}, got {late!r}")
    if not lo <= hi:
        raise ValueError(f"concept stage needs lo <= hi, got {lo}..{hi}")
    plan: list[Context] = []
    for t in timesteps:
        t = float(t)
        if t > hi:
            plan.append(SUPER_CLASS)
        elif t >= lo:
            plan.append(Context(min(max(round_half_up(t), lo), hi)))
        elif late == LATE_SUPER_CLASS or not plan:
            plan.append(SUPER_CLASS)
        else:
            plan.append(plan[-1])
    return plan


def distinct_contexts(plan: Sequence[Context]) -> list[Context]:
    """Distinct contexts in first-use order: the batch for the one text-encoder call."""
    return list(dict.fromkeys(plan))
