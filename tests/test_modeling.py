"""The method's torch modules against the stock Hugging Face / diffusers networks."""

import torch
import torch.nn.functional as F

from pm_runtime.modeling.attention import install_split_kv, join_contexts
from pm_runtime.modeling.loading import add_placeholder_tokens, load_base_model
from pm_runtime.modeling.text_encoder import EquilibriumTextEncoder, scatter_concept


def _ids(base, texts):
    tok = base.tokenizer
    return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_text_encoder_without_concept_equals_clip(tiny_model):
    base = load_base_model(tiny_model, with_unet=False, with_vae=False)
    ids = _ids(base, ["a photo of a face", "monochrome, lowres"])
    te = EquilibriumTextEncoder(base.text_encoder)
    c_k, c_v = te(ids)
    ref = base.text_encoder(ids).last_hidden_state
    assert torch.allclose(c_k, ref, atol=1e-6)
    assert torch.equal(c_k, c_v)


def test_last_layer_attention_equals_eager(tiny_model):
    from transformers import CLIPTextModel

    base = load_base_model(tiny_model, with_unet=False, with_vae=False)
    eager = CLIPTextModel.from_pretrained(tiny_model / "text_encoder", attn_implementation="eager")
    ids = _ids(base, ["A face is reading a book"])
    ref = eager(ids, output_attentions=True).attentions[-1]
    _, _, probs = EquilibriumTextEncoder(base.text_encoder)(ids, return_last_attention=True)
    assert probs.shape == ref.shape == (1, 4, 77, 77)
    assert torch.allclose(probs, ref, atol=1e-6)


def test_concept_and_bypass_positions(tiny_model):
    base = load_base_model(tiny_model, with_unet=False, with_vae=False)
    ph = add_placeholder_tokens(base, "face", 2)
    ids = _ids(base, [f"a photo of {' '.join(ph.tokens)} here", "a photo of a face"])
    torch.manual_seed(0)
    E, B = torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    ce, bp, mask = scatter_concept(ids, list(ph.ids), E, B)
    assert mask.sum().item() == 2 and mask[0, 4] and mask[0, 5]
    assert torch.equal(ce[0, 4], E[0, 0]) and torch.equal(ce[0, 5], E[0, 1])
    te = EquilibriumTextEncoder(base.text_encoder)
    c_k, c_v, = te(ids, ce, bp, mask)
    # no placeholder in row 1: C_v == C_k; row 0 differs only at placeholder positions
    assert torch.equal(c_k[1], c_v[1])
    diff = (c_k[0] - c_v[0]).abs().sum(-1)
    assert diff[4] > 0 and diff[5] > 0 and diff[~mask[0]].max() == 0
    # the bypass formula by hand: h' = normalize(h + B) |h|, then the final LayerNorm
    tokens = te.token_embedding(ids[:1]).clone()
    tokens[0, 4:6] = E[0]
    h = te.embeddings(inputs_embeds=tokens)
    from pm_runtime.modeling.text_encoder import causal_mask

    m = causal_mask(1, 77, h.dtype, h.device)
    for layer in te.layers:
        h = layer(h, m)
    bent = F.normalize(h[0, 4] + B[0, 0], dim=-1) * h[0, 4].norm()
    assert torch.allclose(c_v[0, 4], te.final_layer_norm(bent), atol=1e-5)
    assert torch.allclose(c_k[0, 4], te.final_layer_norm(h[0, 4]), atol=1e-5)


def test_split_kv_unet_equals_stock_when_contexts_match(tiny_model):
    base = load_base_model(tiny_model, with_vae=False)
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    t = torch.tensor([500, 10])
    with torch.no_grad():
        ref = base.unet(x, t, ctx).sample
        n = install_split_kv(base.unet)
        out = base.unet(x, t, join_contexts(ctx, ctx)).sample
    assert n == sum(1 for k in base.unet.attn_processors if k.endswith("attn2.processor")) and n > 0
    assert torch.allclose(out, ref, atol=1e-6)


def test_split_kv_reads_keys_and_values_from_their_halves(tiny_model):
    base = load_base_model(tiny_model, with_vae=False)
    install_split_kv(base.unet)
    attn = next(m for name, m in base.unet.named_modules() if name.endswith("attn2"))
    torch.manual_seed(0)
    hs, c_k, c_v = torch.randn(1, 16, attn.query_dim), torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    with torch.no_grad():
        out = attn(hs, encoder_hidden_states=join_contexts(c_k, c_v))
        q = attn.to_q(hs).view(1, 16, attn.heads, -1).transpose(1, 2)
        k = attn.to_k(c_k).view(1, 77, attn.heads, -1).transpose(1, 2)
        v = attn.to_v(c_v).view(1, 77, attn.heads, -1).transpose(1, 2)
        w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        ref = attn.to_out[0]((w @ v).transpose(1, 2).reshape(1, 16, -1))
    assert torch.allclose(out, ref, atol=1e-5)
