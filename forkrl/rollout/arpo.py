"""ARPO's entropy-adaptive rollout (Dong et al., 2025, arXiv 2507.19849 §3.2; algorithms.md §2).

Per prompt the group holds M trajectories. N start from the prompt; the other M - N slots go to
branches: after a turn that ended in a tool call, an active trajectory forks with probability
clamp(τ + w·ΔH, 0, 1), where ΔH = H_now - H_init is the entropy of the segment it just wrote
minus that of its first segment. A branch is an exact copy (tokens, masks, tool counter) that then
continues on its own; it shares the prefix with its parent, which `parent` / `branch_at` record.
When every trajectory of a prompt has finished with slots still free, one fresh trajectory starts
from the prompt (global fill-in); up to `fill_ahead` of them sample in reserve from the start, which
changes no group (`FillIns`).

All of it runs through one continuous batch (`agent.run_episodes`): a trajectory's next turn, and
its branches, enter the engine as soon as its tool result is in, and the branching rule is applied
in the order turns finish.

Segment entropy Ĥ = Σ over the first k tokens of the segment of the token entropy, / ln|V|. The
engine gives the exact entropy of the full distribution (`entropy: exact`, the default); `topk`
truncates each token's distribution to its top `top_logprobs` entries as the reference code does.
Initial entropies live with the trajectories of one call, so nothing carries over between batches
(the reference code keeps a dictionary across calls, which makes later batches' H_init stale).
"""
from __future__ import annotations

import dataclasses
import math
import random

from forkrl.rollout.agent import Episode, finish, new_episode, run_episodes
from forkrl.rollout.samplers import register_sampler


def branch_count(delta_h: float, draws: list[float], tau: float, weight: float, free: int) -> int:
    """How many branches one trajectory spawns: one per draw u with u - w·ΔH <= τ (i.e. with
    probability clamp(τ + w·ΔH, 0, 1)), at most `free`."""
    n = sum(1 for u in draws if u - weight * delta_h <= tau)
    return max(min(n, free), 0)


def segment_entropy(entropies: list[float], k: int, vocab_size: int,
                    top_logprobs: list[list[tuple[int, float]]] | None = None) -> float:
    """Ĥ over the first k tokens of a segment, normalised by ln|V|. With top_logprobs, each token's
    entropy is -Σ p log p over its listed candidates only (the reference's truncated estimate)."""
    if top_logprobs is not None:
        values = [-sum(math.exp(lp) * lp for _, lp in cands) for cands in top_logprobs[:k]]
    else:
        values = [e for e in entropies[:k] if not math.isnan(e)]
    return sum(values) / math.log(vocab_size)


class FillIns:
    """Global fill-in (§2 step 6): a prompt whose paths have all ended with slots free gets one fresh
    trajectory from the prompt, and may branch from it before the next one comes.

    Run sequentially, as the reference does, the fill-ins of a prompt are a chain of whole
    trajectories, each started when the one before it ends, while the batch runs near empty. With
    `ahead` > 0, up to that many of a prompt's fill-ins sample in reserve from the start, while its
    slots are free (`run_episodes`' `ahead` hook), and join the group in the order they started, each
    when the group drains. Which one joins never depends on what it wrote, and a fresh trajectory's
    first turn is the same draw whenever it runs (one policy for the whole collection), so the groups
    are distributed as with sequential fill-in. What it costs is the tokens of reserves that branches
    made unneeded (`fill_ins_dropped`, at most `ahead` per prompt; a reserve is cancelled as soon as
    branches leave it no slot). A deeper reserve wastes more than it saves: on the short tool task
    `ahead` 4 dropped three times as many as 2 and took longer (README, Adaptive rollouts).
    """

    def __init__(self, groups: list[list[Episode]], M: int, ahead: int):
        self.groups, self.M, self.limit = groups, M, ahead
        self.reserve: list[list[Episode]] = [[] for _ in groups]
        self.added = self.started = self.dropped = 0

    def ahead(self, i: int) -> list[Episode]:
        """The reserve group i keeps now: the oldest reserves that still have a free slot, topped up
        to `ahead`."""
        free = max(self.M - len(self.groups[i]), 0)
        self.dropped += max(len(self.reserve[i]) - free, 0)
        keep = self.reserve[i][:free]
        new = [self._fresh(i) for _ in range(min(self.limit, free) - len(keep))]
        self.reserve[i] = keep + new
        self.started += len(new)
        return self.reserve[i]

    def drained(self, i: int) -> list[Episode]:
        if len(self.groups[i]) >= self.M:
            self.dropped += len(self.reserve[i])
            self.reserve[i] = []
            return []
        self.added += 1
        return [self.reserve[i].pop(0) if self.reserve[i] else self._fresh(i)]

    def _fresh(self, i: int) -> Episode:
        return new_episode(self.groups[i][0].traj.prompt_ids)

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/fill_ins": float(self.added), f"{prefix}/fill_ins_ahead": float(self.started),
                f"{prefix}/fill_ins_dropped": float(self.dropped)}


def assemble(groups: list[list[Episode]], parents: dict[int, Episode], M: int) -> list[list]:
    """The first M episodes of each group as trajectories, with `parent` as an index into the group
    (a branch whose parent did not make the cut becomes a root)."""
    out = []
    for g in groups:
        g = [e for e in g if e.traj.tokens][:M]  # a fill-in added as the iterations ran out never ran
        index = {id(e): i for i, e in enumerate(g)}
        trajs = finish(g)
        for e, t in zip(g, trajs):
            p = parents.get(id(e))
            t.parent = index.get(id(p)) if p is not None else None
            if t.parent is None:
                t.branch_at = None
        out.append(trajs)
    return out


@register_sampler("arpo", requires={"top_logprobs"})
class ARPOSampler:
    def __init__(self, initial: int | None = None, branches_per_step: int = 1, tau: float = 0.5,
                 entropy_weight: float = 0.2, entropy_tokens: int = 20, entropy: str = "exact",
                 top_logprobs: int = 10, fill_ahead: int = 2):
        if entropy not in ("exact", "topk"):
            raise ValueError(f"entropy must be 'exact' or 'topk', got {entropy!r}")
        if fill_ahead < 0:
            raise ValueError(f"fill_ahead must be 0 (fill-ins one at a time) or more, got {fill_ahead}")
        self.initial = initial                    # N; default M // 2 (the paper's 8 of 16)
        self.branches_per_step = branches_per_step  # Z = beam_size - 1
        self.tau, self.weight = tau, entropy_weight
        self.entropy_tokens, self.entropy = entropy_tokens, entropy
        self.top_logprobs = top_logprobs
        self.fill_ahead = fill_ahead              # fill-ins sampled in reserve (FillIns); 0: one at a time

    def measure(self, e: Episode, vocab: int) -> bool:
        """Ĥ of the segment an episode just wrote; True when it is past its first segment (H_init
        was already set: a trajectory's first segment, or a branch's first own one, sets it)."""
        e.h_now = segment_entropy(e.last_segment, self.entropy_tokens, vocab, e.last_top)
        if e.h_init is None:
            e.h_init = e.h_now
            return False
        return True

    def sample(self, engine, prompts, params, seed, ctx):
        if ctx.env is None:
            raise ValueError("the arpo sampler branches after tool calls: enable env (tools) in the recipe")
        M = params.n
        N = min(self.initial if self.initial is not None else max(M // 2, 1), M)
        if self.entropy == "topk":
            params = dataclasses.replace(params, logprobs=self.top_logprobs)
        rng = random.Random(seed)
        vocab = getattr(ctx.tokenizer, "vocab_size", None) or len(ctx.tokenizer)
        groups: list[list[Episode]] = [[new_episode(p) for _ in range(N)] for p in prompts]
        parents: dict[int, Episode] = {}
        count = {"branches": 0}
        fills = FillIns(groups, M, self.fill_ahead)

        def after_turn(i: int, e: Episode) -> list[Episode]:
            # branch a trajectory that is still going (it just received a tool result)
            self.measure(e, vocab)
            free = M - len(groups[i])
            if e.done or free <= 0:
                return []
            draws = [rng.random() for _ in range(self.branches_per_step)]
            children = [e.fork() for _ in range(branch_count(e.h_now - e.h_init, draws, self.tau, self.weight, free))]
            for child in children:
                parents[id(child)] = e
            count["branches"] += len(children)
            return children

        run_episodes(engine, ctx.env, ctx.tokenizer, groups, params, seed, ctx.version, after_turn, fills.drained,
                     fills.ahead)
        out = assemble(groups, parents, M)
        return out, {"arpo/branches": float(count["branches"]), **fills.metrics("arpo")}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@register_sampler("aepo", requires={"top_logprobs"})
class AEPOSampler(ARPOSampler):
    """AEPO's entropy-balanced rollout (arXiv 2510.14545 §3 b steps 1-2; algorithms.md §3), on top of
    ARPO's branching.

    1. Entropy pre-monitoring: each prompt first gets one trajectory; the entropy of its first
       segment is H_root. The prompt's number of global (from-the-prompt) trajectories is then
       m = round(k·σ(β(H_root − H̄_tool))), in [1, k], where H̄_tool is the mean entropy of the
       segments written right after tool results (the previous batches', kept across calls; before
       any, H̄_tool = H_root, so m = k/2 as in ARPO). The other k − m slots go to branches.
    2. Consecutive-branch penalty: the branch probability becomes (τ + w·ΔH)·(1 − P̂(l)), where l
       counts the consecutive high-entropy (ΔH > 0) branchings already taken along the path and
       P̂(l) = min(1, penalty·l). The spec leaves P̂'s shape UNVERIFIED: linear, penalty 0.5 here.
    """

    def __init__(self, beta: float = 1.0, penalty: float = 0.5, tool_entropy_momentum: float = 0.9, **arpo):
        super().__init__(**arpo)
        self.beta, self.penalty, self.momentum = beta, penalty, tool_entropy_momentum
        self.tool_entropy: float | None = None    # H̄_tool across calls

    @property
    def state(self) -> dict:
        return {"tool_entropy": self.tool_entropy}

    @state.setter
    def state(self, value: dict) -> None:
        self.tool_entropy = value.get("tool_entropy")

    def global_share(self, h_root: float, h_tool: float | None) -> float:
        return sigmoid(self.beta * (h_root - (h_root if h_tool is None else h_tool)))

    def sample(self, engine, prompts, params, seed, ctx):
        if ctx.env is None:
            raise ValueError("the aepo sampler branches after tool calls: enable env (tools) in the recipe")
        if self.entropy == "topk":
            params = dataclasses.replace(params, logprobs=self.top_logprobs)
        M = params.n
        rng = random.Random(seed)
        vocab = getattr(ctx.tokenizer, "vocab_size", None) or len(ctx.tokenizer)
        groups: list[list[Episode]] = [[new_episode(p)] for p in prompts]
        parents: dict[int, Episode] = {}
        streak: dict[int, int] = {}       # consecutive high-entropy branchings along an episode's path
        planned: list[int | None] = [None] * len(prompts)   # global trajectories decided per prompt
        post_tool: list[float] = []
        count = {"branches": 0}
        fills = FillIns(groups, M, self.fill_ahead)

        def after_turn(i: int, e: Episode) -> list[Episode]:
            later = self.measure(e, vocab)
            if later and e.tool_calls:
                post_tool.append(e.h_now)  # a segment written after a tool result
            g = groups[i]
            if planned[i] is None:  # pre-monitoring: the first segment of the first trajectory is H_root
                planned[i] = min(max(round(M * self.global_share(e.h_init, self.tool_entropy)), 1), M)
                return [new_episode(g[0].traj.prompt_ids) for _ in range(planned[i] - 1)]
            free = M - len(g)
            if e.done or free <= 0:
                return []
            dh = e.h_now - e.h_init
            l = streak.get(id(e), 0)
            scale = 1.0 - min(1.0, self.penalty * l)
            draws = [rng.random() for _ in range(self.branches_per_step)]
            # (τ + w·ΔH)·(1 − P̂(l)) as a threshold on u: u <= scale·(τ + w·ΔH)
            k = max(min(sum(1 for u in draws if u <= scale * (self.tau + self.weight * dh)), free), 0)
            children = [e.fork() for _ in range(k)]
            for child in children:
                parents[id(child)] = e
                streak[id(child)] = l + 1 if dh > 0 else 0
            if k and dh > 0:
                streak[id(e)] = l + 1
            elif not k:
                streak[id(e)] = 0
            count["branches"] += k
            return children

        def ahead(i: int) -> list[Episode]:   # not before pre-monitoring has set the global share
            return fills.ahead(i) if planned[i] is not None else []

        run_episodes(engine, ctx.env, ctx.tokenizer, groups, params, seed, ctx.version, after_turn, fills.drained,
                     ahead)
        planned = [p if p is not None else 1 for p in planned]
        if post_tool:
            mean = sum(post_tool) / len(post_tool)
            self.tool_entropy = mean if self.tool_entropy is None else (
                self.momentum * self.tool_entropy + (1 - self.momentum) * mean)
        out = assemble(groups, parents, M)
        return out, {"aepo/branches": float(count["branches"]), **fills.metrics("aepo"),
                     "aepo/global_per_prompt": sum(planned) / max(len(planned), 1),
                     "aepo/tool_entropy": self.tool_entropy if self.tool_entropy is not None else math.nan}
