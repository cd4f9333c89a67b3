"""Samplers decide how a step's sampling budget is spent; every one returns, per prompt, a group of
`Trajectory` objects (with `parent` / `branch_at` where they share a prefix), so any sampler
combines with any loss.

- `independent`: n i.i.d. samples per prompt (multi-turn with tools when an env is given).
- `arpo`: entropy-adaptive branching after tool results (ARPO, algorithms.md §2), in `arpo.py`.
- `latr`: branching at uncertain tokens with lookahead pruning (LATR, §10), in `latr.py`.
- `branchgrpo`: every path splits at fixed response depths (BranchGRPO, §23), in `branchgrpo.py`.
- `semi_online`: UI-S1's replay of expert trajectories with the policy's own history and patches
  (§18), one sample per step, in `semi_online.py`.
- `april`: over-provisioned requests, stop when enough groups finished, unfinished ones resume
  next step (APRIL, §6), in `april.py`. It asks for its own number of fresh prompts
  (`prompts_wanted`) and keeps state across steps (`state`, checkpointed).

A sampler that needs an engine feature names it in its decorator, `@register_sampler("april",
requires={"stop_when"})`; `forkrl.rollout.build_engine` refuses an engine without it.

`run_sampler` wraps a call with the budget accounting that makes samplers comparable at equal cost:
trajectories, branch points, decoded / prefilled / cache-served tokens, tool calls, wall time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from forkrl.registry import SAMPLERS, register_sampler
from forkrl.types import GenerationRequest, SamplingParams, Trajectory


@dataclass
class SamplerContext:
    """What a sampler may use besides the engine: the tool env (None: single-turn), the tokenizer,
    the policy version stamped on new tokens, the training step (schedules), the task samples behind
    the prompts (a sampler that returns groups from earlier calls sets `Trajectory.sample` itself)
    and the number of groups the step wants (None: one per prompt)."""
    env: Any = None
    tokenizer: Any = None
    version: int = 0
    step: int = 0
    samples: list | None = None
    groups: int | None = None


@dataclass
class RolloutBudget:
    trajectories: int = 0
    branch_points: int = 0
    decoded_tokens: int = 0
    prefilled_tokens: int = 0
    cached_tokens: int = 0
    env_tokens: int = 0          # tool results inserted into the trajectories (each counted where it was inserted)
    tool_calls: int = 0
    steps: int = 0               # decode steps of the engine's continuous batch (0: an engine that does not count them)
    attended_keys: int = 0       # keys the decode steps attended to, and those read from a slot rows share
    shared_keys: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, other: RolloutBudget) -> None:
        """Sum another call's spending into this one (a step's refill rounds)."""
        for f in ("trajectories", "branch_points", "decoded_tokens", "prefilled_tokens", "cached_tokens",
                  "env_tokens", "tool_calls", "steps", "attended_keys", "shared_keys", "seconds"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0.0) + v

    def metrics(self, prefix: str = "sampler/") -> dict[str, float]:
        n = max(self.trajectories, 1)
        out = {f"{prefix}trajectories": float(self.trajectories), f"{prefix}branch_points": float(self.branch_points),
               f"{prefix}decoded_tokens": float(self.decoded_tokens),
               f"{prefix}prefilled_tokens": float(self.prefilled_tokens),
               f"{prefix}cached_tokens": float(self.cached_tokens), f"{prefix}tool_calls": float(self.tool_calls),
               # one currency: the policy's sampled tokens, the environment's, and the model's work on them
               f"{prefix}policy_tokens": float(self.decoded_tokens), f"{prefix}env_tokens": float(self.env_tokens),
               "time/sampler_s": self.seconds,
               f"{prefix}tokens_per_trajectory": (self.decoded_tokens + self.prefilled_tokens) / n}
        if self.steps:
            out[f"{prefix}mean_batch_rows"] = self.decoded_tokens / self.steps
        if self.attended_keys:
            out[f"{prefix}attended_keys"] = float(self.attended_keys)
            out[f"{prefix}shared_keys"] = float(self.shared_keys)
        out.update({f"{prefix}{k}": v for k, v in self.extra.items()})
        return out


def env_tokens(t: Trajectory) -> int:
    """Observation tokens (loss mask 0) a trajectory added itself: after its branch point, since a
    branch's prefix is its parent's."""
    return sum(1 for m in t.loss_mask[t.branch_at or 0:] if not m)


def run_sampler(sampler, engine, prompts: list[list[int]], params: SamplingParams, seed: int,
                ctx: SamplerContext | None = None) -> tuple[list[list[Trajectory]], RolloutBudget]:
    """Calls `sampler.sample` and measures what it spent through the engine's counters."""
    ctx = ctx or SamplerContext()
    stats = engine.stats
    s0 = (stats.decode_tokens, stats.prefill_tokens, stats.cached_tokens, stats.steps, stats.attended_keys,
          stats.shared_keys)
    start = time.perf_counter()
    groups, extra = sampler.sample(engine, prompts, params, seed, ctx)
    trajs = [t for g in groups for t in g]
    budget = RolloutBudget(trajectories=len(trajs), branch_points=sum(t.parent is not None for t in trajs),
                           decoded_tokens=stats.decode_tokens - s0[0],
                           prefilled_tokens=stats.prefill_tokens - s0[1],
                           cached_tokens=stats.cached_tokens - s0[2],
                           env_tokens=sum(env_tokens(t) for t in trajs),
                           tool_calls=sum(len(t.tool_calls) for t in trajs), steps=stats.steps - s0[3],
                           attended_keys=stats.attended_keys - s0[4], shared_keys=stats.shared_keys - s0[5],
                           seconds=time.perf_counter() - start, extra=extra)
    return groups, budget


@register_sampler("independent")
class IndependentSampler:
    """`params.n` independent samples per prompt; with a tool env, independent multi-turn episodes."""

    def __init__(self):
        pass

    def sample(self, engine, prompts, params, seed, ctx):
        if ctx.env is not None:
            from forkrl.rollout.agent import multi_turn_rollout
            trajs = multi_turn_rollout(engine, ctx.env, ctx.tokenizer, prompts, [""] * len(prompts),
                                       [None] * len(prompts), params, seed, version=ctx.version)
            return [trajs[i * params.n:(i + 1) * params.n] for i in range(len(prompts))], {}
        outs = engine.generate([GenerationRequest(p, params) for p in prompts], seed=seed)
        return [[Trajectory.from_completion(p, c, group="", version=ctx.version) for c in o]
                for p, o in zip(prompts, outs)], {}


def build_sampler(name: str, params: dict | None = None):
    cls = SAMPLERS.get(name)
    try:
        return cls(**(params or {}))
    except TypeError as e:
        raise ValueError(f"rollout.sampler_params for {name!r}: {e}") from None


@register_sampler("broad")
class BroadSampler(IndependentSampler):
    """BroRL's broadened exploration (arXiv 2510.01180; algorithms.md §12.3): many rollouts per prompt
    (`n`, default: rollout.samples_per_prompt) instead of more steps. The engine prefills each prompt
    once for all of them; `broad/prefill_shared_tokens` counts the prompt tokens that sharing saved."""

    def __init__(self, n: int | None = None):
        self.n = n

    def sample(self, engine, prompts, params, seed, ctx):
        import dataclasses
        if self.n is not None:
            params = dataclasses.replace(params, n=self.n)
        groups, extra = super().sample(engine, prompts, params, seed, ctx)
        extra["broad/prefill_shared_tokens"] = float(sum((params.n - 1) * len(p) for p in prompts))
        return groups, extra
