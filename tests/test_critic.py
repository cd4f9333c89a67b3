"""PPO's learned critic: GAE, the clipped value loss and explained variance on hand-computed numbers;
the critic learning its targets; warm-up, checkpoints and config errors; PPO raising a reward."""
import copy

import pytest
import torch

from forkrl.algos.losses import AggNorm
from forkrl.algos.values import (
    explained_variance,
    gae,
    gae_advantage,
    outcome_token_rewards,
    value_loss,
)
from forkrl.config import ConfigError, build_config
from forkrl.train import Trainer
from forkrl.train.batch import pack
from forkrl.train.critic import Critic
from forkrl.types import Trajectory
from tests.test_trainer import _cfg, _rows


def test_gae_by_hand():
    # gamma 0.9, lam 0.8, outcome 1 on the last token; terminal value 0
    #   d2 = 1 - 0.7 = 0.3                    A2 = 0.3
    #   d1 = 0.9*0.7 - 0.6 = 0.03             A1 = 0.03 + 0.72*0.3 = 0.246
    #   d0 = 0.9*0.6 - 0.5 = 0.04             A0 = 0.04 + 0.72*0.246 = 0.21712
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([0.21712, 0.246, 0.3], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.71712, 0.846, 1.0], abs=1e-6)


def test_gae_skips_unmasked_positions_and_pads():
    """An observation token between two turns is not an action: its reward and value are ignored and
    the chain runs across it; padding after the last action gets zeros."""
    rewards = torch.tensor([[0.0, 5.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 99.0, 0.6, 0.7, 3.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([0.21712, 0.0, 0.246, 0.3, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.71712, 0.0, 0.846, 1.0, 0.0], abs=1e-6)


def test_gae_over_marfts_flattened_agent_sequence():
    """MARFT-A (algorithms.md §19): two steps x two agents flattened as (t0,a1) (t0,a2) (t1,a1) (t1,a2);
    the environment reward goes to the last agent; gamma 0.5, lam 1:
      d(t1,a2) = 0.5 - 0.3 = 0.2                      A = 0.2
      d(t1,a1) = 0.5*0.3 - 0.1 = 0.05                 A = 0.05 + 0.5*0.2 = 0.15
      d(t0,a2) = 1 + 0.5*V(t1,a1) - 0.4 = 0.65        A = 0.65 + 0.5*0.15 = 0.725
      d(t0,a1) = 0.5*0.4 - 0.2 = 0                    A = 0.5*0.725 = 0.3625"""
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.5]])
    values = torch.tensor([[0.2, 0.4, 0.1, 0.3]])
    adv, ret = gae(rewards, values, torch.ones(1, 4), gamma=0.5, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.3625, 0.725, 0.15, 0.2], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.5625, 1.125, 0.25, 0.5], abs=1e-6)


def test_with_gamma_and_lambda_one_every_return_is_the_outcome():
    rewards = outcome_token_rewards(torch.tensor([2.0, -1.0]), torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0],
                                                                              [1.0, 0.0, 0.0, 0.0, 0.0]]))
    assert rewards.tolist() == [[0, 0, 0, 2, 0], [-1, 0, 0, 0, 0]]
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    _, ret = gae(rewards, torch.rand(2, 5), mask)
    assert ret.tolist() == [[2, 2, 0, 2, 0], [-1, 0, 0, 0, 0]]


def test_clipped_value_loss_by_hand():
    """Token 0: (1-2)^2 = 1 unclipped; clipped V = 0 + clip(1, +-0.5) = 0.5 -> (0.5-2)^2 = 2.25, the larger.
    Token 1: (0-0.1)^2 = 0.01 either way. loss = 0.5 * (2.25 + 0.01) / 2 = 0.565; clip fraction 1/2."""
    values = torch.tensor([[1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.2]])
    returns = torch.tensor([[2.0, 0.1]])
    loss, m = value_loss(values, old, returns, torch.ones(1, 2), clip=0.5)
    assert float(loss.detach()) == pytest.approx(0.565)
    assert m["critic/vf_clipfrac"] == pytest.approx(0.5) and m["critic/vpred_mean"] == pytest.approx(0.5)
    loss.backward()
    # token 0's clipped branch wins and is flat in V (clamped): no gradient; token 1: 0.5 * 2 * (0 - 0.1) / 2
    assert values.grad[0].tolist() == pytest.approx([0.0, -0.05])
    # unclipped: 0.5 * (1 + 0.01) / 2
    assert float(value_loss(values.detach(), old, returns, torch.ones(1, 2), clip=None)[0]) == pytest.approx(0.2525)
    # MARFT's Huber error, delta 1: token 0 clipped |x| = 1.5 > 1 -> 2*1*1.5 - 1 = 2; 0.5 * (2 + 0.01) / 2
    assert float(value_loss(values.detach(), old, returns, torch.ones(1, 2), clip=0.5, huber_delta=1.0)[0]) == pytest.approx(0.5025)


def test_explained_variance_by_hand():
    # R - V = [0, 0, 1]: var 1/3 (Bessel); var R = 1 -> 1 - 1/3
    ev = explained_variance(torch.tensor([[1.0, 2.0, 2.0, 9.0]]), torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
                            torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert ev == pytest.approx(2 / 3)
    assert explained_variance(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)) != explained_variance(
        torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))  # constant returns: nan


def test_gae_advantage_is_return_minus_value_whitened():
    values = torch.full((2, 2), 0.5)
    returns = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mask = torch.ones(2, 2)
    raw, _ = gae_advantage(torch.zeros(2), torch.arange(2), mask, values=values, returns=returns, whiten=False)
    assert raw.tolist() == [[0.5, 0.5], [-0.5, -0.5]]
    # mean 0, Bessel variance 4 * 0.25 / 3 = 1/3: 0.5 / sqrt(1/3) = 0.8660
    white, _ = gae_advantage(torch.zeros(2), torch.arange(2), mask, values=values, returns=returns)
    assert white.flatten().tolist() == pytest.approx([0.8660254, 0.8660254, -0.8660254, -0.8660254], abs=1e-6)


def _batch(tok):
    prompt = tok.encode("1+1=")
    trajs = [Trajectory(prompt_ids=prompt, tokens=tokens, logprobs=[0.0] * 3, entropies=[0.0] * 3, loss_mask=[1] * 3,
                        group="g", reward=reward)
             for tokens, reward in (([11, 12, 13], 1.0), ([21, 22, 23], 0.0), ([11, 30, 31], 1.0), ([21, 40, 41], 0.0))]
    return pack(trajs, tok.pad_token_id or 0)


def test_the_critic_learns_its_targets_and_its_state_round_trips(tiny):
    model, tok = tiny
    cfg = build_config({"algo": {"advantage": "gae", "critic": {"enabled": True, "lr": 1e-2}}}).algo.critic
    critic = Critic(copy.deepcopy(model), cfg)
    batch = _batch(tok)
    first = None
    for _ in range(25):
        b, m = critic.annotate(batch)
        first = first if first is not None else m
        loss, _ = critic.loss(b, AggNorm(), "token-mean")
        loss.backward()
        critic.step()
    assert first["critic/vf_explained_var"] == pytest.approx(0.0)  # the zero head: V = 0
    assert m["critic/vf_explained_var"] > 0.5, m
    fresh = Critic(copy.deepcopy(model), cfg)
    fresh.load_state_dict(critic.state_dict())
    assert torch.equal(fresh.values(batch), critic.values(batch))


def test_warm_up_trains_the_critic_only(tmp_path):
    cfg = _cfg(tmp_path, algo={"advantage": "gae", "critic": {"enabled": True, "warmup_steps": 1, "lr": 1e-2}},
               train={"steps": 2})
    trainer = Trainer(cfg)
    policy_before = copy.deepcopy(trainer.model.state_dict())
    critic_before = {k: v.clone() for k, v in trainer.learner.critic.forward.head.state_dict().items()}
    m1 = trainer.step()
    assert m1["critic/warmup"] == 1.0
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in policy_before.items())
    assert not torch.equal(critic_before["weight"], trainer.learner.critic.forward.head.weight)
    m2 = trainer.step()
    assert m2["critic/warmup"] == 0.0
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in policy_before.items())


def test_config_pairs_the_critic_with_its_reader():
    with pytest.raises(ConfigError, match="algo.critic.enabled: true"):
        build_config({"algo": {"advantage": "gae"}})
    with pytest.raises(ConfigError, match="use algo.advantage: gae"):
        build_config({"algo": {"advantage": "grpo", "critic": {"enabled": True}}})
    with pytest.raises(ConfigError, match="value_clip"):
        build_config({"algo": {"advantage": "gae", "critic": {"enabled": True, "value_clip": -1}}})


def test_ppo_with_a_critic_raises_a_learnable_reward(tmp_path):
    cfg = _cfg(tmp_path, algo={"advantage": "gae", "critic": {"enabled": True, "lr": 1e-3}},
               train={"steps": 28, "lr": 3e-2, "mini_batches": 2})
    Trainer(cfg).train()
    rows = _rows(cfg)
    rewards = [r["reward/mean"] for r in rows]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.2, " ".join(f"{r:.2f}" for r in rewards)
    # the critic follows the rising returns: its error falls and its values rise from the zero head
    vf = [r["critic/vf_loss"] for r in rows]
    assert sum(vf[-4:]) < 0.5 * sum(vf[:4]), vf
    assert rows[-1]["critic/values/mean"] > 0.5 * rows[-1]["critic/returns/mean"] > 0, rows[-1]


def test_a_resumed_ppo_run_repeats_the_uninterrupted_one(tmp_path):
    """The critic's weights and optimizer are in the checkpoint: stopped after step 2 and resumed,
    steps 3 and 4 match the straight run's."""
    algo = {"advantage": "gae", "critic": {"enabled": True, "lr": 1e-3}}
    train = {"steps": 4, "checkpoint_every": 1, "mini_batches": 2}
    straight_cfg = _cfg(tmp_path, "straight", algo=algo, train=train)
    Trainer(straight_cfg).train()
    cfg = _cfg(tmp_path, "stopped", algo=algo, train=train)
    first = Trainer(cfg)
    first.loop.on_step.append(lambda loop, step, metrics: step == 2 and loop.request_stop())
    with pytest.raises(KeyboardInterrupt):
        first.train()
    Trainer(cfg).train(resume=True)
    keys = ("reward/mean", "loss", "critic/vf_loss", "critic/values/mean", "critic/vf_explained_var")
    want = [[r[k] for k in keys] for r in _rows(straight_cfg)]
    got = [[r[k] for k in keys] for r in _rows(cfg)]
    assert got == want
