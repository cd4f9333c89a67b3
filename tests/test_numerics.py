"""Losses and KL estimators at extreme log-ratios (±25, ±90, ±1000): finite values and gradients, and
the hand-computed values where the formulas' clamps decide them."""
import math

import pytest
import torch

from forkrl.algos import LOSSES, BatchContext, call, per_turn_index
from forkrl.algos.losses import KL_ESTIMATORS, agg_loss, gspo, kl_penalty

EXTREMES = [25.0, -25.0, 90.0, -90.0, 1000.0, -1000.0]


def _pair(d: float, rows: int = 2, cols: int = 3):
    """logp and old/ref logp (both <= 0) whose difference is d everywhere."""
    base = torch.full((rows, cols), -1.0)
    return (base, base - d) if d > 0 else (base + d, base)


@pytest.mark.parametrize("d", EXTREMES)
@pytest.mark.parametrize("kind", KL_ESTIMATORS)
def test_kl_estimators_are_finite_at_extreme_log_ratios(kind, d):
    logp, ref = _pair(d)
    logp = logp.clone().requires_grad_(True)
    value = kl_penalty(logp, ref, kind)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(logp.grad).all(), (kind, d, value, logp.grad)


@pytest.mark.parametrize("d", EXTREMES)
def test_k3_is_clamped_with_zero_gradient_beyond_the_clamp(d):
    # k3(d) = exp(-d) + d - 1 with d = log pi - log pi_ref, the log-ratio clamped to ±20 first, the
    # value to [-10, 10]: at |d| >= 25 the value is exp(-20) + 20 - 1 (> 10, so 10) or exp(20) - 21 (10)
    logp, ref = _pair(d)
    logp = logp.clone().requires_grad_(True)
    value = kl_penalty(logp, ref, "k3")
    value.sum().backward()
    assert torch.equal(value, torch.full_like(value, 10.0))
    assert torch.equal(logp.grad, torch.zeros_like(logp.grad))


def test_k3_inside_the_clamp_is_the_formula():
    d = torch.tensor([0.5, -2.0])
    expected = torch.tensor([math.exp(-0.5) + 0.5 - 1, math.exp(2.0) - 2.0 - 1])
    assert torch.allclose(kl_penalty(d, torch.zeros(2), "k3"), expected)


def _call(name, logp, old, adv, mask, entropy):
    stats = {}
    prepare = LOSSES.hook(name, "prepare")
    turn = per_turn_index(mask)
    if prepare is not None:
        ctx = BatchContext(old_logp=old, adv=adv, mask=mask, entropy=entropy.detach(), turn=turn, progress=0.3,
                           generator=torch.Generator().manual_seed(0))
        stats, _ = prepare(ctx)
    return call(LOSSES[name], logp, old, adv, mask, params={},
                available={"entropy": entropy, "stats": stats, "turn": turn, "progress": 0.3, "agg": "token-mean"})


@pytest.mark.parametrize("d", EXTREMES)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_finite_at_extreme_log_ratios(name, d):
    logp, old = _pair(d)
    logp = logp.clone().requires_grad_(True)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3])
    mask = torch.ones(2, 3)
    entropy = torch.full((2, 3), 1.5, requires_grad=True)
    loss, metrics = _call(name, logp, old, adv, mask, entropy)
    loss.backward()
    assert math.isfinite(float(loss.detach())), (name, d, loss)
    assert torch.isfinite(logp.grad).all(), (name, d, logp.grad)
    assert all(math.isfinite(v) or v == math.inf for v in metrics.values() if isinstance(v, float)), metrics


def test_gspo_logs_ppo_kl_per_token_and_honours_agg():
    # two rows of 1 and 3 tokens, log-ratios (logp - old) of -0.4 and (-0.1, -0.1, -0.1):
    # per-token ppo_kl = mean(0.4, 0.1, 0.1, 0.1) = 0.175 (a per-sequence mean would give 0.25)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    old = torch.zeros(2, 3)
    logp = torch.tensor([[-0.4, 0, 0], [-0.1, -0.1, -0.1]])
    adv = torch.ones(2, 3)
    _, metrics = gspo(logp, old, adv, mask)
    assert metrics["ppo_kl"] == pytest.approx(0.175)
    # s_i < 1 - clip_low with A > 0: the max takes the unclipped -s_i A, so the per-token loss is -s_i:
    # row 0 exp(-0.4), row 1 exp(-0.1) on each of its 3 tokens
    s0, s1 = math.exp(-0.4), math.exp(-0.1)
    seq_mean, _ = gspo(logp, old, adv, mask, agg="seq-mean-token-mean")
    token_mean, _ = gspo(logp, old, adv, mask, agg="token-mean")
    assert float(seq_mean) == pytest.approx(-(s0 + s1) / 2)
    assert float(token_mean) == pytest.approx(-(s0 + 3 * s1) / 4)


def test_fully_masked_rows_count_in_seq_mean_denominators():
    loss = torch.tensor([[2.0, 2.0], [5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert float(agg_loss(loss, mask, "seq-mean-token-mean")) == pytest.approx(1.0)   # (2 + 0) / 2 rows
    assert float(agg_loss(loss, mask, "token-mean")) == pytest.approx(2.0)
