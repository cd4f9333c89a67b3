"""Clip-Cov and KL-Cov (algorithms.md §4) on 4-token examples computed by hand."""
import math

import pytest
import torch

from forkrl.algos import LOSSES
from forkrl.algos.entropy_losses import token_covariance

# log-probs with mean -2 and advantages with mean 0 give covariances (lp + 2) * A
LOGP = [[-1.0, -3.0, -1.0, -3.0]]
ADV = torch.tensor([[2.0, -2.0, -2.0, 2.0]])  # Cov = [2, 2, -2, -2]


def test_token_covariance_by_hand():
    cov = token_covariance(torch.tensor(LOGP), ADV, torch.ones(1, 4))
    assert cov.tolist() == [[2.0, 2.0, -2.0, -2.0]]
    # masked tokens are left out of the means and get 0
    cov = token_covariance(torch.tensor([[-1.0, -3.0, 50.0]]), torch.tensor([[1.0, -1.0, 9.0]]), torch.tensor([[1, 1, 0]]))
    assert cov.tolist() == [[1.0, 1.0, 0.0]]


def test_clip_cov_detaches_high_covariance_tokens():
    mask = torch.ones(1, 4)
    # ratio 1 everywhere; candidates: 1 < Cov < 5 -> tokens 0 and 1; clip_ratio 0.5 -> floor(0.5 * 4) = 2 picked
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, m = LOSSES["clip_cov"](logp, torch.tensor(LOGP), ADV, mask, clip_ratio=0.5)
    # surviving terms -A r: tokens 2, 3 -> (2 - 2) / 4
    assert float(loss.detach()) == pytest.approx(0.0)
    loss.backward()
    assert logp.grad.tolist() == [[0.0, 0.0, 0.5, -0.5]]  # d(-A r)/dlogp / 4
    assert m["cov/selected_frac"] == 0.5 and m["cov/candidates"] == 2


def test_clip_cov_picks_at_least_one_and_skips_ratio_clipped_tokens():
    mask = torch.ones(1, 4)
    torch.manual_seed(0)
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, _ = LOSSES["clip_cov"](logp, torch.tensor(LOGP), ADV, mask)  # default r = 2e-4 -> max(0, 1) = 1 token
    loss.backward()
    zeroed = [i for i in range(4) if logp.grad[0, i] == 0]
    assert len(zeroed) == 1 and zeroed[0] in (0, 1)
    # token 0 already clipped by the ratio (r = 3 > 1 + 1, A > 0): only token 1 can be picked
    old = torch.tensor(LOGP) - torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]])
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, m = LOSSES["clip_cov"](logp, old, ADV, mask, clip_ratio=0.5)
    # token 0: max(-2*3, -2*2) = -4; token 1: 0; token 2: 2; token 3: -2
    assert float(loss.detach()) == pytest.approx(-4 / 4)
    loss.backward()
    assert logp.grad.tolist() == [[0.0, 0.0, 0.5, -0.5]]
    assert m["cov/candidates"] == 1


def test_kl_cov_penalises_top_covariance_token_without_clipping():
    adv = torch.tensor([[3.0, -2.0, -2.0, 1.0]])  # Cov = [3, 2, -2, -1]: token 0 is the top one
    old = torch.tensor(LOGP) - torch.tensor([[0.5, 0.0, 0.0, 1.0]])  # log r = [0.5, 0, 0, 1]
    logp = torch.tensor(LOGP, requires_grad=True)
    loss, m = LOSSES["kl_cov"](logp, old, adv, torch.ones(1, 4), kl_ratio=0.25, kl_coef=1.0)
    e = math.exp
    expected = (-3 * e(0.5) + 0.5) + 2.0 + 2.0 + (-1 * e(1.0))  # token 3: r = e, unclipped
    assert float(loss.detach()) == pytest.approx(expected / 4)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([(-3 * e(0.5) + 1) / 4, 2 / 4, 2 / 4, -e(1.0) / 4])
    assert m["cov/selected_frac"] == 0.25


def test_cov_losses_ignore_masked_tokens():
    mask = torch.tensor([[1, 1, 1, 0]])
    adv = torch.tensor([[3.0, -2.0, -1.0, 100.0]])
    logp = torch.tensor([[-1.0, -3.0, -2.0, 0.0]], requires_grad=True)
    for name in ("clip_cov", "kl_cov"):
        loss, m = LOSSES[name](logp, logp.detach(), adv, mask)
        assert math.isfinite(float(loss.detach()))
        (g,) = torch.autograd.grad(loss, logp)
        assert g[0, 3] == 0
