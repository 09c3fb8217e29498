"""The equilibrium text encoder (DESIGN §1) around a frozen Hugging Face CLIPTextModel.

Inputs are per position, so one batched call serves every context of an image and the
exported graph keeps the same signature:
  input_ids      (N, L)     token ids
  concept_embeds (N, L, D)  input embeddings to use where concept_mask is set (E[t] rows)
  bypass         (N, L, D)  bypass vectors added after the last layer where concept_mask is set
  concept_mask   (N, L)     bool, True at the K placeholder positions
Outputs C_k (key context) and C_v (value context), both (N, L, D). Where the mask is empty
C_v == C_k exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def clip_parts(text_encoder: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.LayerNorm]:
    """(embeddings, encoder layers, final LayerNorm) across transformers' two CLIPTextModel layouts."""
    core = getattr(text_encoder, "text_model", text_encoder)
    return core.embeddings, core.encoder.layers, core.final_layer_norm


def causal_mask(n: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (N, 1, L, L) mask: 0 on and below the diagonal, dtype-min above (CLIP is causal)."""
    m = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return m[None, None].expand(n, 1, length, length)


def attention_probs(layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Self-attention probabilities (N, heads, L, L) of one CLIP encoder layer for input `hidden`.

    Computed here (as transformers' eager attention does) so the text encoder itself can use
    any attention implementation.
    """
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    n, length, _ = x.shape
    q = attn.q_proj(x).view(n, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(n, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * attn.scale + mask
    return scores.softmax(dim=-1, dtype=torch.float32)


class EquilibriumTextEncoder(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.embeddings, self.layers, self.final_layer_norm = clip_parts(text_encoder)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.embeddings.token_embedding

    def forward(
        self,
        input_ids: torch.Tensor,
        concept_embeds: torch.Tensor | None = None,
        bypass: torch.Tensor | None = None,
        concept_mask: torch.Tensor | None = None,
        return_last_attention: bool = False,
    ):
        tokens = self.token_embedding(input_ids)  # (N, L, D)
        if concept_mask is not None and concept_embeds is not None:
            tokens = torch.where(concept_mask[..., None], concept_embeds.to(tokens.dtype), tokens)
        h = self.embeddings(inputs_embeds=tokens)  # + position embeddings
        mask = causal_mask(h.shape[0], h.shape[1], h.dtype, h.device)
        probs = None
        for i, layer in enumerate(self.layers):
            if return_last_attention and i == len(self.layers) - 1:
                probs = attention_probs(layer, h, mask)
            h = layer(h, mask)
        if isinstance(h, tuple):  # older transformers return (hidden,) from a layer
            h = h[0]
        h_v = h
        if concept_mask is not None and bypass is not None:
            # h' = normalize(h + B) * |h| at the placeholder positions, before the final LayerNorm.
            bent = F.normalize(h + bypass.to(h.dtype), dim=-1) * h.norm(dim=-1, keepdim=True)
            h_v = torch.where(concept_mask[..., None], bent, h)
        c_k = self.final_layer_norm(h)
        c_v = self.final_layer_norm(h_v)
        if return_last_attention:
            return c_k, c_v, probs
        return c_k, c_v


def scatter_concept(
    input_ids: torch.Tensor, placeholder_ids: list[int], E: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position inputs from per-sample (N, K, D) E and B: placeholder k gets row k.

    A concept word written twice in a prompt yields two runs of the K placeholders; each run
    gets the same K rows (the published code breaks on that).
    """
    n, length = input_ids.shape
    D = E.shape[-1]
    concept = torch.zeros(n, length, D, dtype=E.dtype, device=E.device)
    bypass = torch.zeros_like(concept)
    mask = torch.zeros(n, length, dtype=torch.bool, device=input_ids.device)
    for k, pid in enumerate(placeholder_ids):
        at = input_ids == pid  # (N, L)
        concept = torch.where(at[..., None], E[:, k][:, None, :], concept)
        bypass = torch.where(at[..., None], B[:, k][:, None, :], bypass)
        mask |= at
    return concept, bypass, mask
