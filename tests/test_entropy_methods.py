"""Hand-computed checks of the entropy-aware methods (algorithms.md §3, §7-9, §12.2, §13, §15-16).

Expected values are written from the formulas with plain arithmetic (math.exp, math.log), never by
calling the implementation under test.
"""
import math

import pytest
import torch

from forkrl.algos import (
    ADVANTAGES,
    LOSSES,
    SELECTORS,
    TOKEN_SELECTORS,
    BatchContext,
    per_turn_index,
)
from forkrl.algos.correction import rollout_correction_weights
from forkrl.algos.entropy_losses import (
    bapo_bounds,
    epo_phase_weight,
    hapo_entropy_stats,
    hapo_normalized_entropy,
    steer_weights,
)
from forkrl.algos.selection import max_variance_subset, schedule

SQ = math.sqrt(0.5)  # GRPO advantage of rewards (1, 0): +-0.5 / std(1, 0) = +-0.7071


def t(x, grad=False):
    return torch.tensor(x, dtype=torch.float32, requires_grad=grad)


def grad_of(loss, x):
    loss.backward()
    return x.grad


# -- shared pieces ------------------------------------------------------------------------------

def test_turn_index_counts_runs_of_generated_tokens():
    mask = t([[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0]])
    assert per_turn_index(mask).tolist() == [[1, 1, 0, 0, 2, 0], [1, 1, 1, 0, 0, 0]]


# -- HAPO (§7) ----------------------------------------------------------------------------------

def test_hapo_normalised_entropy_by_hand():
    # l = log H = 0..4; mu = 0.8-quantile = 3.2 (linear interpolation); the only z > 0 maps to 1, the
    # most negative to -1, the others to (l - mu) / |min(l - mu)| = (l - 3.2) / 3.2
    H = t([[math.exp(v) for v in range(5)]])
    s = hapo_entropy_stats(H, torch.ones_like(H), pivot=0.8)
    assert s["mu"] == pytest.approx(3.2)
    assert s["sigma"] == pytest.approx(math.sqrt((3.2**2 + 2.2**2 + 1.2**2 + 0.2**2 + 0.8**2) / 5))
    h = hapo_normalized_entropy(H, s)
    assert h[0].tolist() == pytest.approx([-1.0, -2.2 / 3.2, -1.2 / 3.2, -0.2 / 3.2, 1.0], abs=1e-5)


def test_hapo_loss_redistributes_advantages_and_widens_bounds_by_hand():
    # token 0: h = 1 (uncertain), r = 1.3 outside the neutral zone (0.9, 1.1): A' = 2; eps_hi = 0.4, unclipped
    # token 1: h = -0.5 (confident), r = 1.05 inside the zone: A' = 0.5; eps_lo = 0.3, eps_hi = 0.2
    # token 2: h = 0, r = 1.25 outside the zone: A = 1; eps_hi = 0.2, so the ratio is clipped at 1.2
    r = torch.tensor([[1.3, 1.05, 1.25]])
    logp = t([[0.0, 0.0, 0.0]], grad=True)
    old = -torch.log(r)
    adv, mask = t([[1.0, 1.0, 1.0]]), t([[1.0, 1.0, 1.0]])
    loss, m = LOSSES["hapo"](logp, old, adv, mask, stats={"h": t([[1.0, -0.5, 0.0]])})
    assert float(loss.detach()) == pytest.approx((-2 * 1.3 - 0.5 * 1.05 - 1.2) / 3, rel=1e-5)
    assert grad_of(loss, logp)[0].tolist() == pytest.approx([-2 * 1.3 / 3, -0.5 * 1.05 / 3, 0.0], abs=1e-6)
    assert m["hapo/eps_hi_mean"] == pytest.approx((0.4 + 0.2 + 0.2) / 3)
    assert m["hapo/eps_lo_mean"] == pytest.approx((0.2 + 0.3 + 0.2) / 3)


def test_hapo_low_entropy_token_gets_a_wider_lower_bound():
    # h = -1, A < 0: eps_lo = 0.2 (1 + 1) = 0.4, so r = 0.7 is not clipped (plain PPO would clip at 0.8)
    logp = t([[0.0]], grad=True)
    loss, _ = LOSSES["hapo"](logp, -torch.log(torch.tensor([[0.7]])), t([[-1.0]]), t([[1.0]]),
                             stats={"h": t([[-1.0]])})
    # outside the neutral zone a confident token keeps A = -1
    assert float(loss.detach()) == pytest.approx(0.7, rel=1e-5)
    assert float(grad_of(loss, logp)) == pytest.approx(0.7, rel=1e-5)


def test_hapo_token_level_group_average_by_hand():
    # rewards (1, 0) with 1 and 3 tokens: mu = 1/4, sigma^2 = (1 * 0.75^2 + 3 * 0.25^2) / 4 = 0.1875
    mask = t([[1, 0, 0], [1, 1, 1]])
    adv, m = ADVANTAGES["hapo"](t([1.0, 0.0]), torch.tensor([0, 0]), mask)
    sigma = math.sqrt(0.1875)
    assert adv[0, 0] == pytest.approx(0.75 / sigma, rel=1e-5)
    assert adv[1].tolist() == pytest.approx([-0.25 / sigma] * 3, rel=1e-5)
    assert adv[0, 1:].tolist() == [0.0, 0.0]
    assert m["adv/hapo_fallback_groups_frac"] == 0.0


def test_hapo_advantage_falls_back_to_grpo_when_any_reaches_five():
    # 1 token vs 99: mu = 0.01, sigma = sqrt(0.0099), A_0 = 0.99 / 0.0995 = 9.95 >= 5 -> GRPO's +-0.7071
    mask = torch.zeros(2, 99)
    mask[0, 0] = 1
    mask[1] = 1
    adv, m = ADVANTAGES["hapo"](t([1.0, 0.0]), torch.tensor([0, 0]), mask)
    assert adv[0, 0] == pytest.approx(SQ, rel=1e-4)
    assert adv[1, 5] == pytest.approx(-SQ, rel=1e-4)
    assert m["adv/hapo_fallback_groups_frac"] == 1.0


def test_adaptive_temperature_by_hand():
    from forkrl.rollout.engine import adapt_temperature, sample_next
    # stats mu = 0, sigma = 1, scales 2 and 4; tau = 0.05. H = e^1 -> z = 1 -> h = 0.5 -> T' = 1.025;
    # H = e^-2 -> z = -2 -> h = -0.5 -> T' = 0.975; H = e^9 -> h clipped to 1 -> T' = 1.05
    stats = torch.tensor([[0.05, 0.0, 1.0, 2.0, 4.0]] * 3)
    out = adapt_temperature(torch.tensor([math.e, math.exp(-2), math.exp(9)]), torch.ones(3), stats)
    assert out.tolist() == pytest.approx([1.025, 0.975, 1.05], rel=1e-6)
    # the reported log-prob is under T', the entropy under T
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    tok, logp, ent = sample_next(logits, torch.tensor([1.0]), torch.tensor([1.0]), torch.Generator().manual_seed(0),
                                 torch.tensor([[0.5, 0.0, 1.0, 1.0, 1.0]]))
    p1 = torch.softmax(logits[0], -1)
    H = float(-(p1 * p1.log()).sum())
    T2 = 1 + 0.5 * max(-1.0, min(1.0, math.log(H) / 1.0))
    assert float(ent) == pytest.approx(H, rel=1e-5)
    assert float(logp) == pytest.approx(float(torch.log_softmax(logits[0] / T2, -1)[tok]), rel=1e-5)


# -- STEER (§8) ---------------------------------------------------------------------------------

def _omegas():
    # token 0: p = p_old = 0.5, A = 1, H = 1:   Omega = 2 * 0.25 * (log 0.5 + 1)
    # token 1: p = p_old = 0.9, A = 1, H = 0.5: Omega = (1/0.9) * 0.09 * (log 0.9 + 0.5)
    return 0.5 * (math.log(0.5) + 1), 0.1 * (math.log(0.9) + 0.5)


def test_steer_exponential_weights_and_loss_by_hand():
    o0, o1 = _omegas()
    kappa = -math.log(0.8) / o0
    lam = [math.exp(-kappa * o0), math.exp(-kappa * o1)]
    assert lam[0] == pytest.approx(0.8)
    logp = t([[math.log(0.5), math.log(0.9)]], grad=True)
    old = logp.detach().clone()
    loss, m = LOSSES["steer"](logp, old, t([[1.0, 1.0]]), t([[1.0, 1.0]]), entropy=t([[1.0, 0.5]]), scope="micro")
    assert float(loss.detach()) == pytest.approx(-(lam[0] + lam[1]) / 2, rel=1e-5)
    assert m["steer/omega_max"] == pytest.approx(o0, rel=1e-5)
    # weights carry no gradient: d loss / d logp_t = -lambda_t r A / N with r = 1
    assert grad_of(loss, logp)[0].tolist() == pytest.approx([-lam[0] / 2, -lam[1] / 2], rel=1e-5)


def test_steer_linear_weights_and_floor_by_hand():
    o0, o1 = _omegas()
    w = steer_weights(torch.tensor([o0, o1]), o0, mode="linear", w_min=0.8, w_max=1.0)
    assert w.tolist() == pytest.approx([0.8, 1 - 0.2 * o1 / o0], rel=1e-5)
    # all |Omega| below 0.02: kappa uses 0.02, so no token reaches w_min
    w = steer_weights(torch.tensor([0.01]), 0.01, mode="exponential", w_min=0.8)
    assert float(w) == pytest.approx(math.exp(math.log(0.8) / 0.02 * 0.01), rel=1e-6)


def test_steer_batch_scope_takes_the_maximum_from_prepare():
    o0, o1 = _omegas()
    ctx = BatchContext(old_logp=t([[math.log(0.5), math.log(0.9)]]), adv=t([[1.0, 1.0]]), mask=t([[1.0, 1.0]]),
                       entropy=t([[1.0, 0.5]]), turn=torch.tensor([[1, 1]]))
    stats, _ = LOSSES.hook("steer", "prepare")(ctx)
    assert stats["omega_max"] == pytest.approx(o0, rel=1e-5)
    # a micro-batch holding only token 1 still scales by the batch maximum
    logp = t([[math.log(0.9)]], grad=True)
    loss, m = LOSSES["steer"](logp, logp.detach(), t([[1.0]]), t([[1.0]]), entropy=t([[0.5]]), stats=stats)
    assert float(loss.detach()) == pytest.approx(-math.exp(math.log(0.8) / o0 * o1), rel=1e-5)
    assert m["steer/batch_scope"] == 1.0


# -- BAPO (§9) ----------------------------------------------------------------------------------

def test_bapo_bound_search_by_hand():
    # A = (1, -1), r = (1.5, 1.3). Start (0.6, 1.2): Pos = 1.2, Neg = 1.3, kappa < 1. Raising c_lo to its
    # max 0.8 changes nothing (r > c_lo); c_hi 1.25 gives 1.25/1.3, 1.3 gives 1.3/(1.3 + 1e-8) < 1,
    # 1.35 reaches kappa = 1.35/1.3 >= 1.
    ratio, adv, mask = t([[1.5, 1.3]]), t([[1.0, -1.0]]), t([[1.0, 1.0]])
    c_lo, c_hi, kappa, steps = bapo_bounds(ratio, adv, mask, target=1.0, lower=(0.6, 0.8, 0.05),
                                           upper=(1.2, 2.0, 0.05))
    assert c_lo == pytest.approx(0.8) and c_hi == pytest.approx(1.35)
    assert kappa == pytest.approx(1.35 / 1.3, rel=1e-6)
    assert steps == 4 + 3
    logp = t([[0.0, 0.0]], grad=True)
    loss, m = LOSSES["bapo"](logp, -torch.log(ratio), adv, mask)
    # token 0 clipped at 1.35 (no gradient); token 1 keeps -A r = 1.3 (below the dual-clip cap 3)
    assert float(loss.detach()) == pytest.approx((-1.35 + 1.3) / 2, rel=1e-5)
    assert grad_of(loss, logp)[0].tolist() == pytest.approx([0.0, 1.3 / 2], abs=1e-6)
    assert m["bapo/c_hi"] == pytest.approx(1.35) and m["bapo/search_steps"] == 7


def test_bapo_keeps_start_bounds_when_positive_mass_suffices():
    ratio, adv, mask = t([[1.5, 0.5]]), t([[1.0, -1.0]]), t([[1.0, 1.0]])
    # Pos = min(1.5, 1.2) = 1.2, Neg = max(0.5, 0.6) = 0.6: kappa = 2
    c_lo, c_hi, kappa, steps = bapo_bounds(ratio, adv, mask, target=1.0, lower=(0.6, 0.8, 0.05),
                                           upper=(1.2, 2.0, 0.05))
    assert (c_lo, c_hi, steps) == (0.6, 1.2, 0) and kappa == pytest.approx(2.0)


# -- AEPO (§3 steps 3-4) ------------------------------------------------------------------------

def test_aepo_keeps_a_bounded_gradient_for_clipped_high_entropy_tokens():
    # token 0: high entropy, A = 1, r = 1.5 > 1.28: value -1.28, gradient -1.28 (plain clip: 0)
    # token 1: low entropy, same ratio: ordinary clip, value -1.28, gradient 0
    # token 2: high entropy, A = -1, r = 0.5 < 0.8: value 0.8, gradient 0.8
    ratio = torch.tensor([[1.5, 1.5, 0.5]])
    logp = t([[0.0, 0.0, 0.0]], grad=True)
    loss, m = LOSSES["aepo"](logp, -torch.log(ratio), t([[1.0, 1.0, -1.0]]), t([[1.0, 1.0, 1.0]]),
                             stats={"entropy_z": t([[1.0, -1.0, 1.0]])})
    assert float(loss.detach()) == pytest.approx((-1.28 - 1.28 + 0.8) / 3, rel=1e-5)
    assert grad_of(loss, logp)[0].tolist() == pytest.approx([-1.28 / 3, 0.0, 0.8 / 3], rel=1e-5)
    assert m["aepo/kept_clipped_frac"] == pytest.approx(2 / 3)


def test_aepo_entropy_aware_advantage_by_hand():
    # entropies 1, 3, 1, 3: mean 2, Bessel std sqrt(4/3), z = -+sqrt(3)/2; A = +-0.7071 (1 + 0.1 z)
    z = math.sqrt(3) / 2
    adv, _ = ADVANTAGES["aepo"](t([1.0, 0.0]), torch.tensor([0, 0]), t([[1, 1], [1, 1]]),
                                entropy=t([[1.0, 3.0], [1.0, 3.0]]), alpha=0.1)
    assert adv.tolist()[0] == pytest.approx([SQ * (1 - 0.1 * z), SQ * (1 + 0.1 * z)], rel=1e-4)
    assert adv.tolist()[1] == pytest.approx([-SQ * (1 - 0.1 * z), -SQ * (1 + 0.1 * z)], rel=1e-4)


# -- EMPG (§13.2, §25) --------------------------------------------------------------------------

def test_empg_modulates_each_turn_by_hand():
    # row 0 has two turns (entropy 1, then 3), row 1 one turn (entropy 2). H^ = (0, 1, 0.5),
    # e = exp(-H^), g = e / mean(e), f = e; A = (+0.7071, -0.7071); the bonus is the next turn's f
    mask = t([[1, 1, 0, 1], [1, 1, 1, 0]])
    ent = t([[1.0, 1.0, 0.0, 3.0], [2.0, 2.0, 2.0, 0.0]])
    adv, m = ADVANTAGES["empg"](t([1.0, 0.0]), torch.tensor([0, 0]), mask, entropy=ent, normalize=False)
    e = [1.0, math.exp(-1.0), math.exp(-0.5)]
    g = [x / (sum(e) / 3) for x in e]
    expected0 = [g[0] * SQ + 0.1 * e[1]] * 2 + [0.0, g[1] * SQ]
    expected1 = [-g[2] * SQ] * 3 + [0.0]
    assert adv[0].tolist() == pytest.approx(expected0, rel=1e-4)
    assert adv[1].tolist() == pytest.approx(expected1, rel=1e-4)
    # a confident failure is penalised more than an uncertain one (§25): g > 1 for the lowest entropy
    assert g[0] > 1 > g[1]


def test_empg_normalised_advantages_have_zero_mean_unit_std():
    mask = t([[1, 1, 0, 1], [1, 1, 1, 0]])
    adv, _ = ADVANTAGES["empg"](t([1.0, 0.0]), torch.tensor([0, 0]), mask, entropy=t([[1, 1, 0, 3], [2, 2, 2, 0]]))
    v = adv[mask > 0].double()
    assert float(v.mean()) == pytest.approx(0.0, abs=1e-6) and float(v.std()) == pytest.approx(1.0, rel=1e-5)


# -- EPO (§13.1) --------------------------------------------------------------------------------

def test_epo_phase_weight_by_hand():
    assert epo_phase_weight(0.0) == pytest.approx(1.0)
    assert epo_phase_weight(0.25) == pytest.approx(1 - 0.2 * (1 - math.exp(-1)))
    assert epo_phase_weight(0.5) == pytest.approx(0.8)
    assert epo_phase_weight(0.75) == pytest.approx(0.8 * math.exp(-1.5))


def test_epo_smoothing_penalty_has_a_gradient_that_pulls_entropy_into_the_band():
    # H_bar = 1, band (0, 2): H = 3 is 1 above the band -> penalty p * 1 = 0.05. With c_H = c_S = 1 and
    # beta(0) = 1: loss = -(H - 0.05) and dL/dH = -(1 - 0.05) = -0.95; in band (H = 1.5) dL/dH = -1.
    # (The reference's constant penalty would leave dL/dH = -1 for both.)
    def run(h):
        ent = t([[h]], grad=True)
        loss, m = LOSSES["epo"](t([[0.0]]), t([[0.0]]), t([[0.0]]), t([[1.0]]), entropy=ent, turn=torch.tensor([[1]]),
                                stats={"h_bar": t([[1.0]]), "max_turn": 1}, entropy_coef=1.0, penalty=0.05,
                                progress=0.0)
        return float(loss.detach()), float(grad_of(loss, ent)), m

    loss, g, m = run(3.0)
    assert loss == pytest.approx(-(3.0 - 0.05)) and g == pytest.approx(-0.95)
    assert m["epo/out_of_band_frac"] == 1.0
    loss, g, _ = run(1.5)
    assert loss == pytest.approx(-1.5) and g == pytest.approx(-1.0)


def test_epo_history_is_a_running_mean_per_turn():
    prepare = LOSSES.hook("epo", "prepare")
    mask, turn = t([[1, 1]]), torch.tensor([[1, 1]])
    state: dict = {}
    for h in (1.0, 2.0):
        ctx = BatchContext(old_logp=t([[0, 0]]), adv=t([[0, 0]]), mask=mask, entropy=t([[h, h]]), turn=turn,
                           state=state)
        stats, state = prepare(ctx)
    assert stats["h_bar"].tolist() == [[1.5, 1.5]]
    assert state["turn_entropy"]["1"] == [3.0, 2]


# -- Clip-Cov / KL-Cov batch scope (§4) ---------------------------------------------------------

def test_clip_cov_batch_scope_picks_over_the_whole_batch():
    # 2 rows x 5 tokens: Cov = (logp - mean)(A - mean); with clip_ratio 0.25 floor(0.25 * 10) = 2 tokens
    # of those with 1 < Cov < 5 are picked, once per batch, whatever the micro-batches are
    logp = t([[-0.1, -0.2, -3.0, -4.0, -0.3], [-0.1, -5.0, -4.0, -0.2, -0.1]])
    adv = t([[1.0] * 5, [-1.0] * 5])
    mask = torch.ones(2, 5)
    ctx = BatchContext(old_logp=logp, adv=adv, mask=mask, entropy=torch.zeros(2, 5), turn=torch.ones(2, 5).long(),
                       generator=torch.Generator().manual_seed(0))
    stats, _ = LOSSES.hook("clip_cov", "prepare")(ctx, clip_ratio=0.25)
    mean = float(logp.mean())
    cov = [[(lp - mean) * a for lp, a in zip(row, arow)] for row, arow in zip(logp.tolist(), adv.tolist())]
    in_range = {(i, j) for i in range(2) for j in range(5) if 1 < cov[i][j] < 5}
    picked = {tuple(x) for x in stats["cov_picked"].nonzero().tolist()}
    assert len(picked) == 2 and picked <= in_range
    assert stats["cov_candidates"] == len(in_range)
    # the loss on row 1 alone zeroes exactly the picked tokens of row 1
    lp = logp[1:].clone().requires_grad_(True)
    loss, m = LOSSES["clip_cov"](lp, lp.detach(), adv[1:], mask[1:], stats={k: (v[1:] if torch.is_tensor(v) else v)
                                                                              for k, v in stats.items()})
    g = grad_of(loss, lp)[0]
    zeroed = {j for j in range(5) if g[j] == 0}
    assert zeroed == {j for (i, j) in picked if i == 1}
    assert m["cov/batch_scope"] == 1.0


def test_kl_cov_batch_scope_penalises_the_top_covariance_tokens():
    logp = t([[-0.1, -3.0], [-5.0, -0.2]])
    adv = t([[1.0, 1.0], [-1.0, -1.0]])
    ctx = BatchContext(old_logp=logp, adv=adv, mask=torch.ones(2, 2), entropy=torch.zeros(2, 2),
                       turn=torch.ones(2, 2).long())
    stats, _ = LOSSES.hook("kl_cov", "prepare")(ctx, kl_ratio=0.25)  # max(1, floor(0.5)) = 1 token
    # mean logp = -2.075, mean A = 0: Cov = (0.1 + ... ) -> largest is row 1 token 0: (-5 + 2.075)(-1) = 2.925
    assert stats["cov_picked"].tolist() == [[False, False], [True, False]]


# -- D3S (§12.2) and DART (§15) selection --------------------------------------------------------

def test_max_variance_subset_matches_brute_force_example():
    v = torch.tensor([0.0, 0.1, 0.2, 5.0, -3.0, 1.0])
    idx = set(max_variance_subset(v, 2).tolist())
    assert idx == {3, 4}  # the two extremes
    assert set(max_variance_subset(v, 6).tolist()) == set(range(6))


def test_d3s_sample_keep_ratio_follows_the_schedule():
    assert schedule(0.5, 1.0, 0.0) == 0.5 and schedule(0.5, 1.0, 0.5) == 0.75 and schedule(0.5, 1.0, 2.0) == 1.0
    assert schedule(0.5, 1.0, 0.5, "cosine") == pytest.approx(0.75)
    adv = torch.tensor([1.0, 0.9, -0.1, -1.2, 0.5, 0.5, -0.5, -0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    keep = SELECTORS["d3s_samples"](adv, groups, progress=0.0, start=0.5)  # ceil(0.5 * 4) = 2 per group
    assert keep[:4].tolist() == [True, False, False, True]
    assert int(keep[4:].sum()) == 2 and float(adv[4:][keep[4:]].sum()) == 0.0  # one +0.5, one -0.5
    assert bool(SELECTORS["d3s_samples"](adv, groups, progress=1.0).all())


def test_d3s_tokens_keep_the_largest_abs_advantage_times_entropy():
    ent = t([[1.0, 2.0, 3.0], [4.0, 0.1, 9.0]])
    adv = t([[1.0, 1.0, 1.0], [-0.5, -0.5, 0.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # scores 1, 2, 3, 2, 0.05 (the masked 0 * 9 is never picked); ceil(0.6 * 5) = 3 tokens
    keep = TOKEN_SELECTORS["d3s_tokens"](ent, mask, adv=adv, progress=0.0, start=0.6)
    assert keep.tolist() == [[False, True, True], [True, False, False]]


def test_dart_keeps_the_top_steps_by_mean_entropy():
    mask = t([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]])
    # steps: row 0 turn 1 mean 0.5, row 0 turn 2 mean 3, row 1 mean 1 -> keep ceil(2/3 * 3) = 2 steps
    ent = t([[0.0, 1.0, 0.0, 2.0, 4.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    keep = TOKEN_SELECTORS["high_entropy_steps"](ent, mask, top_ratio=2 / 3)
    assert keep.tolist() == [[False, False, False, True, True], [True, True, True, False, False]]


# -- truncated importance sampling (§16) --------------------------------------------------------

def test_rollout_correction_weights_by_hand():
    old = torch.log(t([[0.5, 0.2]]))
    roll = torch.log(t([[0.25, 0.4]]))  # rho = 2, 0.5
    mask = t([[1.0, 1.0]])
    w, m = rollout_correction_weights(old, roll, mask, mode="token_tis", cap=1.5)
    assert w.tolist()[0] == pytest.approx([1.5, 0.5])
    w, _ = rollout_correction_weights(old, roll, mask, mode="seq_tis", cap=1.5)
    assert w.tolist()[0] == pytest.approx([1.0, 1.0])  # product of ratios = 1
    w, _ = rollout_correction_weights(old, roll, mask, mode="icepop", cap=1.5, low=0.4)
    assert w.tolist()[0] == pytest.approx([0.0, 0.5])
    w, _ = rollout_correction_weights(old, roll, mask, mode="seq_mask_tis", cap=1.5, low=0.9)
    assert w.tolist()[0] == pytest.approx([2.0, 0.5])  # geometric mean 1 is in band; token factors unclamped
    assert m["rollout_corr/is_max"] == pytest.approx(1.5) and m["rollout_corr/ratio_frac_high"] == 0.5
    # a row without rollout log-probs falls back to weight 1
    w, _ = rollout_correction_weights(old, torch.zeros(1, 2), mask, mode="token_tis", cap=1.0)
    assert w.tolist()[0] == [1.0, 1.0]
