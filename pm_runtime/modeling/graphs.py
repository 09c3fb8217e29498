"""The networks as PyTorch modules with exactly the signatures of pm_runtime.specs: what
pm-export traces and validates, what the torch backend runs, and what the torch-cuda backend
accelerates. Written once here (DESIGN §3: modeling/ is shared by trainer, exporter and backends).

  text_encoder  input_ids (N, L) int64, concept_embeds (N, L, D), bypass (N, L, D),
                concept_mask (N, L) bool -> c_k, c_v (N, L, D)
  unet          sample (N, 4, h, w), timestep (N,), c_k, c_v (N, L, D) -> noise_pred (N, 4, h, w)
  vae_decoder   latent (N, 4, h, w) -> image (N, 3, 8h, 8w) in [-1, 1]; the 1/scaling_factor
                division is INSIDE the module: feed the scheduler's latent as it is.
  vae_encoder   image (N, 3, 8h, 8w) in [-1, 1] -> latent (N, 4, h, w): the mean of the VAE's latent
                distribution x scaling_factor (optional: img2img's init image)
"""

from __future__ import annotations

import torch
from torch import nn

from ..specs import CONTEXT_CHUNKS, SAFETY_CHECKER, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, ModelDims
from .attention import install_split_kv, join_contexts
from .loading import BaseModel
from .text_encoder import EquilibriumTextEncoder, clip_parts


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.encoder = EquilibriumTextEncoder(text_encoder)

    def forward(self, input_ids, concept_embeds, bypass, concept_mask):
        # Placeholder ids may lie beyond the base vocabulary (they are added per concept): at masked
        # positions the embedding is replaced anyway, so look up id 0 there and never go out of range.
        ids = torch.where(concept_mask, torch.zeros_like(input_ids), input_ids)  # (N, L)
        return self.encoder(ids, concept_embeds, bypass, concept_mask)  # c_k, c_v (N, L, D)


class UNetGraph(nn.Module):
    """The UNet with split K/V cross-attention, taking c_k and c_v as two inputs."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, c_k, c_v):
        return self.unet(sample, timestep, join_contexts(c_k, c_v), return_dict=False)[0]  # (N, 4, h, w)


class VaeDecoderGraph(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scale = 1.0 / float(vae.config.scaling_factor)

    def forward(self, latent):
        return self.vae.decode(latent * self.scale, return_dict=False)[0]  # (N, 3, 8h, 8w)


class VaeEncoderGraph(nn.Module):
    """The encoder half of an AutoencoderKL (diffusers' or pm_runtime.modeling.standalone's: a module
    with `encoder`, `quant_conv` (None where the config has none) and `config`): image -> the latent
    distribution's mean x scaling_factor, what diffusers' encode(image).latent_dist.mode() gives,
    scaled into the sampler's space. The mean, not a sample: the same image gives the same latents
    on every backend (the posterior's spread is small next to the noise img2img adds)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder, self.quant_conv, self.config = vae.encoder, getattr(vae, "quant_conv", None), vae.config
        self.scale = float(vae.config.scaling_factor)
        self.channels = int(vae.config.latent_channels)

    def forward(self, image):
        moments = self.encoder(image)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments[:, :self.channels] * self.scale  # (N, 4, h, w); the log-variance half is dropped


class SafetyCheckerGraph(nn.Module):
    """diffusers' StableDiffusionSafetyChecker as a score: clip_input (N, 3, 224, 224) ->
    nsfw_score (N,), the largest concept score; the image is flagged when it is > 0, which is
    exactly diffusers' has_nsfw_concepts (any concept score > 0, special-care adjustment
    included). A score, not a bool, so that export validation compares numbers."""

    def __init__(self, checker: nn.Module):
        super().__init__()
        self.checker = checker

    def forward(self, clip_input):
        c = self.checker
        embeds = c.visual_projection(c.vision_model(clip_input)[1])  # (N, P)
        embeds = nn.functional.normalize(embeds, dim=-1)
        special = embeds @ nn.functional.normalize(c.special_care_embeds, dim=-1).T - c.special_care_embeds_weights
        concept = embeds @ nn.functional.normalize(c.concept_embeds, dim=-1).T - c.concept_embeds_weights
        adjust = (special > 0).any(dim=1, keepdim=True).to(concept.dtype) * 0.01  # special care: stricter
        return (concept + adjust).amax(dim=1)  # (N,)


def model_dims(base: BaseModel) -> ModelDims:
    """Call before placeholder tokens are added: the vocabulary is the base model's."""
    text_cfg = base.text_encoder.config
    vocab = int(clip_parts(base.text_encoder)[0].token_embedding.weight.shape[0])
    return ModelDims(
        text_dim=int(text_cfg.hidden_size), max_length=int(text_cfg.max_position_embeddings), vocab_size=vocab,
        latent_channels=int(base.unet.config.in_channels),
        vae_scale_factor=2 ** (len(base.vae.config.block_out_channels) - 1), context_chunks=CONTEXT_CHUNKS)


def graph_modules(base: BaseModel) -> dict[str, nn.Module]:
    """The PyTorch modules that export and validation compare (fp32, eval, split K/V installed). The VAE's
    encoder half goes to the VAE_ENCODER module: `base.vae.encoder` and `quant_conv` are None afterwards, so
    no two modules share weights (torch-cuda parks each network's weights on its own)."""
    install_split_kv(base.unet)
    encoder = VaeEncoderGraph(base.vae).eval()
    base.vae.encoder = base.vae.quant_conv = None  # the decoder's module keeps its half only: no shared weights
    modules = {TEXT_ENCODER: TextEncoderGraph(base.text_encoder).eval(), UNET: UNetGraph(base.unet).eval(),
               VAE_DECODER: VaeDecoderGraph(base.vae).eval(), VAE_ENCODER: encoder}
    if getattr(base, "safety_checker", None) is not None:
        modules[SAFETY_CHECKER] = SafetyCheckerGraph(base.safety_checker).eval()
    return modules


def tiled_decoding(vae_graph: VaeDecoderGraph, tile: int = 256) -> None:
    """Low-memory VAE decode: diffusers' tiled decoder with `tile`-pixel tiles (blended overlaps,
    so the image differs slightly from the one-piece decode; peak memory no longer grows with
    the image size)."""
    vae = vae_graph.vae
    vae.use_tiling = True
    vae.tile_sample_min_size = tile
    vae.tile_latent_min_size = tile // (2 ** (len(vae.config.block_out_channels) - 1))
