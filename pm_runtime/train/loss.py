"""The two loss terms of PersonaMagic training (DESIGN §1)."""

from __future__ import annotations

import torch

TE_SHARPNESS = 100.0  # softmax temperature of the Tandem Equilibrium pair


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample masked MSE: sum(M * (pred - target)^2) / sum(M), M repeated over channels.

    pred, target (N, C, h, w); mask (N, 1, h, w) -> (N,). Pixels where M == 0 do not count.
    """
    err = (pred.float() - target.float()) ** 2
    m = mask.float().expand_as(err)
    return (err * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3))


def prompt_lengths(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Number of real tokens per row (after start-of-text, before the first end-of-text)."""
    is_eos = input_ids == eos_id
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), torch.full_like(input_ids[:, 0], input_ids.shape[1]))
    return first - 1


def tandem_equilibrium(probs: torch.Tensor, placeholder_mask: torch.Tensor, lengths: torch.Tensor,
                       check: bool = True):
    """Tandem Equilibrium terms (a, b) from last-layer self-attention probabilities.

    probs (N, H, L, L): attention probabilities of the last text-encoder layer for the open prompt.
    placeholder_mask (N, L): True at placeholder positions. lengths (N,): real tokens per row.
    Per sample, S is the placeholder key column with the largest total attention and T the
    non-placeholder real-token column with the largest total; over ALL (sample, head, query row)
    entries p = softmax(100 * [S, T]); a = sum p_S / sum p, b = 1 - a (computed as sum p_T / sum p).
    `check` verifies every row has both kinds of column; it reads device values (a host sync),
    so the trainer checks its fixed prompt set once and passes check=False per step.
    """
    n, _, length, _ = probs.shape
    col_total = probs.sum(dim=(1, 2))  # (N, L): attention each key column receives
    pos = torch.arange(length, device=probs.device)
    real = (pos[None] >= 1) & (pos[None] <= lengths[:, None])
    s_ok, t_ok = real & placeholder_mask, real & ~placeholder_mask
    if check and (not bool(s_ok.any(-1).all()) or not bool(t_ok.any(-1).all())):
        raise ValueError("every open prompt needs a placeholder and a real non-placeholder token")
    neg = torch.finfo(col_total.dtype).min
    S = col_total.masked_fill(~s_ok, neg).argmax(-1)  # (N,)
    T = col_total.masked_fill(~t_ok, neg).argmax(-1)
    idx = torch.stack([S, T], -1)[:, None, None, :].expand(n, probs.shape[1], length, 2)
    p = torch.softmax(TE_SHARPNESS * probs.gather(-1, idx), dim=-1)  # (N, H, L, 2)
    total = p.sum()
    return p[..., 0].sum() / total, p[..., 1].sum() / total
