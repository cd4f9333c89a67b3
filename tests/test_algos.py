"""Each registered method against numbers computed by hand from algorithms.md §0-1."""
import math

import pytest
import torch

from forkrl.algos import ADVANTAGES, LOSSES, SELECTORS, agg_loss, kl_penalty
from forkrl.algos.losses import AggNorm
from forkrl.algos.selection import overlong_penalty


def _col(adv):
    return adv[:, 0].tolist()


def test_grpo_group_normalisation_by_hand():
    # group 0: [1, 0, 0, 1] -> mean 0.5, Bessel std sqrt(1/3); group 1: [1, 1] -> std 0; group 2: single
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    mask = torch.ones(7, 3)
    adv, metrics = ADVANTAGES["grpo"](rewards, groups, mask)
    s = math.sqrt(1 / 3) + 1e-6
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0, 0.5 / (1 + 1e-6)]
    assert _col(adv) == pytest.approx(expected, abs=1e-6)
    assert adv[0].tolist() == pytest.approx([0.5 / s] * 3, abs=1e-6)  # constant over tokens


def test_advantages_zero_on_masked_tokens():
    adv, _ = ADVANTAGES["grpo"](torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert adv[0, 2] == 0 and adv[1, 1] == 0 and adv[0, 0] != 0


def test_drgrpo_subtracts_mean_only():
    adv, _ = ADVANTAGES["drgrpo"](torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0]), torch.tensor([0, 0, 0, 0, 1]),
                                  torch.ones(5, 1))
    assert _col(adv) == pytest.approx([0.5, -0.5, -0.5, 0.5, 3.0])  # single group: mean 0 (verl convention)


def test_rloo_leave_one_out_by_hand():
    # [1, 0, 0]: baselines mean(0,0)=0, mean(1,0)=0.5, mean(1,0)=0.5
    adv, _ = ADVANTAGES["rloo"](torch.tensor([1.0, 0.0, 0.0, 2.0]), torch.tensor([5, 5, 5, 9]), torch.ones(4, 1))
    assert _col(adv) == pytest.approx([1.0, -0.5, -0.5, 2.0])


def test_agg_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert agg_loss(loss, mask, "token-mean") == pytest.approx(10 / 4)
    assert agg_loss(loss, mask, "seq-mean-token-mean") == pytest.approx((2 + 4) / 2)
    assert agg_loss(loss, mask, "seq-mean-token-sum") == pytest.approx(10 / 2)
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm") == pytest.approx(10 / (2 * 3))
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm", AggNorm(const=100)) == pytest.approx(10 / 200)
    # global normalisers: two micro-batches sum to the whole batch
    norm = AggNorm(tokens=4, seqs=2)
    parts = sum(agg_loss(loss[i:i + 1], mask[i:i + 1], "token-mean", norm) for i in range(2))
    assert parts == pytest.approx(2.5)
    with pytest.raises(ValueError, match="allowed"):
        agg_loss(loss, mask, "mean")


def test_ppo_clip_by_hand():
    # token 0: A=+1, r=1.5 -> clipped at 1+0.2: loss -1.2   (high clip)
    # token 1: A=-1, r=0.5 -> max(0.5, 0.8) = 0.8           (low clip)
    # token 2: A=+1, r=1.0 -> -1.0
    # token 3: A=-1, r=4.0 -> max(4, 1.2) = 4.0 (no dual clip)
    r = torch.tensor([[1.5, 0.5, 1.0, 4.0]])
    old = torch.zeros(1, 4)
    logp = torch.log(r).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, m = LOSSES["ppo_clip"](logp, old, adv, mask)
    assert float(loss.detach()) == pytest.approx((-1.2 + 0.8 - 1.0 + 4.0) / 4)
    assert m["clip/high_frac"] == pytest.approx(0.25) and m["clip/low_frac"] == pytest.approx(0.25)
    loss.backward()
    # gradient flows only through unclipped tokens: d(-A r)/dlogp = -A r / 4
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, -0.25, 1.0])


def test_ppo_clip_higher_and_dual_clip():
    r = torch.tensor([[1.5, 4.0]])
    logp, old = torch.log(r), torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    loss, m = LOSSES["ppo_clip"](logp, old, adv, torch.ones(1, 2), clip_high=0.28, clip_c=3.0)
    # token 0: -1.28 (DAPO clip-higher); token 1: min(max(4, 1.2), 3) = 3 (dual clip)
    assert float(loss.detach()) == pytest.approx((-1.28 + 3.0) / 2)
    assert m["clip/dual_frac"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="clip_c"):
        LOSSES["ppo_clip"](logp, old, adv, torch.ones(1, 2), clip_c=0.5)


def test_gspo_sequence_ratio_by_hand():
    # log ratios [log 2, 0] -> s = exp(log2 / 2) = sqrt(2) for both tokens
    old = torch.zeros(2, 2)
    logp = torch.tensor([[math.log(2), 0.0], [math.log(2), 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    loss, m = LOSSES["gspo"](logp, old, adv, torch.ones(2, 2))
    s = math.sqrt(2)
    # seq 0: A>0, s clipped to 1+4e-4 -> -1.0004 per token; seq 1: A<0, max(s, 1-3e-4) = s
    assert float(loss.detach()) == pytest.approx((-(1 + 4e-4) + s) / 2, rel=1e-5)
    assert m["clip/high_frac"] == pytest.approx(0.5)
    loss.backward()
    # clipped sequence: no gradient; other: d(-A s_t)/dlogp_t = s, / (2 tokens * 2 seqs)
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.0])
    assert logp.grad[1].tolist() == pytest.approx([s / 4, s / 4], rel=1e-5)


def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0], requires_grad=True)
    ref = torch.tensor([-2.0])
    assert float(kl_penalty(logp, ref, "k1").detach()) == pytest.approx(1.0)
    assert float(kl_penalty(logp, ref, "abs").detach()) == pytest.approx(1.0)
    assert float(kl_penalty(logp, ref, "k2").detach()) == pytest.approx(0.5)
    k3 = math.exp(-1) + 1 - 1
    assert float(kl_penalty(logp, ref, "k3").detach()) == pytest.approx(k3)
    assert float(kl_penalty(logp, ref, "low_var_kl").detach()) == pytest.approx(k3)
    assert float(kl_penalty(torch.tensor([0.0]), torch.tensor([-30.0]), "k3")) == 10.0  # clamped
    v = kl_penalty(logp, ref, "k3+")
    assert float(v.detach()) == pytest.approx(k3)
    v.backward()
    assert float(logp.grad) == pytest.approx(1.0)  # k2's gradient: logp - ref
    with pytest.raises(ValueError, match="allowed"):
        kl_penalty(logp, ref, "k4")


def test_dynamic_sampling_filter_keeps_groups_with_variance():
    values = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    keep = SELECTORS["nonzero_std_groups"](values, groups)
    assert keep.tolist() == [True, True, True, False, False, False, True]


def test_overlong_penalty_by_hand():
    pen = overlong_penalty(torch.tensor([50, 80, 90, 100]), max_len=100, buffer=20, factor=1.0)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), max_len=10, buffer=0)


def test_forking_tokens_selects_top_entropy_share_by_hand():
    from forkrl.algos import TOKEN_SELECTORS
    entropy = torch.tensor([[0.1, 2.0, 0.5, 3.0, 1.0], [0.2, 0.9, 0.3, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])  # 9 valid; the 9.0 is masked out
    top = TOKEN_SELECTORS["forking_tokens"](entropy, mask)  # ceil(0.2 * 9) = 2 tokens: 3.0 and 2.0
    assert top.tolist() == [[False, True, False, True, False], [False] * 5]
    bottom = TOKEN_SELECTORS["forking_tokens"](entropy, mask, bottom=True)
    assert bottom.tolist() == [[True, False, True, False, True], [True, True, True, True, False]]
    half = TOKEN_SELECTORS["forking_tokens"](entropy, mask, top_ratio=0.5)  # ceil(4.5) = 5
    assert int(half.sum()) == 5 and not half[1, 4]
    with pytest.raises(ValueError):
        TOKEN_SELECTORS["forking_tokens"](entropy, mask, top_ratio=0.0)
