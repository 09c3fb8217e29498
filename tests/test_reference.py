"""The PyTorch reference generator."""

import numpy as np
import pytest
import torch

from pm_runtime import noise
from pm_runtime.errors import UserError
from pm_runtime.train.reference import load_reference
from pm_runtime.train.templates import NEGATIVE_PROMPT


def test_plain_prompt_matches_diffusers_pipeline(tiny_model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    lat = noise.initial_latents(233, (1, 4, 8, 8))
    ref = load_reference(tiny_model, None)
    ours = ref.generate("a photo of a face on a beach", latents=lat, steps=12, height=64, width=64,
                        allow_no_concept=True, output="latents")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo of a face on a beach", negative_prompt=NEGATIVE_PROMPT, num_inference_steps=12,
                  guidance_scale=8.0, latents=torch.from_numpy(lat), height=64, width=64,
                  output_type="latent").images
    assert np.abs(ours - theirs.numpy()).max() <= 1e-5


def test_concept_image(tiny_model, trained_concept):
    ref = load_reference(tiny_model, trained_concept)
    img = ref.generate("a photo of <persona> as a knight", seed=233, steps=8, height=64, width=64)
    assert img.shape == (1, 64, 64, 3) and img.dtype == np.uint8
    again = ref.generate("a photo of <persona> as a knight", seed=233, steps=8, height=64, width=64)
    assert np.array_equal(img, again)
    other = ref.generate("a photo of <persona> as a knight", seed=234, steps=8, height=64, width=64)
    assert not np.array_equal(img, other)
    # the concept matters: the super-class prompt alone gives another image
    plain = ref.generate("a photo of face as a knight", seed=233, steps=8, height=64, width=64,
                         allow_no_concept=True)
    assert not np.array_equal(img, plain)
    with pytest.raises(UserError, match="concept word"):
        ref.generate("a photo of a knight", seed=1, steps=2, height=64, width=64)


def test_concept_contexts_use_the_mapper_at_rounded_t(tiny_model, trained_concept):
    from pm_runtime.stages import Context, SUPER_CLASS

    ref = load_reference(tiny_model, trained_concept)
    ctx, (neg_k, neg_v) = ref.encode("a photo of <persona>", [SUPER_CLASS, Context(500), Context(700)],
                                     NEGATIVE_PROMPT)
    assert torch.equal(neg_k, neg_v) and torch.equal(*ctx[SUPER_CLASS])
    k5, v5 = ctx[Context(500)]
    assert not torch.equal(k5, v5) and not torch.equal(k5, ctx[Context(700)][0])
    # one batched call equals a call per context
    alone, _ = ref.encode("a photo of <persona>", [Context(700)], NEGATIVE_PROMPT)
    assert torch.allclose(alone[Context(700)][0], ctx[Context(700)][0], atol=1e-6)


def test_fingerprint_mismatch_refused(tmp_path, trained_concept):
    from pm_runtime.train.tiny_model import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=5)
    with pytest.raises(UserError, match="different base model"):
        load_reference(other, trained_concept)
