"""The PyTorch reference generator: ground truth for every exported part and backend.

model folder + concept.pt + prompt + initial latents (or a seed through pm_runtime.noise)
-> image, with stage-regulated contexts (DESIGN §1): super-class stage, concept stage (mapper
at round(t), the concept's reference photo), late stage (policy; published: reuse). All
distinct contexts and the negative prompt come from ONE batched text-encoder call; each step
is one UNet call on [uncond; cond] (classifier-free guidance), diffusers' schedulers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import noise as pm_noise
from .. import schedulers
from ..errors import UserError
from ..modeling.attention import install_split_kv, join_contexts
from ..modeling.loading import BaseModel, Placeholders, add_placeholder_tokens, load_base_model, quiet_hf
from ..modeling.text_encoder import EquilibriumTextEncoder, scatter_concept
from ..prompts import check_concept_prompt, concept_prompt, super_class_prompt
from ..stages import LATE_REUSE, SUPER_CLASS, Context, distinct_contexts, stage_plan
from .concept_file import Concept, load_concept
from .templates import NEGATIVE_PROMPT

def make_scheduler(name: str, config: dict, steps: int | None = None, device=None):
    """The diffusers scheduler that pm_runtime.schedulers' `name` reproduces, from the model's config
    (with what the name fixes: "dpmpp-2m-karras" is DPMSolverMultistepScheduler with Karras sigmas), its
    timesteps set for `steps` if given. AUTOMATIC1111's schedule types ("dpmpp-2m-sgm-uniform", "euler-a-karras"),
    which diffusers lacks, need `steps`: once diffusers has set its timesteps, its noise levels are replaced by
    theirs (schedulers.common.schedule_levels, on diffusers' own sigma table; the last one kept: 0, or
    sigma_min where the config or KL-optimal says so) and its timesteps by those levels' fractional training
    timesteps (diffusers' _sigma_to_t), as k-diffusion (A1111) gives them. That is what diffusers' Euler does
    with Karras levels; its DPM-Solver would cast them to int64 and its step reads none of them; its Euler
    ancestral has no level options at all."""
    import diffusers

    try:
        s = schedulers.get_scheduler(name)
    except ValueError as e:
        raise UserError(str(e)) from None
    config = s.config(config)
    kind = config.get(schedulers.common.SCHEDULE_KEY)
    if kind is None:
        sched = getattr(diffusers, s.diffusers_class).from_config(config)
        if steps is not None:
            sched.set_timesteps(steps, device=device)
        return sched
    if steps is None:
        raise ValueError(f"scheduler {name!r}: give the number of steps (its levels are set here)")
    sched = getattr(diffusers, s.diffusers_class).from_config(config)
    sched.set_timesteps(steps, device=device)
    table = (((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).numpy()  # over the whole table, as A1111
    levels = schedulers.common.schedule_levels(kind, float(table[0]), float(table[-1]), steps, table)
    last = table[0] if kind == "kl-optimal" else sched.sigmas[-1].item()
    sched.sigmas = torch.from_numpy(np.append(levels, last).astype(np.float32)).to(sched.sigmas.device)
    t = diffusers.EulerDiscreteScheduler._sigma_to_t(sched, levels, np.log(table)).astype(np.float32)
    sched.timesteps = torch.from_numpy(t).to(sched.timesteps.device)
    return sched


@dataclass
class Reference:
    base: BaseModel
    placeholders: Placeholders
    concept: Concept | None
    device: torch.device
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        self.text = EquilibriumTextEncoder(self.base.text_encoder)

    @torch.no_grad()
    def encode(self, prompt: str, contexts: list[Context], negative_prompt: str,
               reference_embedding: torch.Tensor | None = None) -> tuple[dict, tuple]:
        """One batched text-encoder call -> ({Context: (C_k, C_v)}, (C_neg, C_neg)); each (1, L, D)."""
        tok, dev = self.base.tokenizer, self.device
        concept = self.concept
        texts = [negative_prompt]
        for c in contexts:
            if c.is_concept:
                texts.append(concept_prompt(prompt, concept.concept_word, self.placeholders.tokens))
            elif concept is not None:
                texts.append(super_class_prompt(prompt, concept.concept_word, concept.super_class))
            else:
                texts.append(prompt)
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(dev)  # (1 + C, L)
        n, D = ids.shape[0], self.base.text_dim
        E = torch.zeros(n, max(len(self.placeholders.ids), 1), D, device=dev)
        B = torch.zeros_like(E)
        rows = [i + 1 for i, c in enumerate(contexts) if c.is_concept]
        if rows:
            mapper = concept.mapper.to(dev)
            e_ref = (reference_embedding if reference_embedding is not None else concept.reference_embedding)
            ts = torch.tensor([float(contexts[r - 1].t) for r in rows], device=dev)
            E[rows], B[rows] = mapper(ts, e_ref.to(dev).float().expand(len(rows), -1))
        ce, bp, m = scatter_concept(ids, list(self.placeholders.ids), E, B)
        c_k, c_v = self.text(ids, ce, bp, m)
        out = {c: (c_k[i + 1:i + 2], c_v[i + 1:i + 2]) for i, c in enumerate(contexts)}
        return out, (c_k[:1], c_v[:1])

    @torch.no_grad()
    def generate(self, prompt: str, *, latents: np.ndarray | torch.Tensor | None = None, seed: int | None = None,
                 num_images: int = 1, height: int = 512, width: int = 512, steps: int = 50,
                 guidance: float = 8.0, negative_prompt: str = NEGATIVE_PROMPT, scheduler: str = "dpmpp-2m",
                 late_stage: str = LATE_REUSE, allow_no_concept: bool = False,
                 reference_embedding: torch.Tensor | None = None, output: str = "uint8"):
        """-> (N, H, W, 3) uint8 images (output="uint8") or final latents (output="latents")."""
        base, dev, dt = self.base, self.device, self.dtype
        uses_concept = self.concept is not None and check_concept_prompt(
            prompt, self.concept.concept_word, allow_no_concept)
        sched = make_scheduler(scheduler, base.scheduler_config, steps, dev)
        needs_noise = schedulers.get_scheduler(scheduler).needs_noise  # euler-a, dpmpp-2m-sde: noise per step
        if hasattr(sched, "set_begin_index"):  # step by position: looked up by value, repeated timesteps
            sched.set_begin_index(0)  # (DPM-Solver++ on truncated Beta levels) would run past the table
        timesteps = sched.timesteps
        if uses_concept:
            lo, hi = self.concept.stage
            plan = stage_plan([float(t) for t in timesteps], lo, hi, late_stage)
        else:
            plan = [SUPER_CLASS] * len(timesteps)
        ctx, neg = self.encode(prompt, distinct_contexts(plan), negative_prompt, reference_embedding)
        if latents is None:
            if seed is None:
                raise ValueError("give initial latents or a seed")
            latents = pm_noise.initial_latents(seed, (num_images, 4, height // 8, width // 8))
        x = torch.as_tensor(np.asarray(latents), dtype=torch.float32, device=dev) * sched.init_noise_sigma
        n = x.shape[0]
        gen = torch.Generator(device=dev).manual_seed(seed or 0)
        neg_ctx = join_contexts(*neg).to(dt).expand(n, -1, -1)
        for i, t in enumerate(timesteps):
            cond = join_contexts(*ctx[plan[i]]).to(dt).expand(n, -1, -1)
            x_in = sched.scale_model_input(torch.cat([x, x]), t)
            pred = base.unet(x_in.to(dt), t, torch.cat([neg_ctx, cond])).sample.float()
            uncond, text = pred.chunk(2)
            eps = uncond + guidance * (text - uncond)
            kwargs = {"generator": gen} if needs_noise else {}
            x = sched.step(eps, t, x, **kwargs).prev_sample
        if output == "latents":
            return x.cpu().numpy()
        vae_dtype = next(base.vae.parameters()).dtype  # the trainer keeps its VAE in fp32
        image = base.vae.decode((x / base.vae.config.scaling_factor).to(vae_dtype)).sample.float()
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return (image * 255).round().astype(np.uint8)


def load_reference(model_dir: Path, concept_path: Path | None, device="cpu", dtype=torch.float32) -> Reference:
    """Reference generator for a model folder and (optionally) a concept; checks the fingerprint."""
    dev = torch.device(device)
    base = load_base_model(Path(model_dir), device=dev)
    concept = load_concept(concept_path) if concept_path is not None else None
    if concept is not None and concept.fingerprint != base.fingerprint:
        raise UserError(f"{concept_path} was trained on a different base model than {model_dir}")
    if concept is None:  # plain Stable Diffusion: no placeholder tokens at all
        placeholders = Placeholders((), (), "", -1)
    else:
        placeholders = add_placeholder_tokens(base, concept.super_class, concept.num_tokens)
    return from_base(base, placeholders, concept, dev, dtype)


def from_base(base: BaseModel, placeholders: Placeholders, concept: Concept | None, device, dtype) -> Reference:
    install_split_kv(base.unet)
    with quiet_hf():
        for m in (base.unet, base.vae, base.text_encoder):
            m.to(device=device, dtype=dtype)
    return Reference(base, placeholders, concept, torch.device(device), dtype)
