import json

import numpy as np
import pytest

from pm_runtime import noise
from pm_runtime.fingerprint import fingerprint
from pm_runtime.stages import LATE_REUSE, LATE_SUPER_CLASS, SUPER_CLASS, Context, distinct_contexts, stage_plan


def _timesteps(tiny_model, cls_name, steps=50):
    import diffusers

    cfg = json.loads((tiny_model / "scheduler" / "scheduler_config.json").read_text())
    s = getattr(diffusers, cls_name).from_config(cfg)
    s.set_timesteps(steps)
    return [float(t) for t in s.timesteps]


def _split(plan, timesteps, lo=400, hi=800):
    sup = sum(1 for c, t in zip(plan, timesteps) if t > hi)
    con = sum(1 for c, t in zip(plan, timesteps) if lo <= t <= hi)
    return sup, con, len(plan) - sup - con


def test_dpm_solver_linspace_50_steps(tiny_model):
    ts = _timesteps(tiny_model, "DPMSolverMultistepScheduler")
    plan = stage_plan(ts, 400, 800)
    assert _split(plan, ts) == (10, 21, 19)
    for c, t in zip(plan, ts):
        if t > 800:
            assert c == SUPER_CLASS
        elif t >= 400:
            assert c == Context(int(np.floor(t + 0.5)))
    last_concept = [c for c, t in zip(plan, ts) if 400 <= t <= 800][-1]
    assert all(c == last_concept for c, t in zip(plan, ts) if t < 400)  # published: reuse
    assert len(distinct_contexts(plan)) == 22


def test_ddim_leading_50_steps(tiny_model):
    ts = _timesteps(tiny_model, "DDIMScheduler")
    assert ts[0] == 981 and ts[-1] == 1
    plan = stage_plan(ts, 400, 800)
    assert _split(plan, ts) == (10, 20, 20)
    assert [c.t for c, t in zip(plan, ts) if 400 <= t <= 800] == [int(t) for t in ts if 400 <= t <= 800]


def test_late_stage_super_class_policy_and_fractional_t():
    ts = [900.0, 800.0, 612.5, 400.4, 399.6, 100.0]
    plan = stage_plan(ts, 400, 800, LATE_SUPER_CLASS)
    assert plan == [SUPER_CLASS, Context(800), Context(613), Context(400), SUPER_CLASS, SUPER_CLASS]
    reuse = stage_plan(ts, 400, 800, LATE_REUSE)
    assert reuse[4:] == [Context(400), Context(400)]
    with pytest.raises(ValueError):
        stage_plan(ts, 400, 800, "later")


def test_noise_is_deterministic_and_independent():
    a = noise.initial_latents(233, (1, 4, 8, 8))
    assert a.dtype == np.float32 and np.array_equal(a, noise.initial_latents(233, (1, 4, 8, 8)))
    assert not np.array_equal(a, noise.initial_latents(234, (1, 4, 8, 8)))
    s0, s1 = noise.step_noise(233, 0, (1, 4, 8, 8)), noise.step_noise(233, 1, (1, 4, 8, 8))
    assert not np.array_equal(s0, s1) and not np.array_equal(s0, a)
    big = noise.initial_latents(7, (4, 4, 64, 64))
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02
    with pytest.raises(ValueError):
        noise.initial_latents(-1, (1,))


def test_fingerprint_covers_config_and_table():
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    te, unet = {"hidden_size": 4, "transformers_version": "5"}, {"cross_attention_dim": 4}
    fp = fingerprint(te, table, unet)
    assert fp == fingerprint({**te, "transformers_version": "6", "_name_or_path": "x"}, table.copy(), unet)
    assert fp != fingerprint({**te, "hidden_size": 5}, table, unet)
    t2 = table.copy()
    t2[1, 1] += 1e-3
    assert fp != fingerprint(te, t2, unet)
    assert fp != fingerprint(te, table, {"cross_attention_dim": 5})
