import math

import torch

from pm_runtime.train.loss import masked_mse, prompt_lengths, tandem_equilibrium


def test_tandem_equilibrium_by_hand():
    # 1 sample, 1 head, L = 5: [SOT, w1, P, w2, EOT]; real tokens are positions 1..3, P at 2.
    L = 5
    probs = torch.zeros(1, 1, L, L)
    rows = [
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0, 0.0],
        [0.2, 0.3, 0.5, 0.0, 0.0],
        [0.1, 0.2, 0.3, 0.4, 0.0],
        [0.1, 0.1, 0.2, 0.2, 0.4],
    ]
    probs[0, 0] = torch.tensor(rows)
    mask = torch.tensor([[False, False, True, False, False]])
    lengths = torch.tensor([3])
    a, b = tandem_equilibrium(probs, mask, lengths)
    # column totals among real tokens: w1 = 1.1, P = 1.0, w2 = 0.6 -> S = column 2, T = column 1
    s = [r[2] for r in rows]
    t = [r[1] for r in rows]
    ps = [math.exp(100 * x) / (math.exp(100 * x) + math.exp(100 * y)) for x, y in zip(s, t)]
    expect_a = sum(ps) / L  # all 5 query rows count, SOT and EOT rows included
    assert abs(float(a) - expect_a) < 1e-6
    assert abs(float(a + b) - 1.0) < 1e-6


def test_tandem_equilibrium_picks_largest_placeholder_and_word():
    torch.manual_seed(0)
    probs = torch.rand(2, 3, 8, 8).softmax(-1)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 2:4] = True
    lengths = torch.tensor([5, 4])
    a, _ = tandem_equilibrium(probs, mask, lengths)
    # by hand, per sample
    num, den = 0.0, 0.0
    for n in range(2):
        tot = probs[n].sum(dim=(0, 1))
        real = list(range(1, int(lengths[n]) + 1))
        S = max((c for c in real if mask[n, c]), key=lambda c: float(tot[c]))
        T = max((c for c in real if not mask[n, c]), key=lambda c: float(tot[c]))
        p = torch.softmax(100 * torch.stack([probs[n, :, :, S], probs[n, :, :, T]], -1), -1)
        num += float(p[..., 0].sum())
        den += float(p.sum())
    assert abs(float(a) - num / den) < 1e-6


def test_tandem_equilibrium_gradient_flows():
    probs = torch.rand(1, 2, 6, 6).softmax(-1).requires_grad_()
    mask = torch.tensor([[False, False, True, False, False, False]])
    a, b = tandem_equilibrium(probs, mask, torch.tensor([3]))
    (a * b).backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0


def test_prompt_lengths():
    ids = torch.tensor([[49406, 5, 6, 7, 49407, 49407], [49406, 5, 49407, 49407, 49407, 49407]])
    assert prompt_lengths(ids, 49407).tolist() == [3, 1]


def test_masked_mse_ignores_zero_mask_pixels():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :4] = 0
    loss = masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[:, :, :4] += 100.0  # where the mask is zero
    assert torch.equal(masked_mse(changed, target, mask), loss)
    expect = ((pred - target) ** 2)[:, :, 4:].mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expect, atol=1e-6)
    # soft masks weight pixels
    soft = torch.full((2, 1, 8, 8), 0.5)
    assert torch.allclose(masked_mse(pred, target, soft), ((pred - target) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)
