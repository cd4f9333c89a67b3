"""APRIL: active partial rollouts (Zhou et al., 2025, arXiv 2509.18521; algorithms.md §6).

Each step asks for B groups of n. The sampler keeps B' = ceil(B · over_sampling) groups in flight:
groups left over from the last step first (FIFO), then fresh prompts. It stops generating as soon as
B groups are complete; every unfinished completion stays in its group with its tokens, log-probs,
entropies and the policy version of each token, and continues next step from exactly where it
stopped, with the token budget that remains (max_tokens − tokens so far; none left = truncated).
Groups finished beyond the B returned also wait in the buffer and are returned first next step.
Nothing is returned twice: a group leaves the buffer when it is returned.

Continued tokens were sampled by an older policy; `Trajectory.policy_version` records which, the
learner recomputes the old log-probs, and `algo.rollout_correction` (e.g. token_tis) corrects the
difference with truncated importance weights (§16). The buffer is part of the checkpoint (`state`).
Single-turn.
"""
from __future__ import annotations

import dataclasses
import math

from forkrl.rollout.samplers import register_sampler
from forkrl.types import GenerationRequest, Trajectory


@dataclasses.dataclass(eq=False)
class _Group:
    prompt_ids: list[int]
    sample: object
    members: list[Trajectory]
    done: list[bool]

    @property
    def complete(self) -> bool:
        return all(self.done)


@register_sampler("april", requires={"stop_when"})
class APRILSampler:
    def __init__(self, over_sampling: float = 2.0):
        if over_sampling < 1:
            raise ValueError(f"over_sampling must be >= 1 (B' >= B), got {over_sampling}")
        self.over_sampling = over_sampling
        self.buffer: list[_Group] = []

    # checkpointed by the trainer: the partial groups waiting for the next step
    @property
    def state(self) -> dict:
        return {"buffer": self.buffer}

    @state.setter
    def state(self, value: dict) -> None:
        self.buffer = list(value.get("buffer", []))

    def prompts_wanted(self, groups: int) -> int:
        """Fresh prompts this step: B' minus the groups already waiting."""
        return max(math.ceil(groups * self.over_sampling) - len(self.buffer), 0)

    def sample(self, engine, prompts, params, seed, ctx):
        if ctx.env is not None:
            raise ValueError("the april sampler is single-turn; tool rollouts use independent or arpo")
        target = ctx.groups or len(prompts)
        samples = ctx.samples or [None] * len(prompts)
        empty = lambda p: Trajectory(prompt_ids=list(p), tokens=[], logprobs=[], entropies=[], loss_mask=[],
                                     group="", policy_version=[], finish="abort")
        fresh = [_Group(list(p), s, [empty(p) for _ in range(params.n)], [False] * params.n)
                 for p, s in zip(prompts, samples)]
        flight = self.buffer + fresh
        requests, owner = [], []
        for g in flight:
            for k, t in enumerate(g.members):
                if g.done[k]:
                    continue
                left = params.max_tokens - len(t.tokens)
                if left <= 0:
                    g.done[k], t.finish = True, "length"
                    continue
                requests.append(GenerationRequest(g.prompt_ids + t.tokens, dataclasses.replace(params, n=1, max_tokens=left)))
                owner.append((g, k))
        pending = {id(g): 0 for g in flight}
        for g, _ in owner:
            pending[id(g)] += 1
        already = sum(1 for g in flight if pending[id(g)] == 0)
        by_request = [id(g) for g, _ in owner]

        def enough(finished: list[int]) -> bool:
            left = dict(pending)
            for i, c in enumerate(finished):
                left[by_request[i]] -= c
            return already + sum(1 for g in flight if pending[id(g)] > 0 and left[id(g)] == 0) >= target

        outs = engine.generate(requests, seed=seed, stop_when=enough) if requests else []
        resumed_tokens = 0
        for (g, k), (c,) in zip(owner, outs):
            t = g.members[k]
            resumed_tokens += len(t.tokens) if c.token_ids else 0
            t.tokens += c.token_ids
            t.logprobs += c.logprobs
            t.entropies += c.entropies
            t.loss_mask += [1] * len(c.token_ids)
            t.policy_version += [ctx.version] * len(c.token_ids)
            if c.finish != "abort":
                g.done[k], t.finish = True, c.finish
                t.text = engine.tokenizer.decode(t.tokens[:-1] if c.finish == "eos" else t.tokens,
                                                 skip_special_tokens=False)
        ready = [g for g in flight if g.complete][:target]
        self.buffer = [g for g in flight if g not in ready]
        groups = []
        stale = total = 0
        for g in ready:
            for t in g.members:
                t.sample = g.sample
                stale += sum(v < ctx.version for v in t.policy_version)
                total += len(t.policy_version)
            groups.append(g.members)
        return groups, {"april/returned_groups": float(len(groups)), "april/buffered_groups": float(len(self.buffer)),
                        "april/partial_in_buffer": float(sum(not g.complete for g in self.buffer)),
                        "april/stale_token_frac": stale / max(total, 1),
                        "april/resumed_tokens": float(resumed_tokens)}
