import math

import pytest
import torch

from pm_runtime.modeling.mapper import Mapper, MapperConfig, anchor_timesteps, time_encoding


def test_time_encoding_equals_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 399.6, 400.0, 555.0, 799.0, 800.0, 999.0])
    ref = get_timestep_embedding(t, 2048, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(time_encoding(t), ref)


def test_time_encoding_is_cos_first():
    t = torch.tensor([3.0])
    enc = time_encoding(t)
    assert enc.shape == (1, 2048)
    assert enc[0, 0] == pytest.approx(math.cos(3.0), abs=1e-6)  # frequency 1: cos first
    assert enc[0, 1024] == pytest.approx(math.sin(3.0), abs=1e-6)
    assert enc[0, 1] == pytest.approx(math.cos(3.0 * math.exp(-math.log(10000) / 1024)), abs=1e-6)


def test_anchor_initialisation():
    cfg = MapperConfig(num_tokens=4, dim=32, image_dim=512)
    m = Mapper(cfg, torch.randn(32))
    ts = anchor_timesteps(400, 800, 200)
    assert ts[0] == 400 and ts[1] == 402 and ts[-1] == 798 and len(ts) == 200
    assert torch.equal(m.anchors.weight, time_encoding(ts.float()))
    # other bounds: exactly A evenly spaced anchors
    ts2 = anchor_timesteps(300, 900, 200)
    assert len(ts2) == 200 and ts2[0] == 300 and torch.allclose(ts2.diff(), torch.full((199,), 3.0, dtype=ts2.dtype))
    # the bias keeps nn.Linear's default init: uniform in +-1/sqrt(fan_in), not zero
    bound = 1 / math.sqrt(2048)
    assert m.anchors.bias.abs().max() <= bound and m.anchors.bias.abs().max() > 0


def test_mapper_shapes_and_norms():
    torch.manual_seed(0)
    K, D, n = 3, 32, 5
    e_super = torch.randn(D) * 0.7
    m = Mapper(MapperConfig(num_tokens=K, dim=D, image_dim=512), e_super)
    E, B = m(torch.tensor([400.0, 450, 600, 799, 800]), torch.randn(n, 512))
    assert E.shape == (n, K, D) and B.shape == (n, K, D)
    # every token embedding has the super-class embedding's norm
    assert torch.allclose(E.norm(dim=-1), torch.full((n, K), float(e_super.norm())), atol=1e-5)
    # rows differ between tokens and between timesteps
    assert not torch.allclose(E[0, 0], E[0, 1])
    assert not torch.allclose(E[0], E[1])


def test_mapper_structure():
    m = Mapper(MapperConfig(num_tokens=4, dim=32, image_dim=512), torch.randn(32))
    kinds = [type(x).__name__ for x in m.time_mlp]
    assert kinds == ["Linear", "LayerNorm", "LeakyReLU"] * 2
    assert m.time_mlp[0].in_features == 200 and m.time_mlp[0].out_features == 128
    assert m.token_head.out_features == 4 * 32
    assert m.bypass_mlp[0].in_features == 128 + 512
    assert m.bypass_head.out_features == 4 * 32
