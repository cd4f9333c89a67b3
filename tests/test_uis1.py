"""UI-S1 semi-online RL (algorithms.md §18): step rewards, patch-cut discounted returns and the combined
advantage by hand; the patched replay on a scripted engine; SOP."""
import pytest
import torch

from forkrl.algos.advantages import step_discounted_returns, uis1
from forkrl.rollout.semi_online import SemiOnlineSampler
from forkrl.tasks.semi_online import action_score, expert_text, step_reward
from forkrl.types import Completion, EngineStats, Sample, SamplingParams

SEARCH = {"type": "search", "arg": "Tesk Mills founder", "key": "Tesk Mills"}
ANSWER = {"type": "answer", "arg": "Kelholm", "key": "Kelholm"}


@pytest.mark.parametrize("text, score", [
    ("<think>t</think><action>search: who founded Tesk Mills?</action>", 1.0),   # names the key entity
    ("<think>t</think><action>search: Ora Vin</action>", 0.5),                   # the type only
    ("<think>t</think><action>answer: Kelholm</action>", 0.1),                   # parses, other type
    ("<think>t</think><action>jump: x</action>", 0.0),                           # unknown type: no parse
    ("search Tesk Mills", 0.0),
])
def test_action_scores(text, score):
    assert action_score(text, SEARCH) == score


def test_step_reward_by_hand():
    assert step_reward("<think>go</think><action>answer: kelholm</action>", ANSWER) == pytest.approx(1.0)
    assert step_reward("<action>answer: Kelholm</action>", ANSWER) == pytest.approx(0.9)       # no thought
    assert step_reward("<think> </think><action>answer: Bralport</action>", ANSWER) == pytest.approx(0.45)


def test_discounted_returns_are_cut_at_patched_steps():
    # one episode, steps 0-2, gamma 0.5
    steps = torch.tensor([[0, 0, 1], [0, 1, 1], [0, 2, 0]])
    # t2 mismatched: G2 = 0.1; G1 = 1 + 0.5 * 0.1 = 1.05; G0 = 0.55 + 0.5 * 1.05 = 1.075
    assert step_discounted_returns(torch.tensor([0.55, 1.0, 0.1]), steps, 0.5).tolist() == pytest.approx([1.075, 1.05, 0.1])
    # t1 mismatched: G2 = 1; G1 = 0.1 (the chain restarts, t2's credit stays behind the patch); G0 = 1.05
    steps = torch.tensor([[0, 0, 1], [0, 1, 0], [0, 2, 1]])
    assert step_discounted_returns(torch.tensor([1.0, 0.1, 1.0]), steps, 0.5).tolist() == pytest.approx([1.05, 0.1, 1.0])


def test_combined_advantage_by_hand():
    """One task, episodes A (steps 0, 1: rewards 1, 1, matched) and B (step 0: reward 0.1, mismatched).
    G: A = [1.5, 1.0], B = [0.1].
    A^S, groups (task, t): t=0 {1.5, 0.1}: mean 0.8, std 0.98995 -> +-0.70711; t=1 {1.0}: a group of one
         gets mean 0, std 1 -> 1.0.
    A^E: episode rewards per row [2, 2, 0.1]: mean 1.36667, std 1.09697 -> 0.57735, 0.57735, -1.15470."""
    rewards = torch.tensor([1.0, 1.0, 0.1])
    steps = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 0, 0]])
    adv, m = uis1(rewards, torch.zeros(3, dtype=torch.long), torch.ones(3, 2), steps=steps, gamma=0.5)
    assert adv[:, 0].tolist() == pytest.approx([0.57735 + 0.70711, 0.57735 + 1.0, -1.15470 - 0.70711], abs=1e-4)
    assert m["uis1/matched_frac"] == pytest.approx(2 / 3)
    only_step, _ = uis1(rewards, torch.zeros(3, dtype=torch.long), torch.ones(3, 1), steps=steps, gamma=0.5,
                        w_episode=0.0, normalization="mean_norm")
    assert only_step[:, 0].tolist() == pytest.approx([0.7, 1.0, -0.7], abs=1e-6)   # means only: 1.5-0.8, 1-0, 0.1-0.8


class Tokens:
    """A stand-in tokenizer: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(ch) for ch in text]}


class ScriptedEngine:
    """Replies from a script, one list of texts per call (in the order of the live rollouts)."""

    def __init__(self, script):
        self.script, self.calls, self.stats = list(script), [], EngineStats()

    def generate(self, requests, seed=0):
        texts = self.script.pop(0)
        assert len(texts) == len(requests)
        self.calls.append([r.prompt_ids for r in requests])
        return [[Completion([ord(ch) for ch in t], [0.0] * len(t), [0.0] * len(t), "stop", t)] for t in texts]


STEPS = [
    {"thought": "find the founder", "action": SEARCH, "observation": "[1] Tesk Mills: founded by Ora Vin."},
    {"thought": "where Ora Vin was born", "action": {"type": "search", "arg": "Ora Vin born", "key": "Ora Vin"},
     "observation": "[1] Ora Vin: born in Kelholm."},
    {"thought": "done", "action": ANSWER, "observation": ""},
]
RIGHT0, WRONG = "<think>a</think><action>search: Tesk Mills</action>", "<think>b</think><action>search: nothing</action>"
RIGHT2 = "<think>c</think><action>answer: Kelholm</action>"


def test_the_patch_module_replays_with_own_history_and_patches():
    """Two rollouts, patch_threshold 1. r0: right, wrong (patched), right; r1: wrong (patched), wrong
    (no patches left: it ends)."""
    engine = ScriptedEngine([[RIGHT0, WRONG], [WRONG, WRONG], [RIGHT2]])
    sample = Sample(id="q", prompt="In which city...", answer="Kelholm", columns={"steps": STEPS})
    prompt = [1, 2, 3]
    groups, stats = SemiOnlineSampler.replay(engine, Tokens(), [prompt], [sample], SamplingParams(n=2), 0, 0, 1)
    got = [(t.episode_step.episode, t.episode_step.index, t.episode_step.matched) for t in groups[0]]
    assert got == [("r0", 0, True), ("r1", 0, False), ("r0", 1, False), ("r1", 1, False), ("r0", 2, True)]
    assert stats["semi_online/patches"] == 2.0
    enc = lambda s: Tokens()(s)["input_ids"]  # noqa: E731
    obs0, obs1 = enc("\n<information>" + STEPS[0]["observation"] + "</information>\n"), \
        enc("\n<information>" + STEPS[1]["observation"] + "</information>\n")
    # step 1: r0 continues its own step 0; r1 continues the expert's step 0 (patched)
    assert engine.calls[1] == [prompt + enc(RIGHT0) + obs0, prompt + enc(expert_text(STEPS[0])) + obs0]
    # step 2: r0's history holds its own step 0 and the expert's step 1
    assert engine.calls[2] == [prompt + enc(RIGHT0) + obs0 + enc(expert_text(STEPS[1])) + obs1]
    # each step sample is scored against its own expert action
    assert [t.sample.columns["expert_action"]["type"] for t in groups[0]] == ["search"] * 4 + ["answer"]


def test_sop_stops_at_the_first_mismatch():
    engine = ScriptedEngine([[RIGHT0, WRONG], [WRONG]])
    sample = Sample(id="q", prompt="In which city...", answer="Kelholm", columns={"steps": STEPS})
    generate = SemiOnlineSampler().evaluation_rollout(engine, Tokens())
    out = generate([[1]], [sample], SamplingParams(n=2), 0)
    assert [t.reward for t in out[0]] == pytest.approx([1 / 3, 0.0]) and [t.text for t in out[0]] == ["", ""]
    engine = ScriptedEngine([[RIGHT0], ["<think>x</think><action>search: Ora Vin born</action>"], [RIGHT2]])
    done = SemiOnlineSampler().evaluation_rollout(engine, Tokens())([[1]], [sample], SamplingParams(n=1), 0)
    assert done[0][0].reward == 1.0 and done[0][0].text == "<answer>Kelholm</answer>"
