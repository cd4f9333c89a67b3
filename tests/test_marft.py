"""MARFT's action-level pieces (algorithms.md §19) on hand-computed numbers: the action log-prob and
its normalisations, and MARFT-A's clipped action-level ratio. Its flattened GAE across agents is
tested in tests/test_critic.py."""
import math

import pytest
import torch

from forkrl.algos.marft import action_logprob, action_ppo


def test_action_logprob_normalisations():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert action_logprob(logp, mask).tolist() == [-6.0, -1.0]                       # sum (default)
    assert action_logprob(logp, mask, mode="token").tolist() == [-2.0, -0.5]         # / tokens
    assert action_logprob(logp, mask, mode="word", words=torch.tensor([2, 4])).tolist() == [-3.0, -0.25]
    with pytest.raises(ValueError, match="word count"):
        action_logprob(logp, mask, mode="word")


def test_action_level_ratio_is_clipped_per_action():
    """Row 0: log-ratio of the action = (-1+1.1) + (-1+1.1) = 0.2 -> r = e^0.2 = 1.2214 > 1.2, A = +1:
    min(1.2214, 1.2) = 1.2. Row 1: log-ratio -0.1 -> r = 0.9048, A = -2: min(-1.8097, -1.8097) (inside
    the clip) -> -1.8097. L = -(1.2 - 1.8097) / 2 = 0.30484."""
    logp = torch.tensor([[-1.0, -1.0], [-0.6, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.1], [-0.5, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, m = action_ppo(logp, old, adv, mask, clip=0.2)
    assert float(loss.detach()) == pytest.approx(-(1.2 - 2 * math.exp(-0.1)) / 2, abs=1e-6)
    assert m["marft/clip_frac"] == 0.5
    loss.backward()
    # row 0 is clipped (no gradient); row 1: d/dlogp of -(r * A)/2 = -(A r)/2 = 0.9048 on its one token
    assert logp.grad[0].tolist() == [0.0, 0.0]
    assert logp.grad[1].tolist() == pytest.approx([math.exp(-0.1), 0.0], abs=1e-6)
