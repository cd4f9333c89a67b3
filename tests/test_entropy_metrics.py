"""Entropy statistics, the entropy–reward law fit, and the evaluation estimators."""
import itertools
import math

import numpy as np
import pytest
import torch

from forkrl.metrics.entropy import entropy_stats, fit_entropy_law, post_tool_mask
from forkrl.metrics.evaluate import majority_vote, pass_at_k, wilson_interval
from forkrl.types import Trajectory


def test_law_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    H = rng.uniform(0.1, 2.0, 40)
    R = -0.05 * np.exp(H) + 0.8 + rng.normal(0, 0.005, 40)
    law = fit_entropy_law(H.tolist(), R.tolist())
    assert law.a == pytest.approx(0.05, abs=3 * law.a_se + 1e-3) and law.b == pytest.approx(0.8, abs=3 * law.b_se + 1e-3)
    assert law.ceiling == pytest.approx(0.75, abs=3 * law.ceiling_se + 1e-3)
    assert law.ceiling_se < 0.01 and law.predict(0.0) == pytest.approx(law.ceiling)
    exact = fit_entropy_law([0.0, 1.0, 2.0], [-0.1 + 0.6, -0.1 * math.e + 0.6, -0.1 * math.e ** 2 + 0.6])
    assert (exact.a, exact.b) == (pytest.approx(0.1), pytest.approx(0.6)) and exact.a_se == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError):
        fit_entropy_law([1.0, 1.0, 1.0], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("n,k", [(n, k) for n in range(1, 7) for k in range(1, n + 1)])
def test_pass_at_k_matches_brute_force(n, k):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_post_tool_entropy_uses_the_first_k_tokens_after_each_observation():
    mask = [1, 1, 0, 0, 1, 1, 1, 0, 1]
    assert post_tool_mask(mask, k=2) == [False, False, False, False, True, True, False, False, True]
    ent = [1.0, 1.0, float("nan"), float("nan"), 3.0, 3.0, 1.0, float("nan"), 3.0]
    t = Trajectory([1], list(range(9)), [0.0] * 9, ent, mask, "g")
    s = entropy_stats([t], post_tool_k=2)
    assert s["entropy/after_tool"] == 3.0 and s["entropy/elsewhere"] == 1.0
    assert s["entropy/mean"] == pytest.approx((1 + 1 + 3 + 3 + 1 + 3) / 6)
    assert s["entropy/high_frac"] == pytest.approx(3 / 6)
    assert s["entropy/pos_0_8"] == pytest.approx(2.0)   # positions count generated tokens only


def test_majority_vote_and_wilson_interval():
    assert majority_vote(["7", "8", "7", None], [1, 0, 1, 0]) == 1
    assert majority_vote(["8", "7", "8"], [0, 1, 0]) == 0
    assert majority_vote([None, None], [0, 0]) == 0
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-3), pytest.approx(0.7634, abs=1e-3))


def test_training_logs_entropy_statistics_and_refits_the_law(tmp_path):
    from forkrl.train import Trainer
    from tests.test_trainer import _cfg, _rows
    cfg = _cfg(tmp_path, train={"steps": 4}, eval={"at_start": False, "every": 1, "size": 4})
    trainer = Trainer(cfg)
    trainer.train()
    rows = _rows(cfg)
    assert all("entropy/p90" in r and "entropy/pos_0_8" in r and "entropy/cov_logp_adv" in r for r in rows)
    assert "law/ceiling" in rows[2] and "law/headroom" in rows[2]
    # three evaluations during training, and the final one after it
    assert len(trainer.loop.law_points) == 4


def test_first_order_entropy_change_by_hand():
    from forkrl.train.learner import entropy_change
    # pi = (1/2, 1/4, 1/4): H = 1.5 ln 2 = 1.0397; log pi - E[log pi] = (+0.3466, -0.3466, -0.3466).
    # The first logit moves by +0.01: predicted dH = -(1/2)(0.3466)(0.01) = -0.001733.
    before = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    after = torch.log_softmax(before + torch.tensor([[0.01, 0.0, 0.0]]), -1)
    out = entropy_change(before, after)
    assert out["entropy/delta_predicted"] == pytest.approx(-0.5 * 0.5 * math.log(2) * 0.01, rel=1e-4)
    # the exact change differs from the first-order one only at second order in the step
    h = lambda lp: float(-(lp.exp() * lp).sum())
    assert out["entropy/delta_measured"] == pytest.approx(h(after) - h(before), abs=1e-7)
    assert abs(out["entropy/delta_measured"] - out["entropy/delta_predicted"]) < 1e-4


def test_training_logs_predicted_next_to_measured_entropy_change(tmp_path):
    from forkrl.train import Trainer
    from tests.test_trainer import _cfg, _rows
    # a small step: the first-order prediction must track the measured change state by state
    cfg = _cfg(tmp_path, train={"steps": 3, "lr": 1e-6}, log={"entropy_probe_tokens": 64})
    Trainer(cfg).train()
    rows = _rows(cfg)
    for r in rows:
        measured, predicted = r["entropy/delta_measured"], r["entropy/delta_predicted"]
        assert measured != 0 and abs(measured - predicted) < 0.2 * abs(measured), (measured, predicted)
        assert r["entropy/delta_state_corr"] > 0.9
