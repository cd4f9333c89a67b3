"""LATR: lookahead tree-based rollouts (Xing et al., 2025, arXiv 2510.24302; algorithms.md §10).

Per prompt, n_kt = round(n·η) group members come from a tree, the rest from ordinary sampling;
η follows `mix_ratio_schedule` over training progress.

Tree phase. Chains advance by their top-1 token. At a step where a chain's top-m candidates hold a
v_j (j ≥ 2) with p_j > τ_abs and p_1 − p_j < τ_rel, a new branch starts: the chain's prefix plus v_j.
Candidates are taken in (step, chain) order while the prompt has fewer than n_kt live branches.
A branch born at step b is compared with its parent's continuation at steps b + r, r in
`filter_steps`, and removed when the two suffixes since b are too similar: suffix-match score >
τ_sm, ROUGE-L > τ_rouge, or normalised edit distance < τ_ed (each criterion optional). Branches
that ended (EOS) are not compared. A pruned branch's children are then compared with, and become
members under, its parent, with which they share the shorter prefix. The phase ends at the first
step where the prompt holds at least (0.98 − decay·step/max_tokens)·n_kt branches and none is still
inside a pruning window, or at `force_return_step`; every branch then finishes with ordinary
sampling from its tree prefix.

Because tree-phase chains move greedily, a chain's continuation is fixed once it is born. Every
chain is a greedy request in the engine's continuous batch (`engine.stream`), and a prompt's tree
steps as far as all its chains have decoded (`stream.progress`). What a chain decodes beyond the
step where it is pruned or where the tree phase ends is thrown away (`latr/discarded_tokens`).
`run_ahead` bounds it: a chain runs at most that many tokens past its tree's step, then waits (its
states stay in the prefix cache, so going on prefills one token). The bound pays when the batch is
narrower than the chains; with free slots each resumption costs a copy of the chain's states from
the cache, so the default (null) runs to the horizon. A fork is a new
request from its parent's prefix (the engine copies those states from the parent's slot); a pruned
chain is cancelled; when a prompt's tree phase ends, its chains are cancelled and its members'
sampling starts at once, while other prompts' trees still grow. On an engine without a stream each
chain arrives whole (decoded to the horizon): the same tree, more tokens. The i.i.d. members start
with the first step. Members record `parent` and `branch_at`.
"""
from __future__ import annotations

import dataclasses
import math

from forkrl.rollout.samplers import register_sampler
from forkrl.types import GenerationRequest, Trajectory


def suffix_match(a: list[int], b: list[int]) -> float:
    """Length of the longest suffix of one sequence found contiguously in the other, / len(a)."""
    if not a:
        return 0.0

    def longest(x, y):
        best = 0
        for n in range(1, len(x) + 1):
            tail = x[-n:]
            if any(y[i:i + n] == tail for i in range(len(y) - n + 1)):
                best = n
            else:
                break
        return best

    return max(longest(a, b), longest(b, a)) / len(a)


def rouge_l(a: list[int], b: list[int]) -> float:
    """ROUGE-L F1 from the longest common subsequence."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            cur[j + 1] = prev[j] + 1 if x == y else max(prev[j + 1], cur[j])
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def edit_distance(a: list[int], b: list[int]) -> float:
    """Levenshtein distance / the longer length (0 = identical, 1 = nothing in common)."""
    if not a and not b:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1] / max(len(a), len(b))


def valid_candidates(top: list[tuple[int, float]], tau_abs: float, tau_rel: float) -> list[int]:
    """Alternative tokens v_j (j ≥ 2) worth a branch: p_j > τ_abs and p_1 − p_j < τ_rel."""
    if len(top) < 2:
        return []
    p1 = math.exp(top[0][1])
    return [v for v, lp in top[1:] if math.exp(lp) > tau_abs and p1 - math.exp(lp) < tau_rel]


def schedule_value(schedule: dict, step: int) -> float:
    """Piecewise-constant schedule {from_step: value} (LATR's mix_ratio_schedule); before the first
    key, the first value."""
    points = sorted((int(k), float(v)) for k, v in schedule.items())
    value = points[0][1]
    for k, v in points:
        if step >= k:
            value = v
    return value


@dataclasses.dataclass(eq=False)
class _Branch:
    tokens: list[int]                # tree-phase tokens after the prompt (greedy, extended lazily)
    logprobs: list[float]
    entropies: list[float]
    top: list                        # top-m candidates per token (None for a branch's forced first token)
    born: int                        # step of its first own token (0 for the root)
    parent: _Branch | None = None    # the nearest live ancestor (a pruned parent hands its children up)
    shared: int = 0                  # leading tokens shared with `parent` (= born until re-parented)
    eos_at: int | None = None        # number of tokens when the chain emitted EOS
    pruned: bool = False
    request: int | None = None       # the running greedy request that extends it
    base: int = 0                    # len(tokens) when that request was submitted

    def absorb(self, ids, logprobs, entropies, top, finish: str | None) -> int:
        """Take the tokens its request has decoded beyond what the branch holds; how many were new."""
        k = len(self.tokens) - self.base
        new = max(len(ids) - k, 0)
        self.tokens += ids[k:]
        self.logprobs += logprobs[k:]
        self.entropies += entropies[k:]
        self.top += (top or [None] * len(ids))[k:len(ids)]
        if finish == "eos":
            self.eos_at = len(self.tokens)
        return new

    def own_decoded(self) -> int:
        """Tokens its chain decoded that it holds (a branch's first token is its parent's candidate)."""
        return len(self.tokens) - (self.born + 1 if self.parent is not None else 0)

    def ended_by(self, step: int) -> bool:
        return self.eos_at is not None and self.eos_at <= step + 1


@register_sampler("latr", requires={"top_logprobs", "exact_entropy"})
class LATRSampler:
    def __init__(self, max_branch_per_token: int = 2, tau_abs: float = 0.15, tau_rel: float = 0.25,
                 filter_steps: tuple[int, ...] = (20, 30, 50), tau_suffix: float | None = 0.2,
                 tau_rouge: float | None = 0.5, tau_edit: float | None = None,
                 mix_ratio_schedule: dict | None = None,
                 return_threshold_decay: float = 0.05, force_return_step: int = 1024, run_ahead: int | None = None):
        self.m = max_branch_per_token
        self.tau_abs, self.tau_rel = tau_abs, tau_rel
        self.filter_steps = tuple(sorted(filter_steps))
        self.tau_suffix, self.tau_rouge, self.tau_edit = tau_suffix, tau_rouge, tau_edit
        self.schedule = mix_ratio_schedule or {0: 1.0, 100: 0.75, 200: 0.5, 300: 0.25}
        self.decay = return_threshold_decay
        self.force_return_step = force_return_step
        if run_ahead is not None and run_ahead < 1:
            raise ValueError(f"latr: run_ahead must be at least 1 (or null: to the horizon), got {run_ahead}")
        self.run_ahead = run_ahead

    def too_similar(self, a: list[int], b: list[int]) -> bool:
        return ((self.tau_suffix is not None and suffix_match(a, b) > self.tau_suffix)
                or (self.tau_rouge is not None and rouge_l(a, b) > self.tau_rouge)
                or (self.tau_edit is not None and edit_distance(a, b) < self.tau_edit))

    def sample(self, engine, prompts, params, seed, ctx):
        if ctx.env is not None:
            raise ValueError("the latr sampler is single-turn; use arpo for tool-using rollouts")
        from forkrl.rollout.engine.stream import open_stream
        n = params.n
        eta = schedule_value(self.schedule, ctx.step)
        n_kt = min(max(round(n * eta), 0), n)
        horizon = min(self.force_return_step, params.max_tokens)
        tree_params = dataclasses.replace(params, temperature=0.0, n=1, logprobs=self.m, stop=list(params.stop))
        self.pruned = 0
        chain_decoded = 0  # tokens every tree-phase chain decoded, kept or not
        grow = n_kt > 1
        trees = [[_Branch([], [], [], [], born=0)] if grow else [] for _ in prompts]
        stream = open_stream(engine, seed)
        jobs: dict[int, tuple[int, _Branch | None]] = {}   # finishing requests: (prompt, branch or None: i.i.d.)
        chains: dict[int, tuple[int, _Branch]] = {}        # greedy tree-phase requests
        done: dict[int, list] = {}
        step = [0] * len(prompts)
        cut: list[int | None] = [None if grow else -1 for _ in prompts]
        window = self.filter_steps[-1] if self.filter_steps else 0

        def finish_tree(i: int) -> None:
            """Prompt i's tree phase ended: cancel its chains, cut them at the phase's end, start sampling."""
            end = cut[i] + 1
            for b in trees[i]:
                if b.request is not None:
                    stream.cancel(b.request)
                    chains.pop(b.request)
                    b.request = None
                if len(b.tokens) > end:  # sampling takes over after `end` tokens
                    b.tokens, b.logprobs, b.entropies, b.top = b.tokens[:end], b.logprobs[:end], b.entropies[:end], b.top[:end]
                if b.eos_at is not None and b.eos_at > end:
                    b.eos_at = None
                if b.eos_at is None and len(b.tokens) < params.max_tokens:
                    jobs[stream.add(GenerationRequest(prompts[i] + b.tokens, dataclasses.replace(
                        params, n=1, max_tokens=params.max_tokens - len(b.tokens))))] = (i, b)
            if n_kt - len(trees[i]) > 0:  # the tree did not fill its share
                jobs[stream.add(GenerationRequest(prompts[i], dataclasses.replace(params, n=n_kt - len(trees[i]))))] = (i, None)

        def advance(i: int) -> None:
            """Run prompt i's tree steps as far as its chains have been decoded."""
            while cut[i] is None:
                s = step[i]
                waiting = False
                reach = horizon if self.run_ahead is None else min(s + self.run_ahead, horizon)
                for b in trees[i]:
                    if b.eos_at is None and b.request is None and len(b.tokens) < reach:
                        b.base = len(b.tokens)
                        b.request = stream.add(GenerationRequest(prompts[i] + b.tokens, dataclasses.replace(
                            tree_params, max_tokens=reach - len(b.tokens)), keep_kv=True))
                        chains[b.request] = (i, b)
                    if b.eos_at is None and len(b.tokens) <= s < horizon:
                        waiting = True
                if waiting:
                    return
                before = set(map(id, trees[i]))
                self._tree_step(trees, i, s, n_kt, horizon, window, engine.eos_ids, cut)
                alive = set(map(id, trees[i]))
                for rid, (j, b) in list(chains.items()):
                    if j == i and id(b) in before - alive:   # pruned: stop decoding it
                        stream.cancel(rid)
                        del chains[rid]
                step[i] += 1
            finish_tree(i)

        for i, p in enumerate(prompts):
            if n - n_kt > 0 or not grow:
                jobs[stream.add(GenerationRequest(p, dataclasses.replace(params, n=n - (n_kt if grow else 0))))] = (i, None)
            if grow:
                advance(i)
        while not stream.done:
            for rid, comps in stream.step():
                if rid in chains:
                    i, b = chains.pop(rid)
                    c = comps[0]
                    chain_decoded += b.absorb(c.token_ids, c.logprobs, c.entropies, c.top_logprobs, c.finish)
                    b.request = None
                elif rid in jobs:
                    done[rid] = comps
            for rid, (i, b) in list(chains.items()):
                live = stream.progress(rid)
                if live is not None:
                    q = live[0]
                    chain_decoded += b.absorb(q.ids, q.logprobs, q.entropies, q.top, q.finish)
            for i in range(len(prompts)):
                if cut[i] is None:
                    advance(i)
        groups, branch_points = [], 0
        for i, p in enumerate(prompts):
            branches = trees[i]
            rest = {id(b): comps[0] for rid, comps in done.items() for j, b in [jobs[rid]] if j == i and b is not None}
            iid = [c for rid, comps in done.items() if jobs[rid] == (i, None) for c in comps]
            index = {id(b): k for k, b in enumerate(branches)}
            members = []
            for br in branches:
                c = rest.get(id(br))
                t = Trajectory(prompt_ids=list(p), tokens=br.tokens + (c.token_ids if c else []),
                               logprobs=br.logprobs + (c.logprobs if c else []),
                               entropies=br.entropies + (c.entropies if c else []),
                               loss_mask=[1] * (len(br.tokens) + (len(c.token_ids) if c else 0)), group="",
                               finish=c.finish if c else ("eos" if br.eos_at is not None else "length"),
                               text=engine.tokenizer.decode(br.tokens + (c.token_ids if c else []),
                                                            skip_special_tokens=True))
                t.policy_version = [ctx.version] * len(t.tokens)
                if br.parent is not None:  # live: pruning hands children up to a live ancestor
                    t.parent, t.branch_at = index[id(br.parent)], br.shared
                    branch_points += 1
                members.append(t)
            members += [Trajectory.from_completion(p, c, group="", version=ctx.version) for c in iid]
            groups.append(members)
        return groups, {"latr/tree_members": float(sum(len(b) for b in trees)), "latr/eta": eta,
                        "latr/pruned": float(self.pruned),
                        # what the chains decoded that no member keeps: pruned chains, and tokens past
                        # the step where a tree phase ended (sampling takes over there)
                        "latr/discarded_tokens": float(chain_decoded - sum(b.own_decoded() for t in trees for b in t))}

    def _tree_step(self, trees, i, step, capacity, horizon, window, eos_ids, cut) -> None:
        """One step of prompt i's tree: prune, maybe end the phase, then fork."""
        branches = trees[i]
        for br in branches:  # pruning checks due at this step
            if br.parent is None or br.pruned or br.ended_by(step) or br.parent.ended_by(step):
                continue
            due = step - br.born in self.filter_steps and len(br.parent.tokens) >= step
            if due and self.too_similar(br.tokens[br.born:step], br.parent.tokens[br.born:step]):
                br.pruned = True
                self.pruned += 1
                # its children now compare with (and hang from) its parent, with which they share the
                # shorter prefix; a dead branch is not extended, so the tree cannot depend on how far
                # chains had been decoded ahead
                for child in branches:
                    if child.parent is br:
                        child.parent, child.shared = br.parent, min(child.shared, br.shared)
        branches = trees[i] = [b for b in branches if not b.pruned]
        in_window = any(b.parent is not None and step - b.born < window and not b.ended_by(step) for b in branches)
        threshold = (0.98 - self.decay * step / max(horizon, 1)) * capacity
        if step >= horizon or (step > 0 and len(branches) >= threshold and not in_window) or \
                all(b.ended_by(step - 1) or len(b.tokens) <= step for b in branches):
            cut[i] = step
            return
        spawned = []  # new branches at this step, in chain order, while capacity lasts
        for b in branches:
            if step >= len(b.top) or b.top[step] is None or b.ended_by(step - 1):
                continue
            for v in valid_candidates(b.top[step], self.tau_abs, self.tau_rel):
                if len(branches) + len(spawned) >= capacity:
                    break
                lp = next(lp for tok, lp in b.top[step] if tok == v)
                child = _Branch(b.tokens[:step] + [v], b.logprobs[:step] + [lp], b.entropies[:step] + [b.entropies[step]],
                                b.top[:step] + [None], born=step, parent=b, shared=step)
                if v in eos_ids:
                    child.eos_at = step + 1
                spawned.append(child)
        branches += spawned
