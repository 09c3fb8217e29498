"""The PersonaMagic mapper M(t, e_img) -> (E[t], B[t]) (DESIGN §1), written once for the
trainer, the exporter (baking) and the reference generator."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

TIME_DIM = 2048  # sinusoidal time features; 1024 frequencies
HIDDEN = 128


def time_encoding(t: torch.Tensor, dim: int = TIME_DIM) -> torch.Tensor:
    """(N,) timesteps (may be fractional) -> (N, dim), COS half first, freqs exp(-ln(1e4) i / (dim/2)).

    Equals diffusers' get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def anchor_timesteps(lo: int, hi: int, num_anchors: int) -> torch.Tensor:
    """A timesteps evenly spaced over [lo, hi): 400, 402, ..., 798 for the published settings."""
    return lo + (hi - lo) * torch.arange(num_anchors, dtype=torch.float64) / num_anchors


@dataclass(frozen=True)
class MapperConfig:
    num_tokens: int = 4  # K
    dim: int = 768  # D, text hidden size
    image_dim: int = 512  # I, CLIP ViT-B/32 projection width
    num_anchors: int = 200  # A
    stage_lo: int = 400
    stage_hi: int = 800

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MapperConfig":
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})


def _mlp(widths: list[int]) -> nn.Sequential:
    """Linear-LayerNorm-LeakyReLU blocks."""
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.LeakyReLU()]
    return nn.Sequential(*layers)


class Mapper(nn.Module):
    def __init__(self, config: MapperConfig, super_embedding: torch.Tensor):
        super().__init__()
        self.config = config
        K, D, A = config.num_tokens, config.dim, config.num_anchors
        # e_super and its norm are fixed facts of the base model, kept with the weights.
        self.register_buffer("super_embedding", super_embedding.detach().float().reshape(D).clone())
        self.anchors = nn.Linear(TIME_DIM, A)  # trainable; weight starts at the anchors' encodings
        with torch.no_grad():
            ts = anchor_timesteps(config.stage_lo, config.stage_hi, A).float()
            self.anchors.weight.copy_(time_encoding(ts))  # bias keeps nn.Linear's default init
        self.time_mlp = _mlp([A, HIDDEN, HIDDEN])
        self.token_head = nn.Linear(HIDDEN, K * D)
        self.bypass_mlp = _mlp([HIDDEN + config.image_dim, HIDDEN, HIDDEN])
        self.bypass_head = nn.Linear(HIDDEN, K * D)

    def forward(self, t: torch.Tensor, image_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (N,), image_embedding (N, I) -> E (N, K, D), B (N, K, D), float32."""
        K, D = self.config.num_tokens, self.config.dim
        h = self.time_mlp(self.anchors(time_encoding(t)))  # (N, 128)
        e_super = self.super_embedding
        rows = self.token_head(h).view(-1, K, D)
        E = F.normalize(rows + e_super, dim=-1) * e_super.norm()
        b = self.bypass_mlp(torch.cat([h, image_embedding.float()], dim=-1))
        B = self.bypass_head(b).view(-1, K, D)
        return E, B
