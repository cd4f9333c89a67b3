"""Samplers: ARPO's branching rule and slot accounting on a scripted engine and tool, LATR's branch
rule, similarity measures and pruning on a deterministic engine, tree advantages by hand, and every
sampler through the trainer on the tiny model."""
import math
import random

import pytest
import torch

from forkrl.algos import ADVANTAGES
from forkrl.rollout import SamplerContext, SamplingParams, build_sampler, run_sampler
from forkrl.rollout.arpo import branch_count, segment_entropy
from forkrl.rollout.engine import EngineStats
from forkrl.rollout.latr import edit_distance, rouge_l, suffix_match, valid_candidates
from forkrl.train.learner import pack
from forkrl.types import Completion, Trajectory
from tests.slot_engine import SlotEngine, StreamingSlotEngine
from tests.test_envs import CharTokenizer, ScriptedEngine, _env


class VocabTokenizer(CharTokenizer):
    vocab_size = 256


class EntropyScript(ScriptedEngine):
    """Scripted turns whose tokens carry a per-turn entropy."""
    def __init__(self, turns, entropies):
        super().__init__(turns)
        self.entropies, self.stats, self.eos_ids = entropies, EngineStats(), [0]

    def generate(self, requests, seed=None):
        out = super().generate(requests, seed)
        for r, (c,) in zip(requests, out):
            c.entropies = [self.entropies[min(self._turn(r), len(self.entropies) - 1)]] * len(c.token_ids)
            self.stats.decode_tokens += len(c.token_ids)
        return out


def test_arpo_branch_rule_by_hand():
    # P(branch) = clamp(tau + w dH, 0, 1): u - w dH <= tau
    assert branch_count(0.5, [0.55, 0.65, 0.1], tau=0.5, weight=0.2, free=5) == 2   # threshold 0.6
    assert branch_count(0.5, [0.55, 0.65, 0.1], tau=0.5, weight=0.2, free=1) == 1   # slots cap it
    assert branch_count(-3.0, [0.01], tau=0.5, weight=0.2, free=5) == 0             # 0.01 + 0.6 > 0.5
    # exact entropy: sum over the first k tokens / ln|V|; top-k: -sum p log p over the listed candidates
    assert segment_entropy([1.0, 2.0, 3.0], k=2, vocab_size=100) == pytest.approx(3.0 / math.log(100))
    top = [[(1, math.log(0.5)), (2, math.log(0.5))]]
    assert segment_entropy([9.0], k=20, vocab_size=100, top_logprobs=top) == pytest.approx(math.log(2) / math.log(100))


TURNS = ["a<echo>x</echo>", "b<echo>y</echo>", "<answer>1</answer>"]


def _arpo(params, engine, M, seed=0):
    sampler = build_sampler("arpo", params)
    ctx = SamplerContext(env=_env(max_turns=4), tokenizer=VocabTokenizer())
    return run_sampler(sampler, engine, [[ord(c) for c in "Q?"]], SamplingParams(max_tokens=100, n=M), seed, ctx)


def test_arpo_branches_when_entropy_rises_after_a_tool_result():
    # tau = 0, w = 1: branch iff u <= dH. Turn 1 sets H_init (dH = 0: no branch); turn 2's tokens
    # are far more uncertain (dH = 20 * (3 - 1) / ln 256 = 7.2): every live trajectory branches.
    engine = EntropyScript(TURNS, entropies=[1.0, 3.0, 1.0])
    (group,), budget = _arpo({"initial": 2, "tau": 0.0, "entropy_weight": 1.0}, engine, M=4)
    assert len(group) == 4 and [t.parent for t in group] == [None, None, 0, 1]
    after_turn2 = group[0].tool_calls[1].span[1]   # the end of the second tool result
    for child in group[2:]:
        parent = group[child.parent]
        assert child.branch_at == after_turn2 and child.tokens[:after_turn2] == parent.tokens[:after_turn2]
        assert child.finish == "answer" and child.loss_mask[:after_turn2] == parent.loss_mask[:after_turn2]
    assert budget.branch_points == 2 and budget.extra["arpo/branches"] == 2
    # the shared prefix becomes one token key per position in the packed batch
    for t in group:
        t.group = "g"
    origin = pack(group, 0).token_origin
    assert torch.equal(origin[2, :after_turn2], origin[0, :after_turn2])
    assert not torch.equal(origin[2, after_turn2:len(group[2].tokens)], origin[0, after_turn2:len(group[2].tokens)])


def test_arpo_slots_never_exceed_m_and_follow_the_seeded_draws():
    for seed in range(5):
        engine = EntropyScript(TURNS, entropies=[1.0, 1.5, 1.0])
        params = {"initial": 2, "tau": 0.3, "entropy_weight": 0.5, "branches_per_step": 3}
        (group,), budget = _arpo(params, engine, M=5, seed=seed)
        assert len(group) <= 5
        # replay the rule with the same draws: turn 1 (dH = 0) then turn 2 (dH = 20 * 0.5 / ln 256)
        rng, live, count, expected = random.Random(seed), 2, 2, 0
        for dh in (0.0, 20 * 0.5 / math.log(256)):
            born = 0
            for _ in range(live):
                if count >= 5:
                    break
                k = branch_count(dh, [rng.random() for _ in range(3)], 0.3, 0.5, 5 - count)
                count, born = count + k, born + k
            expected, live = expected + born, live + born
        assert budget.extra["arpo/branches"] == expected, seed


def test_arpo_fills_in_fresh_trajectories_when_every_path_ends():
    engine = EntropyScript(["<answer>1</answer>"], entropies=[1.0])
    (group,), budget = _arpo({"initial": 1, "tau": 0.5}, engine, M=4)
    assert len(group) == 4 and all(t.parent is None for t in group)
    assert budget.extra["arpo/fill_ins"] == 3 and budget.extra["arpo/branches"] == 0


class FirstTurnScript(EntropyScript):
    """A fresh trajectory's first turn is the k-th of `first` for the k-th one its prompt starts;
    later turns follow TURNS by the number of tool results so far. Counts the tools it sees run."""
    def __init__(self, first):
        super().__init__(TURNS, entropies=[1.0])
        self.first, self.started = first, {}

    def generate(self, requests, seed=None):
        out = super().generate(requests, seed)
        for r, (c,) in zip(requests, out):
            if self._turn(r) == 0:
                k = self.started[tuple(r.prompt_ids)] = self.started.get(tuple(r.prompt_ids), -1) + 1
                text = self.first[min(k, len(self.first) - 1)]
                c.token_ids, c.text, c.finish = [ord(ch) for ch in text], text, "stop" if "<echo>" in text else "eos"
                c.logprobs, c.entropies = [-0.5] * len(text), [1.0] * len(text)
        return out


def test_arpo_fill_ins_ahead_change_no_group_and_shorten_the_chain():
    """Fill-ins started early join in the order they started and only when the group drains, so the
    groups, branches and tool calls equal sequential fill-in's; those a branch made unneeded are
    dropped unseen by the tools. A prompt whose paths all answer at once samples its fill-ins side by
    side instead of one after another."""
    first = ["<answer>1</answer>", "a<echo>x</echo>", "<answer>2</answer>", "<answer>3</answer>"]
    # tau = 1, w = 0: every turn that ends in a tool call branches while slots are free
    for make in (lambda s: s, lambda s: StreamingSlotEngine(s, slots=8)):
        runs = {}
        for ahead in (0, 8):
            engine = make(FirstTurnScript(first))
            (group,), budget = _arpo({"initial": 1, "tau": 1.0, "entropy_weight": 0.0, "fill_ahead": ahead}, engine, M=4)
            runs[ahead] = ([(t.tokens, t.parent, t.branch_at, len(t.tool_calls)) for t in group], budget.extra)
        assert runs[0][0] == runs[8][0]
        assert [t[1] for t in runs[0][0]] == [None, None, 1, 1]   # the first fill-in called a tool: two branches
        assert runs[0][1]["arpo/fill_ins"] == runs[8][1]["arpo/fill_ins"] == 1
        assert runs[8][1]["arpo/fill_ins_ahead"] == 3 and runs[8][1]["arpo/fill_ins_dropped"] == 2
        assert runs[0][1]["arpo/fill_ins_ahead"] == 0
    steps = {}
    for ahead in (0, 8):
        engine = StreamingSlotEngine(EntropyScript(["<answer>1</answer>"], entropies=[1.0]), slots=8)
        (group,), budget = _arpo({"initial": 1, "fill_ahead": ahead}, engine, M=4)
        assert len(group) == 4 and budget.extra["arpo/fill_ins"] == 3 and budget.extra["arpo/fill_ins_dropped"] == 0
        steps[ahead] = engine.in_use
    answer = len("<answer>1</answer>")
    assert len(steps[0]) == 4 * answer and max(steps[0]) == 1
    assert len(steps[8]) == answer and max(steps[8]) == 4
    with pytest.raises(ValueError, match="fill_ahead must be 0"):
        build_sampler("arpo", {"fill_ahead": -1})


def test_latr_branch_rule_and_similarity_measures_by_hand():
    top = [(1, math.log(0.5)), (2, math.log(0.3)), (3, math.log(0.1))]
    assert valid_candidates(top, tau_abs=0.15, tau_rel=0.25) == [2]       # 0.3 > 0.15 and 0.5 - 0.3 < 0.25
    assert valid_candidates(top, tau_abs=0.15, tau_rel=0.1) == []         # 0.2 >= 0.1
    assert suffix_match([1, 2, 3, 4], [9, 3, 4, 8]) == 0.5                # suffix [3, 4] occurs in b
    assert suffix_match([1, 2, 3, 4], [5, 6, 7, 8]) == 0.0
    # LCS([1,2,3,4], [1,3,4,5]) = 3: precision 3/4, recall 3/4
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)
    assert edit_distance([1, 2, 3, 4], [1, 2, 4]) == pytest.approx(1 / 4)


class FunctionEngine:
    """Greedy, deterministic: the next token after `ids` is f(ids); its top-2 candidates are f(ids)
    (p = 0.5) and f(ids) + 1 (p = 0.4), so every step offers a valid branch at tau_abs 0.15, tau_rel 0.25."""
    def __init__(self, f):
        self.f, self.stats, self.eos_ids = f, EngineStats(), [0]
        self.tokenizer = CharTokenizer()

    def generate(self, requests, seed=None):
        out = []
        for r in requests:
            ids, new, top = list(r.prompt_ids), [], []
            self.stats.prefill_tokens += 1
            for _ in range(r.params.max_tokens):
                v = self.f(ids)
                top.append([(v, math.log(0.5)), (v + 1, math.log(0.4))])
                ids.append(v)
                new.append(v)
            self.stats.decode_tokens += len(new)
            out.append([Completion(new, [math.log(0.5)] * len(new), [1.0] * len(new), "length", "",
                                   top if r.params.logprobs else None) for _ in range(r.params.n)])
        return out


def _latr(f, engine=None, prompts=([65, 66],), **params):
    sampler = build_sampler("latr", {"filter_steps": [3], "tau_suffix": 0.5, "tau_rouge": None, **params})
    engine = engine or FunctionEngine(f)
    return run_sampler(sampler, engine, [list(p) for p in prompts], SamplingParams(max_tokens=10, n=4), 0,
                       SamplerContext(step=1))


def test_latr_prunes_branches_that_repeat_their_parent():
    # the continuation ignores the context: a branch differs from its parent in one token only
    (group,), budget = _latr(lambda ids: 100 + len(ids))
    # e.g. born at step 0: [103, 103, 104] vs the parent's [102, 103, 104] three steps later: the
    # suffix [103, 104] recurs, score 2/3 > 0.5, pruned; the freed slot goes to a later fork
    assert budget.extra["latr/pruned"] >= 3 and len(group) == 4
    # the continuation depends on the whole context: branches stay apart and are kept
    (group,), budget = _latr(lambda ids: 100 + sum(ids) % 50)
    tree = [t for t in group if t.parent is not None]
    assert budget.extra["latr/tree_members"] == 4 and len(tree) == 3 and budget.extra["latr/pruned"] == 0
    for t in tree:  # each branch is its parent's prefix, then the alternative token
        parent = group[t.parent]
        assert t.tokens[:t.branch_at] == parent.tokens[:t.branch_at]
        assert t.tokens[t.branch_at] == parent.tokens[t.branch_at] + 1
    assert len(group) == 4 and len({tuple(t.tokens) for t in group}) == 4


def test_latr_mix_ratio_schedule_sets_the_tree_share():
    sampler = build_sampler("latr", {"mix_ratio_schedule": {0: 1.0, 100: 0.5}})
    engine = FunctionEngine(lambda ids: 100 + sum(ids) % 50)
    (group,), budget = run_sampler(sampler, engine, [[65, 66]], SamplingParams(max_tokens=6, n=4), 0,
                                   SamplerContext(step=150))
    assert budget.extra["latr/eta"] == 0.5 and budget.extra["latr/tree_members"] <= 2 and len(group) == 4


def test_hard_and_depthwise_tree_advantages_by_hand():
    def traj(tokens, parent=None, at=None, reward=0.0):
        return Trajectory([9, 9], tokens, [0.0] * len(tokens), [0.0] * len(tokens), [1] * len(tokens), "g",
                          parent=parent, branch_at=at, reward=reward)
    # a: root; b branches from a after 3 tokens; c from b after 5; d: an independent root
    group = [traj([1, 2, 3, 4, 5, 6], reward=1.0), traj([1, 2, 3, 7, 8, 9], 0, 3), traj([1, 2, 3, 7, 8, 5], 1, 5, 1.0),
             traj([4, 4, 4, 4])]
    b = pack(group, 0)
    adv, _ = ADVANTAGES["tree_hard"](b.rewards, b.group_ids, b.loss_mask, origin=b.token_origin)
    # GRPO: rewards (1, 0, 1, 0), std 0.5774 -> A = +-0.866. Shared by a, b, c: (0.866 - 0.866 + 0.866) / 3
    assert adv[0, :3].tolist() == pytest.approx([0.2887] * 3, abs=1e-4)
    assert adv[1, 3:5].tolist() == pytest.approx([0.0, 0.0], abs=1e-4)          # shared by b and c
    assert adv[1, 5].item() == pytest.approx(-0.866, abs=1e-3) and adv[3, :4].tolist() == pytest.approx([-0.866] * 4, abs=1e-3)
    adv, m = ADVANTAGES["branch_depth"](b.rewards, b.group_ids, b.loss_mask, origin=b.token_origin)
    # depth 0: nodes {a,b,c prefix: 2/3, d: 0} -> +-0.7071; depth 1: {a's rest: 1, b-c shared: 0.5};
    # depth 2: {b's last: 0, c's last: 1}
    z = 1 / math.sqrt(2)
    assert adv[0].tolist() == pytest.approx([z] * 6, abs=1e-4)
    assert adv[1].tolist() == pytest.approx([z, z, z, -z, -z, -z], abs=1e-4)
    assert adv[2].tolist() == pytest.approx([z, z, z, -z, -z, z], abs=1e-4)
    assert adv[3, :4].tolist() == pytest.approx([-z] * 4, abs=1e-4) and m["tree/max_depth"] == 2


def test_branch_depth_probability_weighted_fusion_by_hand():
    """BranchGRPO's probability-weighted fusion: an inner node's value is the softmax over its
    children of (alpha times) their segment log-probs, times their values. a: root; b and d branch
    from a after 1 token; c branches from b after 2."""
    def traj(tokens, logps, parent=None, at=None, reward=0.0):
        return Trajectory([9, 9], tokens, [math.log(p) for p in logps], [0.0] * len(tokens), [1] * len(tokens), "g",
                          parent=parent, branch_at=at, reward=reward)
    group = [traj([1, 2, 3, 4], [0.5, 0.9, 0.9, 0.9], reward=1.0), traj([1, 5, 6], [0.5, 0.4, 0.2], 0, 1),
             traj([1, 5, 7], [0.5, 0.4, 0.6], 1, 2, reward=1.0), traj([1, 8, 9], [0.5, 0.3, 0.3], 0, 1)]
    b = pack(group, 0)
    args = (b.rewards, b.group_ids, b.loss_mask)
    z = 1 / math.sqrt(2)
    # mean fusion: depth 1 holds a's rest (1), b-c's shared [5] (0.5), d's rest (0): z = 1, 0, -1
    adv, _ = ADVANTAGES["branch_depth"](*args, origin=b.token_origin)
    assert adv[1, :3].tolist() == pytest.approx([0.0, 0.0, -z], abs=1e-6)
    assert adv[0, 1:4].tolist() == pytest.approx([1.0] * 3, abs=1e-6) and adv[3, 1:3].tolist() == pytest.approx([-1.0] * 2)
    # probability fusion, alpha 1: R([5]) = (0.2 * 0 + 0.6 * 1) / (0.2 + 0.6) = 0.75; depth 1 values
    # (1, 0.75, 0): mean 0.58333, unbiased std 0.52042
    adv, _ = ADVANTAGES["branch_depth"](*args, origin=b.token_origin, fusion="probability",
                                         sampling_logp=b.sampling_logp)
    mean, std = 1.75 / 3, math.sqrt(((1 - 1.75 / 3) ** 2 + (0.75 - 1.75 / 3) ** 2 + (1.75 / 3) ** 2) / 2)
    assert adv[0, 0].item() == 0.0   # one node at depth 0
    assert adv[0, 1:4].tolist() == pytest.approx([(1 - mean) / std] * 3, abs=1e-6)
    assert adv[1, :3].tolist() == pytest.approx([0.0, (0.75 - mean) / std, -z], abs=1e-6)
    assert adv[2, :3].tolist() == pytest.approx([0.0, (0.75 - mean) / std, z], abs=1e-6)
    assert adv[3, 1:3].tolist() == pytest.approx([-mean / std] * 2, abs=1e-6)
    # alpha scales the log-probs: alpha 0 weighs children equally, the mean of b's and c's rewards
    adv0, _ = ADVANTAGES["branch_depth"](*args, origin=b.token_origin, fusion="probability", alpha=0.0,
                                          sampling_logp=b.sampling_logp)
    assert adv0[1, :3].tolist() == pytest.approx([0.0, 0.0, -z], abs=1e-6)
    with pytest.raises(ValueError, match="fusion"):
        ADVANTAGES["branch_depth"](*args, origin=b.token_origin, fusion="max")
    with pytest.raises(ValueError, match="sampling_logp"):
        ADVANTAGES["branch_depth"](*args, origin=b.token_origin, fusion="probability")


def _pruning_tree():
    """root [1, 2] splits into A [3, 4] (rows 0, 1) and B [5, 6] (rows 2, 3); each splits into two
    leaves; row 4 is a fresh sample. Rewards 1, 0, 1, 1, 0."""
    def traj(tokens, parent=None, at=None, reward=0.0):
        return Trajectory([9, 9], tokens, [0.0] * len(tokens), [0.0] * len(tokens), [1] * len(tokens), "g",
                          parent=parent, branch_at=at, reward=reward)
    group = [traj([1, 2, 3, 4, 7, 8], reward=1.0), traj([1, 2, 3, 4, 9, 10], 0, 4), traj([1, 2, 5, 6, 11, 12], 0, 2, 1.0),
             traj([1, 2, 5, 6, 13, 14], 2, 4, 1.0), traj([20, 21])]
    b = pack(group, 0)
    adv, _ = ADVANTAGES["branch_depth"](b.rewards, b.group_ids, b.loss_mask, origin=b.token_origin)
    return b, adv


def test_branch_pruning_by_depth_and_width_by_hand():
    from forkrl.algos import TOKEN_SELECTORS
    b, adv = _pruning_tree()
    # depth 0: the root and row 4 (values 0.75, 0); depth 1: A 0.5, B 1 -> -+0.7071; depth 2: leaves
    # 1, 0, 1, 1 (mean 0.75, std 0.5) -> 0.5, -1.5, 0.5, 0.5
    assert adv[:4, 4].tolist() == pytest.approx([0.5, -1.5, 0.5, 0.5], abs=1e-6)

    def prune(step=1, progress=0.0, **params):
        keep = TOKEN_SELECTORS["branch_pruning"](b.sampling_entropy, b.loss_mask, origin=b.token_origin, adv=adv,
                                                 step=step, progress=progress, **params)
        return [[int(k) for k in row[:n]] for row, n in zip(keep, (6, 6, 6, 6, 2))]

    whole = [[1] * 6] * 4 + [[1, 1]]
    assert prune() == whole                                   # nothing asked: nothing pruned
    # depth pruning: A and B's tokens (depth 1) in every row that holds them
    assert prune(depth_pruning=[1]) == [[1, 1, 0, 0, 1, 1]] * 4 + [[1, 1]]
    # mode 1: per parent the best max(1, 0.5 * 2) = 1 leaf: under A leaf 0 (0.5 > -1.5); under B a
    # tie, the earlier row (2) stays
    assert prune(width_pruning_mode=1) == [[1] * 6, [1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 1, 0, 0], [1, 1]]
    # mode 2: K = max(2, 0.5 * 4) = 2 over the batch's last layer: the best (leaf 0, first of the 0.5s)
    # and the worst (leaf 1); row 4 is no split's leaf and is kept
    assert prune(width_pruning_mode=2) == [[1] * 6, [1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1]]
    assert prune(width_pruning_mode=2, width_pruning_ratio=1.0) == whole   # K = 4 keeps every leaf
    # the sliding window: depth [2] moves 1 towards the root every 2 steps, stopping at depth 1 (the
    # last split's parents)
    leaves_off = [[1, 1, 1, 1, 0, 0]] * 4 + [[1, 1]]
    assert prune(step=1, depth_pruning=[2], depth_pruning_slide_interval=2) == leaves_off
    assert prune(step=2, depth_pruning=[2], depth_pruning_slide_interval=2) == prune(depth_pruning=[1])
    assert prune(step=9, depth_pruning=[2], depth_pruning_slide_interval=2) == prune(depth_pruning=[1])
    assert prune(step=9, depth_pruning=[2], depth_pruning_slide_interval=2, depth_pruning_stop_depth=0) == \
        [[0, 0, 1, 1, 1, 1]] * 4 + [[0, 0]]
    # only during the first pruning_step_ratio of training
    assert prune(progress=0.45, depth_pruning=[2], pruning_step_ratio=0.5) == leaves_off
    assert prune(progress=0.5, depth_pruning=[2], pruning_step_ratio=0.5) == whole
    with pytest.raises(ValueError, match="width_pruning_ratio"):
        prune(width_pruning_mode=1, width_pruning_ratio=0.0)


def test_a_stale_parent_index_does_not_merge_different_tokens():
    a = Trajectory([9], [1, 2, 3], [0.0] * 3, [0.0] * 3, [1] * 3, "g")
    b = Trajectory([9], [1, 5, 3], [0.0] * 3, [0.0] * 3, [1] * 3, "g", parent=0, branch_at=2)  # prefix differs
    origin = pack([a, b], 0).token_origin
    assert origin[1].tolist() == [3, 4, 5]


@pytest.mark.parametrize("sampler,params", [
    ("latr", {"tau_abs": 0.0, "tau_rel": 1.0, "filter_steps": [2]}),
    ("independent", {}),
    ("april", {"over_sampling": 1.5}),
    ("etmr", {"chains": 2, "forks": 3}),
    ("branchgrpo", {"splits": [2, 4, 6]}),
])
def test_samplers_train_through_the_trainer(tmp_path, sampler, params):
    from forkrl.train import Trainer
    from tests.test_trainer import _cfg, _rows
    cfg = _cfg(tmp_path, train={"steps": 2}, rollout={"sampler": sampler, "sampler_params": params},
               algo={"advantage": "tree_hard", "train_shared_prefix_once": sampler == "etmr"})
    Trainer(cfg).train()
    rows = _rows(cfg)
    assert all(r["sampler/trajectories"] == 32 for r in rows)
    if sampler == "etmr":  # forks share their chain's prefix, which is trained once
        assert all(r["tree/deduplicated_tokens"] > 0 and r["tree/shared_token_frac"] > 0 for r in rows)
    if sampler in ("latr", "branchgrpo"):
        assert all(r["sampler/branch_points"] > 0 for r in rows)


def test_pruned_leaves_are_not_trained_or_run(tmp_path):
    """BranchGRPO with width pruning through the trainer: the same first step's samples, fewer tokens
    trained and fewer run by the learner than without pruning."""
    from forkrl.train import Trainer
    from tests.test_trainer import _cfg, _rows
    runs = {}
    for pruned in (False, True):
        algo = {"advantage": "branch_depth", "train_shared_prefix_once": True}
        if pruned:
            algo.update(token_selector="branch_pruning", token_selector_params={"width_pruning_mode": 2})
        (tmp_path / str(pruned)).mkdir()
        cfg = _cfg(tmp_path / str(pruned), train={"steps": 1},
                   rollout={"sampler": "branchgrpo", "sampler_params": {"splits": [2, 4, 6]}}, algo=algo)
        Trainer(cfg).train()
        runs[pruned] = _rows(cfg)[0]
    full, pruned = runs[False], runs[True]
    assert full["sampler/decoded_tokens"] == pruned["sampler/decoded_tokens"]
    assert pruned["train/tokens"] < full["train/tokens"]   # (shared tokens count once in both)
    assert pruned["learner/forward_tokens"] < full["learner/forward_tokens"]


def test_engine_stop_when_returns_partial_completions_that_resume_exactly(tiny):
    from forkrl.rollout import GenerationRequest, TorchEngine
    model, tok = tiny
    engine = TorchEngine(model, tok, prefix_cache_mb=0)
    a, b = tok("A short one.")["input_ids"], tok("A long one, which we stop early.")["input_ids"]
    greedy = lambda n: SamplingParams(temperature=0.0, max_tokens=n)
    full = engine.generate([GenerationRequest(b, greedy(10))])[0][0]
    outs = engine.generate([GenerationRequest(a, greedy(3)), GenerationRequest(b, greedy(10))],
                           stop_when=lambda finished: finished[0] >= 1)
    assert outs[0][0].finish == "length" and outs[1][0].finish == "abort" and len(outs[1][0].token_ids) == 3
    partial = outs[1][0]
    rest = engine.generate([GenerationRequest(b + partial.token_ids, greedy(7))])[0][0]
    assert partial.token_ids + rest.token_ids == full.token_ids
    assert partial.logprobs + rest.logprobs == pytest.approx(full.logprobs, abs=1e-4)


class LockstepEngine:
    """Decodes all rows one token per step, like TorchEngine, honouring stop_when. A row's first
    token is random (seeded per call); every later token is a function of the context, and the
    row ends (EOS = 0) after 1 + first % 9 tokens: long-tailed lengths that resume deterministically."""
    def __init__(self, prompt_len):
        self.prompt_len, self.stats, self.eos_ids, self.calls = prompt_len, EngineStats(), [0], 0
        self.tokenizer = CharTokenizer()

    @staticmethod
    def full(first):
        return [first] + [(first * 7 + i) % 200 + 1 for i in range(1, first % 9)] + [0]

    def generate(self, requests, seed=None, stop_when=None):
        rng = random.Random(seed)
        rows = [(i, list(r.prompt_ids[self.prompt_len:]), r.params.max_tokens) for i, r in enumerate(requests)]
        done = [None] * len(rows)
        new = [[] for _ in rows]
        finished = [0] * len(rows)
        step = 0
        while any(d is None for d in done):
            ended = []
            for j, (i, partial, max_tokens) in enumerate(rows):
                if done[j] is not None:
                    continue
                so_far = partial + new[j]
                first = so_far[0] if so_far else rng.randrange(10, 200)
                new[j].append(self.full(first)[len(so_far)])
                self.stats.decode_tokens += 1
                if new[j][-1] == 0:
                    done[j] = "eos"
                elif len(new[j]) >= max_tokens:
                    done[j] = "length"
                if done[j] is not None:
                    ended.append(j)
                    finished[i] += 1
            step += 1
            if ended and stop_when is not None and stop_when(finished):
                done = [d or "abort" for d in done]
        return [[Completion(ids, [-1.0] * len(ids), [1.0] * len(ids), d, "")] for ids, d in zip(new, done)]


def test_april_returns_complete_groups_and_trains_every_token_once():
    sampler = build_sampler("april", {"over_sampling": 2.0})
    engine = LockstepEngine(prompt_len=1)
    returned, ids = [], set()
    for step in range(1, 7):
        fresh = sampler.prompts_wanted(2)
        prompts = [[100 + 10 * step + k] for k in range(fresh)]
        ctx = SamplerContext(version=step, step=step, samples=[f"p{p[0]}" for p in prompts], groups=2)
        groups, budget = run_sampler(sampler, engine, prompts, SamplingParams(max_tokens=12, n=3), step, ctx)
        assert len(groups) == 2 and all(len(g) == 3 for g in groups)
        assert len(sampler.buffer) + 2 <= 4                    # B' = 4 groups in flight
        for g in groups:
            for t in g:
                assert id(t) not in ids                         # never returned twice
                ids.add(id(t))
                assert t.finish in ("eos", "length") and t.sample == g[0].sample
                # token for token the sequence an uninterrupted generation writes, whatever step it resumed at
                assert t.tokens == LockstepEngine.full(t.tokens[0])[:12]
                assert len(t.policy_version) == len(t.tokens) and t.policy_version == sorted(t.policy_version)
                returned.append(t)
    assert any(len(set(t.policy_version)) > 1 for t in returned)  # some were resumed across a weight update
    # every decoded token belongs to exactly one trajectory: returned or still waiting in the buffer
    waiting = sum(len(t.tokens) for g in sampler.buffer for t in g.members)
    assert engine.stats.decode_tokens == sum(len(t.tokens) for t in returned) + waiting


def test_april_leaves_unfinished_groups_for_the_next_step():
    prompts = [[k] for k in range(8)]
    sampler = build_sampler("april", {"over_sampling": 2.0})
    engine = LockstepEngine(1)
    groups, budget = run_sampler(sampler, engine, prompts, SamplingParams(max_tokens=12, n=4), 0,
                                 SamplerContext(samples=list(range(8)), groups=4))
    # generation stopped when the 4th group completed: the rest wait with their partial tokens
    assert len(groups) == 4 and len(sampler.buffer) == 4
    assert any(not g.complete and any(t.tokens for t in g.members) for g in sampler.buffer)
    assert budget.extra["april/buffered_groups"] == 4


def test_dars_schedules_by_hand():
    from forkrl.rollout.dars import dars_extra
    # ET, N = 8, accuracy 1/8: S = 2(1/8)(7/8) = 0.21875, T* = 4 -> (4 - 1.75) / 0.21875 = 10.29 -> 11
    assert dars_extra(1 / 8, 8, "et") == 11
    # HW: target 2(7/8)4 = 7 -> (7 - 1.75) / 0.21875 = 24 exactly
    assert dars_extra(1 / 8, 8, "hw", n_max=64) == 24
    # accuracy 0 reads as 0.5/N = 1/16: (4 - 0.9375) / 0.1171875 = 26.1 -> 27, capped at N_max - N = 24
    assert dars_extra(0.0, 8, "et", n_max=32) == 24
    # with std normalisation: S = 2 sqrt(a(1-a)) = 0.6614, T* = 8 -> (8 - 5.29) / 0.6614 = 4.1 -> 5
    assert dars_extra(1 / 8, 8, "et", std_normalized=True) == 5
    assert dars_extra(0.5, 8, "et") == 0 and dars_extra(0.9, 8, "hw") == 0


def test_dars_adds_rollouts_to_hard_groups_and_drops_unlearnable_ones(tmp_path):
    from forkrl.train import Trainer
    from tests.test_trainer import _cfg
    # the random model never answers the file task correctly: every group is hard (accuracy 0) and
    # gets min(27, N_max - N) = 4 more; merged, still all wrong, so each is dropped
    cfg = _cfg(tmp_path, train={"steps": 1}, rollout={"prompts_per_step": 2, "samples_per_prompt": 4,
                                                      "gates": [{"name": "dars", "n_max": 8}]})
    trainer = Trainer(cfg)
    trainer.train()
    m = trainer.history[0]
    assert m["dars/extra_rollouts"] == 8 and m["dars/boosted_prompts"] == 2 and m["dars/dropped_groups"] == 2
    assert m["sampler/trajectories"] == 16


def test_etmr_forks_at_the_highest_entropy_positions_and_fills_the_group():
    from forkrl.rollout.etmr import fork_points
    ent = [0.1, 2.0, 0.5, 3.0, float("nan"), 1.0]
    mask = [1, 1, 1, 1, 0, 1]
    assert fork_points(ent, mask, 2, set()) == [1, 3]
    assert fork_points(ent, mask, 2, {3}) == [1, 5]
    assert fork_points(ent, mask, 2, set(), start=2) == [3, 5]
    engine = FunctionEngine(lambda ids: 100 + sum(ids) % 50)
    engine.generate_orig = engine.generate

    def with_entropy(requests, seed=None):  # entropy rises along the sequence: forks land late
        out = engine.generate_orig(requests, seed)
        for (c, *rest) in out:
            for x in (c, *rest):
                x.entropies = [float(i) for i in range(len(x.token_ids))]
        return out
    engine.generate = with_entropy
    sampler = build_sampler("etmr", {"chains": 2, "forks": 2, "branches": 1})
    (group,), budget = run_sampler(sampler, engine, [[65, 66]], SamplingParams(max_tokens=8, n=6), 0, SamplerContext())
    assert len(group) == 6 and [t.parent for t in group] == [None, None, 0, 0, 1, 1]
    assert [t.branch_at for t in group[2:]] == [6, 7, 6, 7]     # the two highest-entropy positions of each chain
    for t in group[2:]:
        assert t.tokens[:t.branch_at] == group[t.parent].tokens[:t.branch_at] and len(t.tokens) == 8


class SaltedEngine(FunctionEngine):
    """Like FunctionEngine, but each request draws from its own stream (a salt per call of the
    script), so paths forked from one prefix go different ways; EOS (0) after `eos_after` tokens of a
    sequence's whole response (prompt tokens past the first two count as response)."""
    def __init__(self, eos_after: int | None = None):
        super().__init__(lambda ids: 0)
        self.calls, self.eos_after = 0, eos_after

    def generate(self, requests, seed=None):
        out = []
        for r in requests:
            self.calls += 1
            comps = []
            for j in range(r.params.n):
                ids, new, finish = list(r.prompt_ids), [], "length"
                for _ in range(r.params.max_tokens):
                    ended = self.eos_after is not None and len(ids) - 2 >= self.eos_after
                    v = 0 if ended else 100 + (7 * self.calls + 3 * j + len(ids)) % 50
                    ids.append(v)
                    new.append(v)
                    if ended:
                        finish = "eos"
                        break
                comps.append(Completion(new, [math.log(0.5)] * len(new), [float(len(ids))] * len(new), finish, ""))
            self.stats.decode_tokens += sum(len(c.token_ids) for c in comps)
            out.append(comps)
        return out


def _branchgrpo(engine, params, prompts=([65, 66],), n=8, max_tokens=10):
    return run_sampler(build_sampler("branchgrpo", params), engine, [list(p) for p in prompts],
                       SamplingParams(max_tokens=max_tokens, n=n), 0, SamplerContext())


def test_branchgrpo_every_path_splits_at_every_depth():
    """k = 2, splits at response tokens 2, 4, 6: the root forks at 2, 4 and 6, the path born at 2
    forks at 4 and 6, those born at 4 fork at 6: 8 leaves, each sharing its parent's first
    `branch_at` tokens. The same tree, whether forks enter a running batch or follow whole paths."""
    from forkrl.rollout.branchgrpo import default_splits
    # BranchGRPO's own schedule at 20 steps and 16 leaves, and scaled to 400 tokens for 8
    assert default_splits(16, 2, 20) == [0, 3, 6, 9]
    assert default_splits(8, 2, 400) == [0, 60, 120] and default_splits(9, 3, 100) == [0, 15]
    shapes = []
    for engine in (SaltedEngine(), SlotEngine(SaltedEngine(), slots=3), StreamingSlotEngine(SaltedEngine(), slots=3),
                   StreamingSlotEngine(SaltedEngine(), slots=16)):
        (group,), budget = _branchgrpo(engine, {"splits": [2, 4, 6]})
        assert len(group) == 8 and budget.branch_points == 7 and budget.extra["branchgrpo/filled"] == 0
        children = {i: sorted(t.branch_at for t in group if t.parent == i) for i in range(8)}
        born = [t.branch_at or 0 for t in group]
        # a member forks at every split depth past the one it was born at
        assert all(children[i] == [s for s in (2, 4, 6) if s > born[i]] for i in range(8))
        for t in group[1:]:
            parent = group[t.parent]
            assert t.tokens[:t.branch_at] == parent.tokens[:t.branch_at]
            assert t.tokens[t.branch_at:] != parent.tokens[t.branch_at:] and len(t.tokens) == 10
            assert t.logprobs[:t.branch_at] == parent.logprobs[:t.branch_at]
        # tokens sampled: the root's 10, then 8 + 6 + 6 + 4 + 4 + 4 + 4 for the forks
        assert engine.stats.decode_tokens == 10 + 8 + 6 * 2 + 4 * 4
        shapes.append(sorted((born[i], tuple(children[i])) for i in range(8)))
    assert all(s == shapes[0] for s in shapes)


def test_branchgrpo_fills_the_group_when_paths_end_before_a_split():
    # every path ends (EOS) after 3 response tokens: the root forks at 2 only, the fork ends too;
    # the other 6 members are fresh samples from the prompt
    for engine in (SaltedEngine(eos_after=3), StreamingSlotEngine(SaltedEngine(eos_after=3), slots=4)):
        (group,), budget = _branchgrpo(engine, {"splits": [2, 4, 6]})
        assert [t.parent for t in group] == [None, 0] + [None] * 6 and group[1].branch_at == 2
        assert budget.extra["branchgrpo/filled"] == 6 and all(t.finish == "eos" for t in group)
    # more leaves than the group holds: the tree is cut in level order, whatever order the work ran in
    for engine in (SaltedEngine(), StreamingSlotEngine(SaltedEngine(), slots=2)):
        (group,), _ = _branchgrpo(engine, {"splits": [2, 4, 6]}, n=5)
        edges = sorted((t.branch_at, group[t.parent].branch_at or 0) for t in group[1:])
        assert len(group) == 5 and edges == [(2, 0), (4, 0), (4, 2), (6, 0)]
    with pytest.raises(ValueError, match="increasing"):
        build_sampler("branchgrpo", {"splits": [4, 2]})
    with pytest.raises(ValueError, match="at least 2"):
        build_sampler("branchgrpo", {"branches": 1})


def test_branchgrpo_splits_episodes_at_turn_boundaries():
    """split_at turns: after the tool results of turns 1 and 2 every episode splits in two (copies of
    it); the third turn answers, so a third split level never comes and its 4 leaves are fresh."""
    for engine in (EntropyScript(TURNS, entropies=[1.0]), StreamingSlotEngine(EntropyScript(TURNS, entropies=[1.0]), slots=3)):
        ctx = SamplerContext(env=_env(max_turns=4), tokenizer=VocabTokenizer())
        sampler = build_sampler("branchgrpo", {"split_at": "turns", "splits": [1, 2]})
        (group,), budget = run_sampler(sampler, engine, [[ord(c) for c in "Q?"]], SamplingParams(max_tokens=100, n=4), 0, ctx)
        ends = [group[0].tool_calls[j].span[1] for j in range(2)]   # the ends of the two tool results
        assert len(group) == 4 and budget.branch_points == 3 and budget.extra["branchgrpo/filled"] == 0
        assert sorted((t.branch_at, group[t.parent].branch_at or 0) for t in group[1:]) == \
            [(ends[0], 0), (ends[1], 0), (ends[1], ends[0])]
        for t in group[1:]:
            assert t.tokens[:t.branch_at] == group[t.parent].tokens[:t.branch_at] and t.finish == "answer"
        # three levels: the last is never reached, every tree member's third-level leaf is fresh
        sampler = build_sampler("branchgrpo", {"split_at": "turns"})   # default: turns 1, 2, 3 for 8
        (group,), budget = run_sampler(sampler, engine, [[ord(c) for c in "Q?"]], SamplingParams(max_tokens=100, n=8), 0, ctx)
        assert len(group) == 8 and budget.extra["branchgrpo/filled"] == 4 and budget.branch_points == 3
    with pytest.raises(ValueError, match="needs env"):
        run_sampler(build_sampler("branchgrpo", {"split_at": "turns"}), SaltedEngine(), [[65, 66]],
                    SamplingParams(max_tokens=8, n=4), 0, SamplerContext())
    with pytest.raises(ValueError, match="turns >= 1"):
        build_sampler("branchgrpo", {"split_at": "turns", "splits": [0, 1]})


def test_branchgrpo_keeps_the_continuous_batch_full_and_forks_share_the_cache(tiny):
    """Four prompts' trees through a 4-slot scripted batch: full until the work runs out. On the
    real engine a fork of a running path copies its states: only the prompts are prefilled, plus at
    most one token per fork."""
    engine = StreamingSlotEngine(SaltedEngine(), slots=4)
    groups, _ = _branchgrpo(engine, {"splits": [2, 5]}, prompts=[[65, 66], [67, 68], [69, 70], [71, 72]], n=4)
    assert all(len(g) == 4 for g in groups) and _full_until_drained(engine.in_use, 4)
    from forkrl.rollout import TorchEngine
    model, tok = tiny
    engine = TorchEngine(model, tok, max_batch_size=16, prefix_cache_mb=0)
    prompts = [tok.encode("Work it out step by step. What is 2 + 3?"), tok.encode("Name a colour, then a fruit.")]
    sampler = build_sampler("branchgrpo", {"splits": [10, 16]})   # a copy needs 16 shared tokens
    groups, budget = run_sampler(sampler, engine, prompts, SamplingParams(max_tokens=24, n=4), 0,
                                 SamplerContext(tokenizer=tok))
    forks = sum(t.parent is not None for g in groups for t in g)
    assert forks == 6 and budget.extra["branchgrpo/filled"] == 0
    assert sum(map(len, prompts)) <= budget.prefilled_tokens <= sum(map(len, prompts)) + forks
    for g in groups:
        for t in g[1:]:
            assert t.tokens[:t.branch_at] == g[t.parent].tokens[:t.branch_at]


def test_majority_vote_reward_needs_no_labels():
    from forkrl.tasks import Sample, Task
    task = Task("t", [Sample("a", "q1", None), Sample("b", "q2", None)], [], verifier=lambda s, c: 0.0)
    task.answer_of = lambda c: c.split()[-1] if c.split() else None
    a, b = Sample("a", "q1", None), Sample("b", "q2", None)
    completions = ["so 5", "it is 5", "maybe 6", "", "7", "8"]
    samples = [a, a, a, a, b, b]
    assert task.majority_vote_reward([], completions, sample=samples) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_aepo_budget_split_and_consecutive_branch_penalty():
    from forkrl.rollout.arpo import sigmoid
    sampler = build_sampler("aepo", {"beta": 2.0})
    # m = k·σ(β(H_root − H̄_tool)): equal entropies split evenly; a more uncertain question gets more global samples
    assert sampler.global_share(1.0, None) == 0.5 and sampler.global_share(1.0, 1.0) == 0.5
    assert sampler.global_share(1.5, 1.0) == pytest.approx(sigmoid(1.0))
    # tau = 1, w = 0: without the penalty every live trajectory branches at every tool result (entropy
    # rising each turn); with penalty 1 a path that branched on rising entropy cannot branch again.
    # A high H̄_tool from "earlier batches" makes m = 1 global trajectory, so slots never bind here.
    turns = ["a<echo>x</echo>"] * 4 + ["<answer>1</answer>"]
    counts = {}
    for penalty in (0.0, 1.0):
        engine = EntropyScript(turns, entropies=[1.0, 2.0, 3.0, 4.0, 1.0])
        s = build_sampler("aepo", {"tau": 1.0, "entropy_weight": 0.0, "penalty": penalty})
        s.state = {"tool_entropy": 100.0}
        ctx = SamplerContext(env=_env(max_turns=6, max_tool_calls=5), tokenizer=VocabTokenizer())
        (group,), b = run_sampler(s, engine, [[ord(c) for c in "Q?"]], SamplingParams(max_tokens=200, n=8), 0, ctx)
        assert b.extra["aepo/global_per_prompt"] == 1 and len(group) == 8

        def root(k):
            while group[k].parent is not None:
                k = group[k].parent
            return k
        counts[penalty] = sum(1 for k, t in enumerate(group) if t.parent is not None and root(k) == 0)
    # the first trajectory's tree. Free: 1 -> 2 -> 4 -> 8 members over three tool results. Held: the
    # root branches (streak 1), the streak blocks both paths at the next result (and resets), both
    # branch again at the third: 3 branches, and fill-ins take the 4 free slots
    assert counts == {0.0: 7, 1.0: 3}
    assert s.tool_entropy < 100.0                                 # H̄_tool moved towards this batch's


def test_shared_prefix_trained_once():
    from forkrl.train.learner import first_occurrence
    group = [Trajectory([9], [1, 2, 3, 4], [0.0] * 4, [0.0] * 4, [1] * 4, "g"),
             Trajectory([9], [1, 2, 7, 8], [0.0] * 4, [0.0] * 4, [1] * 4, "g", parent=0, branch_at=2)]
    first = first_occurrence(pack(group, 0).token_origin)
    assert first.tolist() == [[True] * 4, [False, False, True, True]]
    from forkrl.config import ConfigError, build_config
    with pytest.raises(ConfigError, match="token-level aggregation"):
        build_config({"algo": {"train_shared_prefix_once": True, "agg": "seq-mean-token-mean"}})


def test_latr_tree_does_not_depend_on_how_far_chains_ran_ahead():
    """Chains run ahead in the batch: whole at once on a lockstep engine, one token per step on a
    continuous one with few or many slots. Here parents are pruned before their children's later
    checks fall due; comparing a child with a dead parent's tokens made the tree depend on how far
    that parent had been decoded."""
    f = lambda ids: 100 + (sum(ids) // 3) % 4
    trees = []
    for engine in (FunctionEngine(f), SlotEngine(FunctionEngine(f), slots=3),
                   StreamingSlotEngine(FunctionEngine(f), slots=2), StreamingSlotEngine(FunctionEngine(f), slots=16)):
        (group,), budget = _latr(f, engine=engine, filter_steps=[3, 6], tau_suffix=0.3)
        trees.append(([(t.parent, t.branch_at, t.tokens) for t in group], budget.extra["latr/pruned"]))
    assert trees[0][1] > 0
    assert trees[0] == trees[1] == trees[2] == trees[3]
    for t in (t for t in group if t.parent is not None):  # a re-parented member still shares its prefix
        assert t.tokens[:t.branch_at] == group[t.parent].tokens[:t.branch_at]


def _full_until_drained(in_use: list[int], slots: int) -> bool:
    """Every step ran a full batch until the work ran out: once below `slots`, never full again."""
    first_short = next((k for k, n in enumerate(in_use) if n < slots), len(in_use))
    return all(n < slots for n in in_use[first_short:])


def test_tree_steps_keep_the_continuous_batch_full():
    """ARPO's turns, tool results and branches, and LATR's chains, forks and finishing samples enter
    the batch as they become ready: a scripted 4-slot batch runs full until the work runs out. Fed
    call by call (lockstep), the same ARPO rollout drains the batch at the end of every turn."""
    # two prompts whose turns differ in length, so their episodes finish turns at different steps
    turns = {"Q": ["a<echo>x</echo>", "bb<echo>y</echo>", "<answer>1</answer>"],
             "R": ["aaaaaa<echo>x</echo>", "b<echo>yyyy</echo>", "<answer>22</answer>"]}

    class TwoScripts(EntropyScript):
        def generate(self, requests, seed=None):
            out = []
            for r in requests:
                self.turns = turns[chr(r.prompt_ids[0])]
                out += super().generate([r], seed)
            return out

    use = {}
    for name, cls in (("continuous", StreamingSlotEngine), ("lockstep", SlotEngine)):
        engine = cls(TwoScripts(turns["Q"], entropies=[1.0, 3.0, 1.0]), slots=4)
        sampler = build_sampler("arpo", {"initial": 2, "tau": 0.0, "entropy_weight": 1.0})
        ctx = SamplerContext(env=_env(max_turns=4), tokenizer=VocabTokenizer())
        groups, budget = run_sampler(sampler, engine, [[ord(c) for c in "Q?"], [ord(c) for c in "R?"]],
                                     SamplingParams(max_tokens=100, n=4), 0, ctx)
        assert [len(g) for g in groups] == [4, 4] and budget.extra["arpo/branches"] == 4
        use[name] = engine.in_use
    assert _full_until_drained(use["continuous"], 4)
    assert not _full_until_drained(use["lockstep"], 4)
    # LATR: four prompts' trees, pruning, and the members' sampling after each tree phase
    f = lambda ids: 100 + (sum(ids) // 3) % 4
    engine = StreamingSlotEngine(FunctionEngine(f), slots=4)
    groups, budget = _latr(f, engine=engine, prompts=[[65, 66], [67], [68, 69], [70]], filter_steps=[3, 6],
                           tau_suffix=0.3)
    assert budget.extra["latr/pruned"] > 0 and all(len(g) == 4 for g in groups)
    assert _full_until_drained(engine.in_use, 4)


def test_a_steps_rollout_calls_sum_into_one_budget():
    """Refill rounds add up: counts are summed and the ratios come from the sums, not summed ratios."""
    from forkrl.rollout import RolloutBudget
    total = RolloutBudget(trajectories=8, decoded_tokens=80, prefilled_tokens=40, steps=20, extra={"arpo/branches": 2})
    total.add(RolloutBudget(trajectories=2, decoded_tokens=40, prefilled_tokens=0, steps=10, extra={"arpo/branches": 1}))
    m = total.metrics()
    assert m["sampler/tokens_per_trajectory"] == (120 + 40) / 10
    assert m["sampler/mean_batch_rows"] == 120 / 30
    assert m["sampler/arpo/branches"] == 3 and m["sampler/trajectories"] == 10
    assert "sampler/mean_batch_rows" not in RolloutBudget(trajectories=1, decoded_tokens=5).metrics()


def test_latr_chains_run_at_most_run_ahead_past_their_tree():
    """What a chain decodes past the step where it is pruned, or where the tree phase ends, is thrown
    away: bounding the run-ahead decodes fewer tokens and leaves the tree as it was."""
    f = lambda ids: 100 + (sum(ids) // 3) % 4
    out = {}
    for ahead in (1, 3, 64):
        engine = StreamingSlotEngine(FunctionEngine(f), slots=2)
        (group,), budget = _latr(f, engine=engine, filter_steps=[3, 6], tau_suffix=0.3, run_ahead=ahead)
        out[ahead] = ([(t.parent, t.branch_at, t.tokens) for t in group], budget.extra["latr/pruned"],
                      sum(engine.in_use), budget.extra["latr/discarded_tokens"])
    assert out[1][:2] == out[3][:2] == out[64][:2] and out[1][1] > 0
    assert out[1][2] < out[3][2] < out[64][2], {k: v[2] for k, v in out.items()}
    # the same tree and the same sampling after it: every extra token decoded was discarded, and counted so
    assert out[64][2] - out[1][2] == out[64][3] - out[1][3] and out[1][3] > 0
    with pytest.raises(ValueError, match="run_ahead"):
        build_sampler("latr", {"run_ahead": 0})
