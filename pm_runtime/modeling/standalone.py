"""The networks of a bundle's torch weights built with PyTorch alone: no diffusers, no transformers.

Why: importing diffusers and transformers (and the classes they pull in: torch._dynamo, scipy,
...) is most of a new process's time to its first image on the torch-cuda path; these modules
need only torch. They are built FROM the loaded state dict (each layer's shape is its tensor's
shape, the tensors are taken as they are: nothing is allocated twice, nothing is initialised at
random) and keep the Hugging Face parameter names, so the same `torch/*.safetensors` files load
into either. Where a config asks for anything these modules do not compute, `unsupported` says
why and the loader uses the Hugging Face class instead (pm_runtime.modeling.bundle_weights).

- CLIPText: transformers' CLIPTextModel (token + position embeddings, pre-LN encoder layers,
  final LayerNorm); the EquilibriumTextEncoder drives its parts (clip_parts).
- SafetyChecker: diffusers' StableDiffusionSafetyChecker (a CLIP vision tower, the visual
  projection and the concept embeddings); SafetyCheckerGraph computes the score.
- VAE: the decoder half of diffusers' AutoencoderKL (post_quant_conv + Decoder), with decode().
- VAEEncoder: its encoder half (Encoder + quant_conv: the latent distribution's moments); the
  VaeEncoderGraph takes their mean.
- UNet: the parameter tree of diffusers' UNet2DConditionModel for SD 1.x/2.x (the attribute names
  FastUNet reads). It has no forward of its own: its computation is FastUNet's
  (pm_runtime/modeling/fast_unet.py), checked against diffusers' UNet in tests/test_standalone.py.
Parity with the Hugging Face classes on the same weights is tested (tests/test_standalone.py).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..specs import SAFETY_CHECKER, TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER
from .fast_unet import config_unsupported, fused_resnet, fused_resnet_consuming, gn_silu, resnet_biases


class Config(dict):
    """A model config (the dict a bundle stores) read as attributes too, like the HF configs."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class _Weights:
    """Builds layers from a state dict, taking its tensors as parameters; counts what it used so that
    a file with tensors the module does not have is an error, not silently ignored."""

    def __init__(self, state: dict, name: str):
        self.state, self.name, self.used = state, name, set()

    def has(self, key: str) -> bool:
        return key in self.state

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise UserError(f"{self.name}: tensor {key} is missing")
        self.used.add(key)
        return self.state[key]

    def count(self, prefix: str) -> int:
        """How many numbered children `prefix.0.`, `prefix.1.`, ... the state dict has."""
        pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        found = {int(m.group(1)) for k in self.state for m in [pat.match(k)] if m}
        return max(found) + 1 if found else 0

    def _param(self, key: str) -> nn.Parameter:
        return nn.Parameter(self.tensor(key), requires_grad=False)

    def _fill(self, module: nn.Module, prefix: str, names=("weight", "bias")) -> nn.Module:
        for n in names:
            if getattr(module, n, None) is not None:
                setattr(module, n, self._param(f"{prefix}.{n}"))
        return module

    # Whether a layer has a bias is the architecture's (as in the HF class), never the file's: a file
    # without an expected bias, or with an unexpected one, is an error.
    def linear(self, prefix: str, bias: bool = True) -> nn.Linear:
        w = self.tensor(f"{prefix}.weight")
        with torch.device("meta"):
            m = nn.Linear(w.shape[1], w.shape[0], bias=bias)
        return self._fill(m, prefix)

    def conv(self, prefix: str, stride: int = 1, bias: bool = True, padding: int | None = None) -> nn.Conv2d:
        w = self.tensor(f"{prefix}.weight")
        padding = w.shape[2] // 2 if padding is None else padding
        with torch.device("meta"):
            m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride=stride, padding=padding, bias=bias)
        return self._fill(m, prefix)

    def group_norm(self, prefix: str, groups: int, eps: float) -> nn.GroupNorm:
        w = self.tensor(f"{prefix}.weight")
        with torch.device("meta"):
            m = nn.GroupNorm(groups, w.shape[0], eps=eps)
        return self._fill(m, prefix)

    def layer_norm(self, prefix: str, eps: float) -> nn.LayerNorm:
        w = self.tensor(f"{prefix}.weight")
        with torch.device("meta"):
            m = nn.LayerNorm(w.shape[0], eps=eps)
        return self._fill(m, prefix)

    def embedding(self, prefix: str) -> nn.Embedding:
        w = self.tensor(f"{prefix}.weight")  # (built on meta, its random init would import torch._dynamo)
        return nn.Embedding(w.shape[0], w.shape[1], _weight=w, _freeze=True)

    def check_all_used(self) -> None:
        left = sorted(set(self.state) - self.used)
        if left:
            raise UserError(f"{self.name}: {len(left)} tensors this network does not have (e.g. {left[0]})")


# ---------------------------------------------------------------------------------------- CLIP
class CLIPAttention(nn.Module):
    def __init__(self, w: _Weights, p: str, heads: int):
        super().__init__()
        self.q_proj, self.k_proj = w.linear(f"{p}.q_proj"), w.linear(f"{p}.k_proj")
        self.v_proj, self.out_proj = w.linear(f"{p}.v_proj"), w.linear(f"{p}.out_proj")
        width = self.q_proj.weight.shape[0]
        if width % heads:
            raise UserError(f"{w.name}: width {width} is not a multiple of {heads} heads")
        self.num_heads, self.head_dim = heads, width // heads
        self.scale = self.head_dim ** -0.5

    def forward(self, x, mask=None):
        n, length, _ = x.shape
        split = lambda t: t.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                             attn_mask=mask, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, -1))


ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


class CLIPLayer(nn.Module):
    """transformers' CLIPEncoderLayer: x + attn(LN1(x)), then x + MLP(LN2(x))."""

    def __init__(self, w: _Weights, p: str, heads: int, eps: float, act: str):
        super().__init__()
        self.layer_norm1 = w.layer_norm(f"{p}.layer_norm1", eps)
        self.self_attn = CLIPAttention(w, f"{p}.self_attn", heads)
        self.layer_norm2 = w.layer_norm(f"{p}.layer_norm2", eps)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = w.linear(f"{p}.mlp.fc1"), w.linear(f"{p}.mlp.fc2")
        self.act = ACTIVATIONS[act]

    def forward(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


def _clip_unsupported(cfg: dict) -> str | None:
    if cfg.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
        return f"activation {cfg.get('hidden_act')}"
    return None


def _layers(w: _Weights, prefix: str, cfg: dict) -> nn.ModuleList:
    heads, eps = int(cfg["num_attention_heads"]), float(cfg.get("layer_norm_eps", 1e-5))
    act = cfg.get("hidden_act", "quick_gelu")
    return nn.ModuleList([CLIPLayer(w, f"{prefix}.{i}", heads, eps, act) for i in range(w.count(prefix))])


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, w: _Weights):
        super().__init__()
        self.token_embedding = w.embedding("embeddings.token_embedding")
        self.position_embedding = w.embedding("embeddings.position_embedding")

    def forward(self, input_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        return inputs_embeds + self.position_embedding.weight[:inputs_embeds.shape[1]]


class CLIPText(nn.Module):
    """transformers' CLIPTextModel's parts (embeddings, encoder.layers, final_layer_norm); the
    EquilibriumTextEncoder runs them (causal mask, bypass, the two contexts)."""

    def __init__(self, state: dict, config: dict):
        super().__init__()
        w = _Weights({k.removeprefix("text_model."): v for k, v in state.items()}, "text encoder weights")
        w.used.update(k for k in w.state if k.endswith("position_ids"))  # transformers' own index buffer
        self.config = Config(config)
        self.embeddings = CLIPTextEmbeddings(w)
        self.encoder = nn.Module()
        self.encoder.layers = _layers(w, "encoder.layers", config)
        self.final_layer_norm = w.layer_norm("final_layer_norm", float(config.get("layer_norm_eps", 1e-5)))
        w.check_all_used()


class CLIPVision(nn.Module):
    """transformers' CLIPVisionTransformer: forward(pixels (N, 3, S, S)) -> (last hidden, pooled)."""

    def __init__(self, w: _Weights, p: str, cfg: dict):
        super().__init__()
        self.class_embedding = w._param(f"{p}.embeddings.class_embedding")
        self.patch_embedding = w.conv(f"{p}.embeddings.patch_embedding", stride=int(cfg["patch_size"]), bias=False)
        self.patch_embedding.padding = (0, 0)
        self.position_embedding = w.embedding(f"{p}.embeddings.position_embedding")
        eps = float(cfg.get("layer_norm_eps", 1e-5))
        self.pre_layrnorm = w.layer_norm(f"{p}.pre_layrnorm", eps)
        self.layers = _layers(w, f"{p}.encoder.layers", cfg)
        self.post_layernorm = w.layer_norm(f"{p}.post_layernorm", eps)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        h = self.pre_layrnorm(torch.cat([cls, patches], dim=1) + self.position_embedding.weight)
        for layer in self.layers:
            h = layer(h)
        return h, self.post_layernorm(h[:, 0])


class SafetyChecker(nn.Module):
    """diffusers' StableDiffusionSafetyChecker's parameters; SafetyCheckerGraph scores with them."""

    def __init__(self, state: dict, config: dict):
        super().__init__()
        w = _Weights({k.replace("vision_model.vision_model.", "vision_model."): v for k, v in state.items()},
                     "safety checker weights")
        w.used.update(k for k in w.state if k.endswith("position_ids"))
        self.config = Config(config)
        self.vision_model = CLIPVision(w, "vision_model", config.get("vision_config", {}))
        self.visual_projection = w.linear("visual_projection", bias=False)
        for name in ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights"):
            setattr(self, name, w._param(name))
        w.check_all_used()


# ---------------------------------------------------------------------------------------- VAE
class Resnet(nn.Module):
    """diffusers' ResnetBlock2D (default time norm, output scale 1): x + conv2(SiLU(norm2(conv1(
    SiLU(norm1(x))) + temb))). FastUNet fuses its own version; the VAE decoder runs this one, with
    the same fused epilogues (`fused_epilogues`, default on): the convolutions run without their
    biases (PyTorch adds a cuDNN convolution's bias in a pass of its own), conv1's is added by
    norm2's kernel, conv2's and the shortcut's by one residual kernel that writes into conv2's
    output (one full-resolution tensor fewer alive at the block's end)."""

    def __init__(self, w: _Weights, p: str, groups: int, eps: float):
        super().__init__()
        self.norm1, self.conv1 = w.group_norm(f"{p}.norm1", groups, eps), w.conv(f"{p}.conv1")
        self.time_emb_proj = w.linear(f"{p}.time_emb_proj") if w.has(f"{p}.time_emb_proj.weight") else None
        self.norm2, self.conv2 = w.group_norm(f"{p}.norm2", groups, eps), w.conv(f"{p}.conv2")
        self.conv_shortcut = w.conv(f"{p}.conv_shortcut") if w.has(f"{p}.conv_shortcut.weight") else None
        self.fused_epilogues = True
        time_bias, out_bias = resnet_biases(self)
        self.register_buffer("pm_time_bias", time_bias, persistent=False)
        self.register_buffer("pm_out_bias", out_bias, persistent=False)

    def forward(self, x, temb=None):
        if temb is None and self.fused_epilogues:  # the VAE's blocks (FastUNet runs the UNet's)
            t = None if self.pm_time_bias is None else self.pm_time_bias[None].expand(x.shape[0], -1)
            return fused_resnet(self, x, t, self.pm_out_bias)
        h = self.conv1(gn_silu(self.norm1, x))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(gn_silu(self.norm2, h))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h

    def consume(self, box: list):
        """forward(box.pop()) for a caller that keeps no other reference to the input: with the
        fused epilogues and no autograd, fused_resnet_consuming (the input's memory reused or freed
        early; same values)."""
        if not self.fused_epilogues or torch.is_grad_enabled():
            return self(box.pop())
        t = None if self.pm_time_bias is None else self.pm_time_bias[None].expand(box[0].shape[0], -1)
        return fused_resnet_consuming(self, box, t, self.pm_out_bias)


class _Sampler(nn.Module):
    """Holds the `conv` of a diffusers Downsample2D / Upsample2D."""

    def __init__(self, w: _Weights, p: str, stride: int = 1):
        super().__init__()
        self.conv = w.conv(f"{p}.conv", stride=stride)

    def upsample(self, box: list):
        """Upsample2D: conv(nearest 2x(box.pop())); the input is freed once upsampled (the caller
        keeps no other reference to it)."""
        u = F.interpolate(box.pop(), scale_factor=2.0, mode="nearest")
        return self.conv(u)


class VaeAttention(nn.Module):
    """The VAE mid-block's single-head spatial attention (group norm, residual)."""

    def __init__(self, w: _Weights, p: str, groups: int, eps: float):
        super().__init__()
        self.group_norm = w.group_norm(f"{p}.group_norm", groups, eps)
        self.to_q, self.to_k, self.to_v = (w.linear(f"{p}.to_{n}") for n in "qkv")
        self.to_out = nn.ModuleList([w.linear(f"{p}.to_out.0")])

    def forward(self, x):
        n, c, height, width = x.shape
        h = gn_silu(self.group_norm, x, silu=False).reshape(n, c, height * width).transpose(1, 2)  # (N, HW, C)
        q, k, v = (layer(h)[:, None] for layer in (self.to_q, self.to_k, self.to_v))  # one head
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]
        return self.to_out[0](out).transpose(1, 2).reshape(n, c, height, width) + x


def vae_unsupported(cfg: dict) -> str | None:
    if cfg.get("act_fn", "silu") != "silu":
        return f"activation {cfg.get('act_fn')}"
    if any(t != "UpDecoderBlock2D" for t in cfg.get("up_block_types", ())):
        return f"up blocks {cfg.get('up_block_types')}"
    if not cfg.get("mid_block_add_attention", True):
        return "a mid block without attention"
    if cfg.get("use_quant_conv") is False or cfg.get("use_post_quant_conv", True) is False:
        return "no quant convolutions"
    return None


def _vae_weights(half: str, reason: str | None, state: dict, config: dict) -> tuple[_Weights, int, float]:
    """(the weights, GroupNorm groups, eps) of a VAE half; UserError naming what the config asks that this
    module does not compute."""
    if reason:
        raise UserError(f"VAE {half}: {reason}")
    return _Weights(state, f"VAE {half} weights"), int(config.get("norm_num_groups", 32)), 1e-6


class VAE(nn.Module):
    """The decoder half of diffusers' AutoencoderKL: decode(z) = Decoder(post_quant_conv(z))."""

    def __init__(self, state: dict, config: dict):
        super().__init__()
        w, groups, eps = _vae_weights("decoder", vae_unsupported(config), state, config)
        self.config = Config(config)
        self.post_quant_conv = w.conv("post_quant_conv")
        d = "decoder"
        self.conv_in = w.conv(f"{d}.conv_in")
        self.mid_resnets = nn.ModuleList([Resnet(w, f"{d}.mid_block.resnets.{i}", groups, eps) for i in range(2)])
        self.mid_attention = VaeAttention(w, f"{d}.mid_block.attentions.0", groups, eps)
        self.up_resnets, self.upsamplers = nn.ModuleList(), nn.ModuleList()
        for b in range(w.count(f"{d}.up_blocks")):
            p = f"{d}.up_blocks.{b}"
            self.up_resnets.append(nn.ModuleList([Resnet(w, f"{p}.resnets.{i}", groups, eps)
                                                  for i in range(w.count(f"{p}.resnets"))]))
            self.upsamplers.append(_Sampler(w, f"{p}.upsamplers.0") if w.has(f"{p}.upsamplers.0.conv.weight")
                                   else nn.Identity())
        self.conv_norm_out = w.group_norm(f"{d}.conv_norm_out", groups, eps)
        self.conv_out = w.conv(f"{d}.conv_out")
        w.check_all_used()
        self.band_rows: int | None = None  # set: the full-resolution end in row bands (vae_bands.decode)

    def forward(self, z):
        if self.band_rows:
            from .vae_bands import decode

            return decode(self, z, self.band_rows)
        return self.forward_plain(z)

    def forward_plain(self, z):
        """The decoder. Each block gets its input in a list it pops (Resnet.consume, _Sampler.upsample)
        so that no reference here keeps a dead activation alive; the output norm runs in place."""
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid_resnets[1](self.mid_attention(self.mid_resnets[0](h)))
        for resnets, up in zip(self.up_resnets, self.upsamplers):
            for r in resnets:
                box = [h]
                del h
                h = r.consume(box)
            if isinstance(up, _Sampler):
                box = [h]
                del h
                h = up.upsample(box)
        in_place = None if torch.is_grad_enabled() else h
        return self.conv_out(gn_silu(self.conv_norm_out, h, out=in_place))

    def decode(self, z, return_dict: bool = False):
        """diffusers' AutoencoderKL.decode signature: a 1-tuple (image,)."""
        return (self(z),)


def vae_encoder_unsupported(cfg: dict) -> str | None:
    if any(t != "DownEncoderBlock2D" for t in cfg.get("down_block_types", ())):
        return f"down blocks {cfg.get('down_block_types')}"
    if cfg.get("double_z", True) is False:
        return "an encoder without double_z"
    return vae_unsupported({**cfg, "up_block_types": ()})


class VAEEncoder(nn.Module):
    """The encoder half of diffusers' AutoencoderKL: moments = quant_conv(Encoder(x)), (N, 2C, h, w)
    (mean, then log-variance). Holds `encoder` and `quant_conv` under the AutoencoderKL's names."""

    def __init__(self, state: dict, config: dict):
        super().__init__()
        w, groups, eps = _vae_weights("encoder", vae_encoder_unsupported(config), state, config)
        self.config = Config(config)
        self.encoder = _Encoder(w, "encoder", groups, eps)
        self.quant_conv = w.conv("quant_conv")
        w.check_all_used()

    def forward(self, x):
        return self.quant_conv(self.encoder(x))


class _Encoder(nn.Module):
    """diffusers' Encoder: conv_in, DownEncoderBlock2Ds (ResNets, then a stride-2 convolution of the
    input padded by one row and column at the bottom and right), the mid block (ResNet, attention,
    ResNet), GroupNorm + SiLU, conv_out."""

    def __init__(self, w: _Weights, p: str, groups: int, eps: float):
        super().__init__()
        self.conv_in = w.conv(f"{p}.conv_in")
        self.down_resnets, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        for b in range(w.count(f"{p}.down_blocks")):
            q = f"{p}.down_blocks.{b}"
            self.down_resnets.append(nn.ModuleList([Resnet(w, f"{q}.resnets.{i}", groups, eps)
                                                    for i in range(w.count(f"{q}.resnets"))]))
            down = f"{q}.downsamplers.0.conv"
            self.downsamplers.append(w.conv(down, stride=2, padding=0) if w.has(f"{down}.weight") else None)
        self.mid_resnets = nn.ModuleList([Resnet(w, f"{p}.mid_block.resnets.{i}", groups, eps) for i in range(2)])
        self.mid_attention = VaeAttention(w, f"{p}.mid_block.attentions.0", groups, eps)
        self.conv_norm_out = w.group_norm(f"{p}.conv_norm_out", groups, eps)
        self.conv_out = w.conv(f"{p}.conv_out")

    def forward(self, x):
        h = self.conv_in(x)
        for resnets, down in zip(self.down_resnets, self.downsamplers):
            for r in resnets:
                h = r(h)
            if down is not None:
                h = down(F.pad(h, (0, 1, 0, 1)))
        h = self.mid_resnets[1](self.mid_attention(self.mid_resnets[0](h)))
        return self.conv_out(gn_silu(self.conv_norm_out, h))


# ---------------------------------------------------------------------------------------- UNet
# Beyond FastUNet's own config check (fast_unet.config_unsupported): keys whose value must be the
# default of diffusers' UNet2DConditionModel (or absent) for this tree to have SD 1.x/2.x's structure
# (FastUNet on diffusers' UNet does not need these: there the module itself carries the structure).
UNET_DEFAULTS = {"flip_sin_to_cos": True, "freq_shift": 0, "only_cross_attention": False,
                 "dual_cross_attention": False, "num_class_embeds": None, "resnet_skip_time_act": False,
                 "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
                 "conv_in_kernel": 3, "encoder_hid_dim_type": None, "num_attention_heads": None,
                 "attention_type": "default", "cross_attention_norm": None, "mid_block_only_cross_attention": None,
                 "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
                 "class_embeddings_concat": False, "reverse_transformer_layers_per_block": None,
                 "mid_block_scale_factor": 1}


def unet_unsupported(cfg: dict) -> str | None:
    """None when UNet (+ FastUNet) computes what diffusers' UNet2DConditionModel does with `cfg`."""
    reason = config_unsupported(cfg)
    if reason:
        return reason
    for key, default in UNET_DEFAULTS.items():
        if cfg.get(key, default) != default:
            return f"{key}={cfg.get(key)!r}"
    return None


class Timesteps(nn.Module):
    """diffusers' sinusoidal timestep projection (get_timestep_embedding, max period 10000)."""

    def __init__(self, channels: int, flip_sin_to_cos: bool, shift: float):
        super().__init__()
        self.channels, self.flip, self.shift = channels, flip_sin_to_cos, shift

    def forward(self, t):
        half = self.channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - self.shift)
        emb = t[:, None].float() * torch.exp(exponent)[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        if self.flip:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        if self.channels % 2:
            emb = F.pad(emb, (0, 1))
        return emb


class _TimeEmbedding(nn.Module):
    def __init__(self, w: _Weights):
        super().__init__()
        self.linear_1, self.linear_2 = w.linear("time_embedding.linear_1"), w.linear("time_embedding.linear_2")

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class UNetAttention(nn.Module):
    """Parameters of a diffusers Attention layer (to_q, to_k, to_v without bias, to_out[0]) plus
    heads and scale."""

    def __init__(self, w: _Weights, p: str, heads: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (w.linear(f"{p}.to_{n}", bias=False) for n in "qkv")
        self.to_out = nn.ModuleList([w.linear(f"{p}.to_out.0")])
        inner = self.to_q.weight.shape[0]
        if inner % heads:
            raise UserError(f"{w.name}: {p} width {inner} is not a multiple of {heads} heads")
        self.heads, self.scale = heads, (inner // heads) ** -0.5


class TransformerBlock(nn.Module):
    """BasicTransformerBlock: LayerNorms, self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, w: _Weights, p: str, heads: int):
        super().__init__()
        self.norm1, self.attn1 = w.layer_norm(f"{p}.norm1", 1e-5), UNetAttention(w, f"{p}.attn1", heads)
        self.norm2, self.attn2 = w.layer_norm(f"{p}.norm2", 1e-5), UNetAttention(w, f"{p}.attn2", heads)
        self.norm3 = w.layer_norm(f"{p}.norm3", 1e-5)
        geglu = nn.Module()
        geglu.proj = w.linear(f"{p}.ff.net.0.proj")
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([geglu, nn.Identity(), w.linear(f"{p}.ff.net.2")])  # diffusers' indices


class Transformer2D(nn.Module):
    def __init__(self, w: _Weights, p: str, heads: int, groups: int):
        super().__init__()
        self.norm = w.group_norm(f"{p}.norm", groups, 1e-6)
        # SD 1.x: 1x1 convolutions; SD 2.x (use_linear_projection): linear layers
        make = w.conv if w.tensor(f"{p}.proj_in.weight").ndim == 4 else w.linear
        self.proj_in = make(f"{p}.proj_in")
        self.transformer_blocks = nn.ModuleList([TransformerBlock(w, f"{p}.transformer_blocks.{i}", heads)
                                                 for i in range(w.count(f"{p}.transformer_blocks"))])
        self.proj_out = make(f"{p}.proj_out")


class _Block(nn.Module):
    """A down, mid or up block: resnets, attentions (or None), down/up samplers (or None)."""

    def __init__(self, w: _Weights, p: str, heads: int, groups: int, eps: float, sampler: str | None = None):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet(w, f"{p}.resnets.{i}", groups, eps)
                                      for i in range(w.count(f"{p}.resnets"))])
        n_attn = w.count(f"{p}.attentions")
        self.attentions = (nn.ModuleList([Transformer2D(w, f"{p}.attentions.{i}", heads, groups)
                                          for i in range(n_attn)]) if n_attn else None)
        samplers = None
        if sampler and w.has(f"{p}.{sampler}.0.conv.weight"):
            samplers = nn.ModuleList([_Sampler(w, f"{p}.{sampler}.0", stride=2 if sampler == "downsamplers" else 1)])
        setattr(self, sampler or "samplers", samplers)


class UNet(nn.Module):
    """diffusers' UNet2DConditionModel's parameter tree for SD 1.x/2.x, under the names FastUNet
    reads; FastUNet(UNet(state, config)) is the network (no forward here)."""

    def __init__(self, state: dict, config: dict):
        super().__init__()
        reason = unet_unsupported(config)
        if reason:
            raise UserError(f"UNet: {reason}")
        self.config = Config(config)
        w = _Weights(state, "UNet weights")
        groups, eps = int(config.get("norm_num_groups", 32)), float(config.get("norm_eps", 1e-5))
        blocks = len(config["down_block_types"])
        heads = config.get("attention_head_dim", 8)  # diffusers: the number of heads (its legacy naming)
        heads = [int(heads)] * blocks if isinstance(heads, (int, float)) else [int(h) for h in heads]
        channels = config["block_out_channels"]
        self.time_proj = Timesteps(int(channels[0]), bool(config.get("flip_sin_to_cos", True)),
                                   float(config.get("freq_shift", 0)))
        self.time_embedding = _TimeEmbedding(w)
        self.conv_in = w.conv("conv_in")
        self.down_blocks = nn.ModuleList([_Block(w, f"down_blocks.{i}", heads[i], groups, eps, "downsamplers")
                                          for i in range(w.count("down_blocks"))])
        self.mid_block = _Block(w, "mid_block", heads[-1], groups, eps)
        up_heads = heads[::-1]
        self.up_blocks = nn.ModuleList([_Block(w, f"up_blocks.{i}", up_heads[i], groups, eps, "upsamplers")
                                        for i in range(w.count("up_blocks"))])
        self.conv_norm_out = w.group_norm("conv_norm_out", groups, eps)
        self.conv_out = w.conv("conv_out")
        w.check_all_used()
        kinds = [("CrossAttn" if b.attentions is not None else "") + "DownBlock2D" for b in self.down_blocks]
        if kinds != list(config["down_block_types"]) or self.mid_block.attentions is None:
            raise UserError(f"UNet weights do not match the config's blocks {config['down_block_types']}")


# ---------------------------------------------------------------------------------------- entry
def unsupported(net: str, config: dict) -> str | None:
    """Why the standalone module of `net` cannot stand in for the Hugging Face class (None: it can)."""
    if net == UNET:
        return unet_unsupported(config)
    if net == VAE_DECODER:
        return vae_unsupported(config)
    if net == VAE_ENCODER:
        return vae_encoder_unsupported(config)
    if net == TEXT_ENCODER:
        return _clip_unsupported(config)
    if net == SAFETY_CHECKER:
        return _clip_unsupported(config.get("vision_config", {}))
    return f"no standalone module for {net}"


def build(net: str, state: dict, config: dict) -> nn.Module:
    cls = {UNET: UNet, VAE_DECODER: VAE, VAE_ENCODER: VAEEncoder, TEXT_ENCODER: CLIPText,
           SAFETY_CHECKER: SafetyChecker}[net]
    return cls(state, config).requires_grad_(False).eval()
