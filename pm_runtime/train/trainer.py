"""The PersonaMagic trainer (DESIGN §1). Only the mapper trains; everything else is frozen.

Per optimiser step, `grad_accum` micro-steps each draw an explicit Batch (images, captions,
open prompts, t, noise, latent sample, bypass coin) from the trainer's own generators, so a
fixed Batch can be re-evaluated and a resumed run continues bit-exactly.
Unlike the published code, the VAE encoder and the CLIP image encoder run once per image
(the posterior's mean/std and e_img are cached), batch size > 1 works, and resume works.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import formats as F
from ..errors import UserError
from ..modeling.attention import install_split_kv, join_contexts
from ..modeling.image_embed import image_embeddings
from ..modeling.loading import (BaseModel, check_sd_layout, Placeholders, add_placeholder_tokens, find_image_encoder,
                                load_base_model, load_image_encoder, quiet_hf)
from ..modeling.mapper import Mapper, MapperConfig
from ..modeling.text_encoder import EquilibriumTextEncoder, scatter_concept
from ..prompt_encoding import check_concept_word
from ..prompts import placeholder_text
from . import data
from .loss import masked_mse, prompt_lengths, tandem_equilibrium
from .templates import IMAGENET_TEMPLATES_SMALL, SCENE_TEMPLATES

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    model: str
    images: str
    out: str
    image_encoder: str | None = None
    super_class: str = "face"
    concept_word: str = "<persona>"
    num_tokens: int = 4
    stage: tuple[int, int] = (400, 800)
    num_anchors: int = 200
    steps: int = 1000
    lr: float = 5e-5  # scaled by grad_accum * batch_size (the published rule): effective 1e-4
    grad_accum: int = 2
    batch_size: int = 1
    resolution: int = 512
    center_crop: bool = False
    mask_dir: str | None = None
    clipseg: str | None = None
    reference_image: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    cuda_graph: bool = False
    channels_last: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 0
    preview_every: int = 0
    te_weight: float = 1e-3  # lambda of the Tandem Equilibrium term
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8

    @property
    def effective_lr(self) -> float:
        return self.lr * self.grad_accum * self.batch_size


_PATHS = {"model", "images", "out", "image_encoder", "mask_dir", "clipseg", "reference_image"}


def check_config_types(cfg: TrainConfig) -> None:
    """UserError naming the option unless every field has its annotated type (the Python API gets no
    click conversion: resolution="64" was a string-formatting TypeError, steps=2.5 and stage=(400.5, 800)
    were taken). Paths may be str or os.PathLike; numpy numbers pass; bool is not a number."""
    def kind_ok(kind: str, name: str, v) -> bool:
        if kind == "int":
            return not isinstance(v, bool) and hasattr(v, "__index__")
        if kind == "float":
            return not isinstance(v, bool) and isinstance(v, numbers.Real)
        if kind == "bool":
            return isinstance(v, (bool, np.bool_))
        return isinstance(v, (str, os.PathLike)) if name in _PATHS else isinstance(v, str)

    for f in fields(cfg):
        v, kind = getattr(cfg, f.name), str(f.type)
        if kind.endswith(" | None"):
            if v is None:
                continue
            kind = kind[:-len(" | None")]
        if kind.startswith("tuple["):
            parts = kind[len("tuple["):-1].split(", ")
            ok = isinstance(v, (tuple, list)) and len(v) == len(parts) and all(
                kind_ok(k, f.name, x) for k, x in zip(parts, v))
            want = f"{len(parts)} " + ("whole numbers" if parts[0] == "int" else "numbers")
        else:
            ok = kind_ok(kind, f.name, v)
            want = {"int": "a whole number", "float": "a number", "bool": "True or False"}.get(
                kind, "a path" if f.name in _PATHS else "a string")
        if not ok:
            raise UserError(f"--{f.name.replace('_', '-')} must be {want}, got {v!r}")


@dataclass
class Batch:
    """Every random draw of one micro-step, explicit."""

    image_idx: torch.Tensor  # (N,) long
    caption_idx: torch.Tensor  # (N,) long, into IMAGENET_TEMPLATES_SMALL
    open_idx: torch.Tensor  # (N,) long, into SCENE_TEMPLATES
    t: torch.Tensor  # (N,) long in [lo, hi)
    noise: torch.Tensor  # (N, 4, h, w)
    latent_eps: torch.Tensor  # (N, 4, h, w): posterior sample = mean + std * eps
    keep_bypass: bool  # the one bypass coin of this micro-step


@dataclass
class DataOrder:
    """Epoch-wise shuffled image order (like a shuffled DataLoader), with a saveable state."""

    rng: np.random.Generator
    n: int
    perm: list[int] = field(default_factory=list)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.perm:
                self.perm = self.rng.permutation(self.n).tolist()
            out.append(self.perm.pop(0))
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: TrainConfig, warn: Callable[[str], None] = print):
        self.cfg, self.warn = cfg, warn
        check_config_types(cfg)
        check_concept_word(cfg.concept_word)
        lo, hi = cfg.stage
        if not (0 <= lo < hi <= 1000):
            raise UserError(f"--stage must satisfy 0 <= LO < HI <= 1000, got {lo} {hi}")
        if cfg.resolution % 8 or cfg.resolution < 64:
            raise UserError(f"--resolution must be a multiple of 8 and >= 64, got {cfg.resolution}")
        for name, least in (("steps", 1), ("grad_accum", 1), ("batch_size", 1), ("seed", 0), ("save_every", 0),
                            ("preview_every", 0)):
            if getattr(cfg, name) < least:
                raise UserError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(cfg, name)}")
        if not (np.isfinite(cfg.lr) and cfg.lr > 0):
            raise UserError(f"--lr must be a positive number, got {cfg.lr}")
        if cfg.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")
        self.device = resolve_device(cfg.device)
        if cfg.cuda_graph and self.device.type != "cuda":
            raise UserError("--cuda-graph needs a CUDA device")
        if cfg.cuda_graph and cfg.gradient_checkpointing:
            raise UserError("--cuda-graph and --gradient-checkpointing cannot be combined")
        self.dtype = PRECISIONS[cfg.precision]
        if self.device.type == "cuda":  # fp32 means fp32: no TF32 (published setting)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cudnn.benchmark = True  # shapes are fixed for the whole run
        self._prepare()

    # ---------------------------------------------------------------- setup
    def _prepare(self) -> None:
        cfg, dev = self.cfg, self.device
        check_sd_layout(Path(cfg.model))  # the model folder first: its error is the most basic
        enc_dir = find_image_encoder(Path(cfg.model), Path(cfg.image_encoder) if cfg.image_encoder else None)
        images = data.load_images(Path(cfg.images), cfg.resolution, cfg.center_crop, self.warn)
        base = load_base_model(Path(cfg.model), device=dev)
        self.base: BaseModel = base
        self.placeholders: Placeholders = add_placeholder_tokens(base, cfg.super_class, cfg.num_tokens)
        self.latent_size = cfg.resolution // 8
        self.image_names = [im.name for im in images]
        self.image_hashes = [im.sha256 for im in images]
        pixels = torch.from_numpy(data.to_unit_range(np.stack([im.pixels for im in images])))  # (n, 3, R, R)

        # e_img per image and for the reference photo, then the image encoder is freed.
        encoder = load_image_encoder(enc_dir, dev)
        self.image_embeds = torch.cat([image_embeddings(encoder, pixels[i:i + 8]) for i in range(0, len(images), 8)])
        self.reference = self._reference(encoder, images)
        del encoder

        # VAE posterior mean/std per image, cached once; a fresh sample is drawn every step.
        with torch.no_grad():
            means, stds = [], []
            for i in range(len(images)):
                post = base.vae.encode(pixels[i:i + 1].to(dev)).latent_dist
                means.append(post.mean.float())
                stds.append(post.std.float())
        self.post_mean, self.post_std = torch.cat(means), torch.cat(stds)  # (n, 4, h, w)
        self.scaling = float(base.vae.config.scaling_factor)
        if cfg.preview_every <= 0:
            base.vae = None  # not needed any more
        self.masks = torch.from_numpy(np.stack(self._masks(images))).to(dev)  # (n, 1, h, w)

        # Frozen networks in the training precision; split K/V cross-attention in the UNet.
        install_split_kv(base.unet)
        with quiet_hf():  # diffusers warns about casting with .to(dtype); nothing here must stay fp32
            base.unet.to(dtype=self.dtype)
            base.text_encoder.to(dtype=self.dtype)
        if cfg.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        base.unet.to(memory_format=self.memory_format)
        self.text = EquilibriumTextEncoder(base.text_encoder)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        self.captions = self._tokenize([t.format(placeholder_text(self.placeholders.tokens))
                                        for t in IMAGENET_TEMPLATES_SMALL])
        self.open_prompts = self._tokenize([t.format(placeholder_text(self.placeholders.tokens))
                                            for t in SCENE_TEMPLATES])
        self.eos_id = int(base.tokenizer.eos_token_id)
        self._check_open_prompts()

        e_super = base.text_encoder.get_input_embeddings().weight[self.placeholders.super_id].detach().float().cpu()
        self.mapper_config = MapperConfig(cfg.num_tokens, base.text_dim, self.image_embeds.shape[1],
                                          cfg.num_anchors, cfg.stage[0], cfg.stage[1])
        torch.manual_seed(cfg.seed)  # mapper init
        self.mapper = Mapper(self.mapper_config, e_super).to(dev).train()
        self.optimizer = torch.optim.AdamW(self.mapper.parameters(), lr=cfg.effective_lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay, eps=cfg.eps)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=cfg.precision == "fp16")
        self.gen = torch.Generator().manual_seed(cfg.seed)  # t, noise, latent samples, bypass coin
        self.order = DataOrder(np.random.default_rng(cfg.seed), len(images))
        self.frozen_loss = self._frozen_loss
        if cfg.cuda_graph:
            self._capture()
        self.step = 0
        self.loss_history: list[float] = []
        self.elapsed = 0.0

    def _reference(self, encoder, images) -> dict:
        """The photo baked into tables: a training image (by file name or same content) or another photo."""
        cfg = self.cfg
        pick = 0 if cfg.reference_image is None else None
        if pick is None:
            path = Path(cfg.reference_image)
            if path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                pick = next((i for i, im in enumerate(images) if im.sha256 == digest), None)
            else:
                pick = next((i for i, im in enumerate(images) if im.name == path.name), None)
                if pick is None:
                    raise UserError(f"--reference-image not found: {path} (neither a file nor a training image name)")
        if pick is not None:
            im = images[pick]
            return {"name": im.name, "sha256": im.sha256, "embedding": self.image_embeds[pick].cpu()}
        [ref] = data.load_images(path, cfg.resolution, cfg.center_crop, self.warn)
        px = torch.from_numpy(data.to_unit_range(ref.pixels[None]))
        return {"name": ref.name, "sha256": ref.sha256, "embedding": image_embeddings(encoder, px)[0].cpu()}

    def _masks(self, images) -> list[np.ndarray]:
        cfg = self.cfg
        if cfg.clipseg:
            from .clipseg import clipseg_masks, load_clipseg

            try:
                model, tok = load_clipseg(cfg.clipseg, self.device)
            except ValueError as e:
                raise UserError(str(e)) from e
            made = clipseg_masks(model, tok, [im.source for im in images], cfg.super_class, self.device)
            del model
            from PIL import Image

            masks = [data.mask_to_latent(Image.fromarray(m), self.latent_size) for m in made]
        else:
            mask_dir = cfg.mask_dir
            if mask_dir is not None and not Path(mask_dir).is_dir():
                raise UserError(f"--mask-dir not found: {mask_dir}")
            if mask_dir is None:
                default = Path(cfg.images) / "mask"
                mask_dir = default if default.is_dir() else None
            if mask_dir is None:
                self.warn("no masks (no --mask-dir, no <images>/mask/, no --clipseg): the whole image counts")
            masks = data.load_masks(images, Path(mask_dir) if mask_dir else None, self.latent_size, self.warn)
        for name, m in zip(self.image_names, masks):
            if not m.any():
                raise UserError(f"the mask for {name} is empty (all zero): nothing of that image would count")
        return masks

    def _check_open_prompts(self) -> None:
        """Every scene prompt must keep a placeholder and a real word within 77 tokens (checked once)."""
        ids = self.open_prompts
        m = torch.isin(ids, torch.tensor(self.placeholders.ids, device=ids.device))
        probs = torch.full((ids.shape[0], 1, ids.shape[1], ids.shape[1]), 1.0 / ids.shape[1], device=ids.device)
        try:
            tandem_equilibrium(probs, m, prompt_lengths(ids, self.eos_id), check=True)
        except ValueError as e:
            raise UserError(f"the open scene prompts do not fit this tokenizer: {e}") from e

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        tok = self.base.tokenizer
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return ids.to(self.device)

    # ---------------------------------------------------------------- one step
    def draw_batch(self) -> Batch:
        cfg, n, g = self.cfg, self.cfg.batch_size, self.gen
        idx = torch.tensor(self.order.take(n))
        cap = torch.from_numpy(self.order.rng.integers(0, len(IMAGENET_TEMPLATES_SMALL), n))
        opn = torch.from_numpy(self.order.rng.integers(0, len(SCENE_TEMPLATES), n))
        t = torch.randint(cfg.stage[0], cfg.stage[1], (n,), generator=g)
        shape = (n, *self.post_mean.shape[1:])
        noise = torch.randn(shape, generator=g)
        eps = torch.randn(shape, generator=g)
        keep = bool(torch.rand((), generator=g) >= 0.5)
        return Batch(idx, cap, opn, t, noise, eps, keep)

    def compute_loss(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, reconstruction term, a) for one explicit batch."""
        dev = self.device
        idx = b.image_idx.to(dev)
        t = b.t.to(dev)
        E, B = self.mapper(t.float(), self.image_embeds[idx])  # (N, K, D) each, fp32
        # The coin multiplies the bypass by 0 (as the published in-place zeroing does): the bypass
        # head then gets zero gradients, not none, so AdamW's moments and weight decay still run.
        keep = torch.full((1,), float(b.keep_bypass), device=dev)
        latents = (self.post_mean[idx] + self.post_std[idx] * b.latent_eps.to(dev)) * self.scaling
        noise = b.noise.to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.base.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        out = self.frozen_loss(E, B, keep, self.open_prompts[b.open_idx.to(dev)],
                               self.captions[b.caption_idx.to(dev)], noisy, t, target, self.masks[idx])
        return out[0], out[1][0], out[1][1]

    def _frozen_loss(self, E, B, keep, open_ids, ids, noisy, t, target, mask):
        """Everything after the mapper: text encoder twice, UNet, both loss terms.

        E, B (N, K, D) fp32 (need grad); keep (1,); open_ids, ids (N, L) long; noisy, target
        (N, 4, h, w) fp32; t (N,) long; mask (N, 1, h, w). Returns (loss, [rec, a] detached).
        Free of host syncs and data-dependent shapes, so it can be captured in a CUDA graph.
        """
        pids = list(self.placeholders.ids)
        B = B * keep
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                            cache_enabled=False):
            ce, _, m = scatter_concept(open_ids, pids, E, B)
            _, _, probs = self.text(open_ids, ce, None, m, return_last_attention=True)
            a, bb = tandem_equilibrium(probs.float(), m, prompt_lengths(open_ids, self.eos_id), check=False)
            ce, bp, m = scatter_concept(ids, pids, E, B)
            c_k, c_v = self.text(ids, ce, bp, m)
            ctx = join_contexts(c_k, c_v).to(self.dtype)
            pred = self.base.unet(noisy.to(self.dtype, memory_format=self.memory_format), t, ctx).sample
        rec = masked_mse(pred, target, mask).mean()
        return rec - self.cfg.te_weight * a * bb, torch.stack([rec, a]).detach()

    def _capture(self) -> None:
        """Capture _frozen_loss forward and backward in CUDA graphs (static shapes, fixed per run)."""
        n, dev, D = self.cfg.batch_size, self.device, self.base.text_dim
        K, L = self.cfg.num_tokens, self.captions.shape[1]
        lat = (n, *self.post_mean.shape[1:])
        args = (torch.randn(n, K, D, device=dev, requires_grad=True),
                torch.randn(n, K, D, device=dev, requires_grad=True),
                torch.ones(1, device=dev), self.open_prompts[:1].expand(n, L).clone(),
                self.captions[:1].expand(n, L).clone(), torch.randn(lat, device=dev),
                torch.full((n,), self.cfg.stage[0], dtype=torch.long, device=dev), torch.randn(lat, device=dev),
                torch.ones(n, 1, *lat[2:], device=dev))
        self.frozen_loss = torch.cuda.make_graphed_callables(self._frozen_loss, args, num_warmup_iters=3)

    def optimizer_step(self) -> float:
        """grad_accum micro-steps, then one AdamW step. Returns the mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)  # summed on the device: one host sync per step
        for _ in range(self.cfg.grad_accum):
            loss, _, _ = self.compute_loss(self.draw_batch())
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
            total += loss.detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        mean = float(total) / self.cfg.grad_accum
        if not np.isfinite(mean):
            raise UserError(f"the loss became {mean} at step {self.step}; try --precision fp32 or bf16")
        self.loss_history.append(mean)
        return mean

    # ---------------------------------------------------------------- state
    def train_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_generator": self.gen.get_state(),
            "torch_global": torch.get_rng_state(),
            "python_random": random.getstate(),
            "numpy_global": _numpy_state_to_plain(np.random.get_state(legacy=False)),
            "data_order": {"rng": self.order.rng.bit_generator.state, "perm": list(self.order.perm)},
            "loss_history": list(self.loss_history),
            "elapsed_s": self.elapsed,
        }

    def load_train_state(self, d: dict) -> None:
        if d.get(F.K_FINGERPRINT) != self.base.fingerprint:
            raise UserError("--resume: that checkpoint was trained on a different base model")
        st = d.get(F.K_TRAIN_STATE)
        if not st:
            raise UserError("--resume: that concept file holds no training state")
        saved = d[F.K_TRAINING]["settings"]
        for key in ("batch_size", "grad_accum", "resolution", "num_tokens", "stage", "seed", "center_crop",
                    "super_class", "lr", "precision", "num_anchors"):
            now = asdict(self.cfg)[key]
            if (list(now) if isinstance(now, tuple) else now) != (list(saved[key]) if isinstance(saved[key], (tuple, list)) else saved[key]):
                raise UserError(f"--resume: the checkpoint used {key}={saved[key]}, this run {now}; they must match")
        if [i["sha256"] for i in d[F.K_IMAGES]] != self.image_hashes:
            raise UserError("--resume: the training images differ from the checkpoint's")
        self.mapper.load_state_dict(d[F.K_MAPPER_STATE])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.gen.set_state(st["torch_generator"])
        torch.set_rng_state(st["torch_global"])
        random.setstate(st["python_random"])
        np.random.set_state(_numpy_state_from_plain(st["numpy_global"]))
        self.order.rng.bit_generator.state = st["data_order"]["rng"]
        self.order.perm = list(st["data_order"]["perm"])
        self.step = int(st["step"])
        self.loss_history = list(st["loss_history"])
        self.elapsed = float(st["elapsed_s"])

    def concept_dict(self, with_train_state: bool) -> dict:
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.cfg).items()}
        d = {
            F.K_FORMAT: F.CONCEPT_FORMAT,
            F.K_VERSION: F.CONCEPT_VERSION,
            F.K_MAPPER_STATE: {k: v.detach().cpu().clone() for k, v in self.mapper.state_dict().items()},
            F.K_MAPPER_CONFIG: self.mapper_config.to_dict(),
            F.K_TOKENS: {"concept_word": self.cfg.concept_word, "super_class": self.cfg.super_class,
                         "super_class_id": self.placeholders.super_id,
                         "placeholder_tokens": list(self.placeholders.tokens)},
            F.K_SUPER_EMBEDDING: self.mapper.super_embedding.detach().cpu().clone(),
            F.K_IMAGES: [{"name": n, "sha256": h, "embedding": e.detach().cpu().clone()}
                         for n, h, e in zip(self.image_names, self.image_hashes, self.image_embeds)],
            F.K_REFERENCE: dict(self.reference),
            F.K_FINGERPRINT: self.base.fingerprint,
            F.K_BASE_MODEL: {"prediction_type": self.base.prediction_type, "text_dim": self.base.text_dim,
                             "model_dir": str(self.base.model_dir)},
            F.K_TRAINING: {"settings": settings, "effective_lr": self.cfg.effective_lr, "steps_done": self.step,
                           "final_loss": self.loss_history[-1] if self.loss_history else None,
                           "loss_history": list(self.loss_history), "time_s": self.elapsed},
        }
        if with_train_state:
            d[F.K_TRAIN_STATE] = self.train_state()
        return d


def _numpy_state_to_plain(state: dict) -> dict:
    """numpy's legacy MT19937 state holds an ndarray, which weights_only loading refuses: use a list."""
    inner = dict(state["state"])
    inner["key"] = [int(x) for x in inner["key"]]
    return {**state, "state": inner}


def _numpy_state_from_plain(state: dict) -> dict:
    inner = dict(state["state"])
    inner["key"] = np.asarray(inner["key"], dtype=np.uint32)
    return {**state, "state": inner}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    from ..resources import peak_rss_bytes

    return peak_rss_bytes() or 0
