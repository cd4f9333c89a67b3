"""Trainer-level methods: FAPO's flaw detectors, SPEAR's replay buffer, Arbitrary-Entropy PO's samples,
and the learner rows they add (fixed advantages, replay terms, statistics-only rows)."""
import json

import pytest
import torch

from forkrl.config import ReplayConfig, build_config
from forkrl.tasks.flaws import (
    GenerativeFlawDetector,
    eval_arithmetic,
    rule_based_flaws,
    split_steps,
)
from forkrl.train import Trainer
from forkrl.train.replay import ReplayBuffer, cosine_decay, cosine_ramp
from forkrl.types import Trajectory
from tests.test_trainer import _cfg, _rows

# -- FAPO (§13.5) -------------------------------------------------------------------------------

def test_rule_detector_finds_the_first_false_claim():
    assert rule_based_flaws("", "3 + 4 = 8\nSo the answer is 7.") == 0
    assert rule_based_flaws("", "First, 2 * 3 = 6. Then 6 + 1 = 8. So 7.") == 1
    assert rule_based_flaws("", "3 + 4 = 7\nThe answer is 7.") == -1
    assert rule_based_flaws("", "<answer>7</answer>\nOr maybe <answer>8</answer>") == 1
    assert rule_based_flaws("", "12 x 3 = 36 and 10 / 4 = 2.5") == -1


def test_arithmetic_is_evaluated_without_eval():
    assert eval_arithmetic("(2 + 3) * 4") == 20.0
    assert eval_arithmetic("__import__('os').system('true')") is None
    assert eval_arithmetic("1 / 0") is None
    assert eval_arithmetic("9 ** 9 ** 9") is None  # not an allowed operator


def test_generative_detector_builds_the_prompt_and_parses_the_step():
    seen = []

    def generate(prompts):
        seen.extend(prompts)
        return ["The error is in step 1", "no errors: -1", "I am not sure"]

    det = GenerativeFlawDetector(generate)
    completion = "3 + 4 = 8\nSo 7."
    out = det.batch(["What is 3+4?"] * 3, [completion] * 3, ["7"] * 3)
    assert out == [1, -1, -1]
    assert "0. 3 + 4 = 8" in seen[0] and "Reference answer: 7" in seen[0]
    assert split_steps(completion) == ["3 + 4 = 8", "So 7."]


def test_fapo_penalises_only_correct_flawed_rollouts(tmp_path):
    cfg = _cfg(tmp_path, task={"rewards": [{"name": "correct"}],
                               "reward_terms": [{"name": "flawed_positive", "penalty": 1.0}]})
    trainer = Trainer(cfg)
    sample = trainer.task.train[0]
    sample.answer = "7"
    texts = ["3 + 4 = 8\nSo 7", "3 + 4 = 7\nSo 7", "3 + 4 = 8\nSo 8"]
    trajs = [Trajectory([1], [2], [0.0], [1.0], [1], "g", text=x, sample=sample) for x in texts]
    trainer.source.score(trajs, step=1)
    assert [t.rewards["flawed_positive"] for t in trajs] == [-1.0, 0.0, 0.0]
    assert [t.reward for t in trajs] == [0.0, 1.0, 0.0]


# -- SPEAR (§13.4) ------------------------------------------------------------------------------

def _traj(reward, group="g"):
    return Trajectory([1], [2, 3], [-0.1, -0.2], [1.0, 1.0], [1, 1], group, reward=reward)


def test_replay_buffer_stores_successes_recalibrates_and_ages_out():
    buf = ReplayBuffer(ReplayConfig(enabled=True, adv_threshold=1.0, max_age=2, batch_size=10))
    added = buf.add(1, [_traj(1.0), _traj(0.0), _traj(0.5)], [1.2, -1.0, 0.4])
    assert added == 1
    # baseline = median of the rewards seen (1, 0, 0.5) = 0.5 -> A~ = 1 - 0.5
    out, stats = buf.sample(2, seed=0)
    assert len(out) == 1 and out[0].advantage == pytest.approx(0.5) and out[0].source == "replay"
    assert stats["replay/baseline"] == pytest.approx(0.5)
    out, _ = buf.sample(4, seed=0)  # 4 - 1 > max_age: gone
    assert out == [] and len(buf.entries) == 0


def test_replay_keeps_only_positive_recalibrated_advantages():
    buf = ReplayBuffer(ReplayConfig(enabled=True, adv_threshold=1.0))
    buf.add(1, [_traj(1.0)] + [_traj(2.0)] * 5, [1.5] + [0.0] * 5)
    out, stats = buf.sample(1, seed=0)  # median reward 2 > 1: A~ = -1, dropped
    assert out == [] and stats["replay/candidates"] == 0


def test_cosine_schedules():
    assert cosine_ramp(0, 200, 1.0) == 0.0 and cosine_ramp(100, 200, 1.0) == pytest.approx(0.5)
    assert cosine_ramp(300, 200, 1.0) == 1.0 and cosine_decay(0, 200, 0.1) == pytest.approx(0.1)


def test_replay_rows_are_a_separate_loss_term(tmp_path):
    """With replay_coef = 0 the update equals the update without the replay rows; with 1 it differs."""
    grads = []
    for coef, with_replay in ((0.0, True), (1.0, False), (1.0, True)):
        cfg = _cfg(tmp_path, train={"steps": 1, "lr": 1e-3})
        trainer = Trainer(cfg)
        collector = trainer.source
        trajs = collector.rollout(collector.fresh_prompts(2), seed=0, tag="s1")
        collector.score(trajs, step=1)
        extra = []
        if with_replay:
            extra = [Trajectory(**{**t.__dict__, "advantage": 1.0, "source": "replay", "group": "replay/x"})
                     for t in trajs[:3]]
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.learner.update(trajs + extra, 1, replay_coef=coef)
        grads.append([p.detach() - b for p, b in zip(trainer.model.parameters(), before)])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[0], grads[1]))
    assert any(not torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[2], grads[1]))


def test_stats_only_rows_shape_the_group_but_do_not_train(tmp_path):
    cfg = _cfg(tmp_path, train={"steps": 1})
    trainer = Trainer(cfg)
    rows = [Trajectory([5, 6], [7, 8], [-1.0, -1.0], [1.0, 1.0], [1, 1], "g", reward=r) for r in (1.0, 0.0, 0.0)]
    rows[2].source = "stats_only"
    from forkrl.train.learner import pack
    batch, adv, _ = trainer.learner.advantages(pack(rows, 0), 0.0)
    assert len(batch) == 2
    # group (1, 0, 0): mean 1/3, std sqrt(1/3): A = (2/3) / 0.57735, (-1/3) / 0.57735
    assert adv[:, 0].tolist() == pytest.approx([(2 / 3) / (1 / 3) ** 0.5, (-1 / 3) / (1 / 3) ** 0.5], rel=1e-4)


# -- Arbitrary-Entropy PO (§13.3) ---------------------------------------------------------------

def test_entropy_target_samples_hotter_below_target_and_colder_above(tmp_path):
    for target, temperature in ((100.0, 1.2), (0.0, 0.8)):
        cfg = _cfg(tmp_path, f"t{target}", train={"steps": 3},
                   rollout={"gates": [{"name": "entropy_target", "target": target, "adv_threshold": -10}]})
        Trainer(cfg).train()
        rows = _rows(cfg)
        assert "entropy_target/temperature" not in rows[0]  # no update has reported an entropy yet
        assert rows[1]["entropy_target/temperature"] == temperature
        assert rows[1]["entropy_target/rows"] > 0


def test_sampling_logprobs_are_refused_with_other_temperatures():
    with pytest.raises(Exception, match="old_logprobs='sampling'"):
        build_config({"train": {"old_logprobs": "sampling"}, "rollout": {"adaptive_temperature": {"enabled": True}}})
    with pytest.raises(Exception, match="old_logprobs='sampling'.*entropy_target"):  # the gate's own check
        build_config({"train": {"old_logprobs": "sampling"}, "rollout": {"gates": ["entropy_target"]}})


def test_method_state_survives_a_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, train={"steps": 2}, algo={"loss": "epo", "replay": {"enabled": True, "adv_threshold": 0.5}},
               rollout={"adaptive_temperature": {"enabled": True}})
    trainer = Trainer(cfg)
    trainer.train()
    again = Trainer(cfg)
    assert again.resume()
    assert again.learner.state == trainer.learner.state and "turn_entropy" in again.learner.state
    # the policy feedback (HAPO's entropy statistics) reaches the resumed collector
    assert again.learner.feedback == trainer.learner.feedback and again.learner.feedback.entropy_stats
    assert again.source.feedback == trainer.learner.feedback
    assert len(again.learner.replay.entries) == len(trainer.learner.replay.entries) > 0
    json.dumps(again.learner.state_dict()["feedback"])


def test_entropy_target_replaces_rows_with_positive_samples_by_hand():
    """8 batch rows of 2 prompts; the extra group (1 prompt = ceil(0.25 * 2)) has rewards 1, 0, 1, 0:
    GRPO advantages +-0.866 -> 2 kept with advantage 1. Below target: n_reg = min(60, 2, 8) = 2 rows
    replaced; above target: half of that, 1 row."""
    from forkrl.collect import CollectContext
    from forkrl.collect.gates import entropy_target
    from forkrl.types import PolicyFeedback, Sample

    class FakeRefill:
        def resample(self, samples, n=None, *, sub, tag, temperature=None, observe=True):
            asked.update(prompts=len(samples), temperature=temperature, observe=observe)
            return [[_traj(r, group="extra") for r in (1.0, 0.0, 1.0, 0.0)]]

    for entropy, n_reg, temperature in ((0.1, 2, 1.2), (0.9, 1, 0.8)):
        samples = [Sample(id=str(i), prompt=f"p{i}") for i in range(2)]
        groups = [[_traj(0.0, group=f"g{i}") for _ in range(4)] for i in range(2)]
        for g, s in zip(groups, samples):
            for t in g:
                t.sample = s
        asked = {}
        ctx = CollectContext(step=1, prompts_per_step=2, samples_per_prompt=4, max_new_tokens=8, answer_tag="answer",
                             feedback=PolicyFeedback(policy_entropy=entropy), seed_of=lambda sub: sub)
        out, stats = entropy_target(groups, FakeRefill(), ctx, target=0.5)
        flat = [t for g in out for t in g]
        assert asked == {"prompts": 1, "temperature": temperature, "observe": False}
        assert stats["entropy_target/kept"] == 2 and stats["entropy_target/rows"] == n_reg
        assert [t.source for t in flat[:n_reg]] == ["stats_only"] * n_reg
        assert [t.source for t in flat[n_reg:8]] == ["policy"] * (8 - n_reg)
        assert [(t.advantage, t.group) for t in flat[8:]] == [(1.0, "extra")] * n_reg
        assert len(flat) == 8 + n_reg


def test_tool_rollouts_train_end_to_end_with_a_simulated_search(tmp_path):
    """One step with tools on the tiny model: a frozen copy of the policy writes the search documents."""
    cfg = _cfg(tmp_path, train={"steps": 1}, rollout={"max_new_tokens": 6},
               env={"enabled": True, "tools": [{"name": "simulated_search", "noise": 0.5}, "calculator"],
                    "max_turns": 2, "max_total_tokens": 40})
    trainer = Trainer(cfg)
    assert set(trainer.env.tools) == {"search", "calculator"}
    docs = trainer.env.tools["search"]("where is Tesk")
    assert isinstance(docs.text, str)
    trainer.train()
    row = _rows(cfg)[0]
    assert {"tools/use_frac", "tools/search_calls_per_traj", "finish/length_frac"} <= set(row)
