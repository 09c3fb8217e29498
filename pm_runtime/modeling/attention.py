"""Split key/value cross-attention for diffusers' UNet (DESIGN §1).

The UNet keeps its signature: encoder_hidden_states is [C_k ; C_v] concatenated on the
sequence axis, (N, 2L, D). Cross-attention reads K = to_k(C_k), V = to_v(C_v); self-attention
is untouched. With C_v == C_k the result equals the stock UNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def join_contexts(c_k: torch.Tensor, c_v: torch.Tensor) -> torch.Tensor:
    """(N, L, D) x 2 -> (N, 2L, D), the UNet's encoder_hidden_states."""
    return torch.cat([c_k, c_v], dim=1)


class SplitKVAttnProcessor:
    """Cross-attention processor splitting encoder_hidden_states into key and value halves."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("SplitKVAttnProcessor is for cross-attention layers only")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError("split K/V attention supports SD-style transformer blocks only")
        if attention_mask is not None:
            raise NotImplementedError("split K/V attention takes no attention mask")
        residual = hidden_states
        n, _, _ = hidden_states.shape
        length = encoder_hidden_states.shape[1] // 2
        c_k, c_v = encoder_hidden_states[:, :length], encoder_hidden_states[:, length:]
        if attn.norm_cross:
            c_k, c_v = attn.norm_encoder_hidden_states(c_k), attn.norm_encoder_hidden_states(c_v)
        q = attn.to_q(hidden_states)  # (N, HW, inner)
        k = attn.to_k(c_k)  # (N, L, inner)
        v = attn.to_v(c_v)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (x.view(n, -1, attn.heads, head_dim).transpose(1, 2) for x in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(n, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_split_kv(unet) -> int:
    """Give every cross-attention (attn2) of `unet` the split processor. Returns how many."""
    procs = {}
    count = 0
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            procs[name] = SplitKVAttnProcessor()
            count += 1
        else:
            procs[name] = proc
    if count == 0:
        raise ValueError("the UNet has no cross-attention layers (attn2)")
    unet.set_attn_processor(procs)
    return count
