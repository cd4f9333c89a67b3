"""ETMR: entropy-fork tree majority rollout, for test-time RL (Liu et al., 2025, arXiv 2508.11356;
algorithms.md §11).

Per prompt: sample `chains` complete chains; at each chain's `forks` highest-entropy generated
positions, fork `branches` new continuations that share the chain's prefix up to that position and
resample from it (the prefix cache makes each fork prefill one token). With `rounds` > 1 the new
branches fork in turn. The group is the first n leaves (chains first); each branch records its
`parent` and `branch_at`. The pseudo-label is a reward: `task.rewards: [{name: majority_vote}]`
scores a leaf 1 when its answer is the group's most common one (TTRL), so no labels are needed.

The fork counts, the number of rounds and the exact fork-point rule are UNVERIFIED in the spec
(abstract only); they are parameters here, and forks never land on a position already forked.
"""
from __future__ import annotations

import dataclasses
import math

from forkrl.rollout.samplers import register_sampler
from forkrl.types import GenerationRequest, Trajectory


def fork_points(entropies: list[float], mask: list[int], k: int, taken: set[int], start: int = 0) -> list[int]:
    """The k generated positions from `start` on with the highest entropy, not already taken, in
    position order. (A branch forks only after its own branch point: before it, forking would
    repeat a fork of its parent.)"""
    cands = [(e, i) for i, (e, m) in enumerate(zip(entropies, mask))
             if i >= start and m and i not in taken and e is not None and not math.isnan(e)]
    return sorted(i for _, i in sorted(cands, key=lambda x: (-x[0], x[1]))[:k])


@register_sampler("etmr", requires={"exact_entropy"})
class ETMRSampler:
    def __init__(self, chains: int = 2, forks: int = 2, branches: int = 1, rounds: int = 1):
        self.chains, self.forks, self.branches, self.rounds = chains, forks, branches, rounds

    def sample(self, engine, prompts, params, seed, ctx):
        if ctx.env is not None:
            raise ValueError("the etmr sampler is single-turn")
        n = params.n
        chains = min(self.chains, n)
        outs = engine.generate([GenerationRequest(p, dataclasses.replace(params, n=chains), keep_kv=True)
                                for p in prompts], seed=seed)
        groups = [[Trajectory.from_completion(p, c, group="", version=ctx.version) for c in o]
                  for p, o in zip(prompts, outs)]
        taken = [[set() for _ in g] for g in groups]
        start = [[0 for _ in g] for g in groups]
        frontier = [list(range(len(g))) for g in groups]  # members that may fork this round
        for rnd in range(self.rounds):
            requests, owners = [], []
            for i, (p, g) in enumerate(zip(prompts, groups)):
                room = n - len(g)
                for m in frontier[i]:
                    t = g[m]
                    for pos in fork_points(t.entropies, t.loss_mask, self.forks, taken[i][m], start[i][m]):
                        if room <= 0:
                            break
                        k = min(self.branches, room)
                        taken[i][m].add(pos)
                        requests.append(GenerationRequest(p + t.tokens[:pos], dataclasses.replace(
                            params, n=k, max_tokens=params.max_tokens - pos), keep_kv=True))
                        owners.append((i, m, pos))
                        room -= k
            if not requests:
                break
            new = [[] for _ in groups]
            for (i, m, pos), comps in zip(owners, engine.generate(requests, seed=seed * 1_000_003 + rnd + 1)):
                parent = groups[i][m]
                for c in comps:
                    t = Trajectory(prompt_ids=list(parent.prompt_ids), tokens=parent.tokens[:pos] + c.token_ids,
                                   logprobs=parent.logprobs[:pos] + c.logprobs,
                                   entropies=parent.entropies[:pos] + c.entropies,
                                   loss_mask=[1] * (pos + len(c.token_ids)), group="",
                                   policy_version=[ctx.version] * (pos + len(c.token_ids)), parent=m, branch_at=pos,
                                   finish=c.finish, text=engine.tokenizer.decode(
                                       parent.tokens[:pos] + (c.token_ids[:-1] if c.finish == "eos" else c.token_ids),
                                       skip_special_tokens=False))
                    new[i].append(len(groups[i]))
                    groups[i].append(t)
                    taken[i].append(set())
                    start[i].append(pos + 1)
            frontier = new
        short = [(i, n - len(g)) for i, g in enumerate(groups) if len(g) < n]
        if short:  # too few fork points (short answers): the rest are independent chains
            more = engine.generate([GenerationRequest(prompts[i], dataclasses.replace(params, n=k)) for i, k in short],
                                   seed=seed * 1_000_003 + 999)
            for (i, _), comps in zip(short, more):
                groups[i] += [Trajectory.from_completion(prompts[i], c, group="", version=ctx.version) for c in comps]
        return groups, {"etmr/leaves": float(sum(len(g) for g in groups)), "etmr/filled": float(sum(k for _, k in short))}
