"""Reward terms: shaping added to each trajectory's reward after the task's rewards, in the order a
recipe lists them (`task.reward_terms`).

    term(trajs, ctx, **params) -> metrics

A term writes its value under its own name in `t.rewards` (logged as `reward/<name>`) and changes
`t.reward`; `ctx` is the step's `CollectContext` (step, lengths, seeds). Terms run wherever a batch
is scored, so a trajectory scored again elsewhere (a swarm peer's external groups) is shaped the
same way.
"""
from __future__ import annotations

import torch

from forkrl.algos.schedules import cosine_decay
from forkrl.algos.selection import overlong_penalty
from forkrl.registry import register_reward_term
from forkrl.tasks.flaws import load_detector


@register_reward_term("overlong")
def overlong(trajs, ctx, *, buffer: int = 32, factor: float = 1.0) -> dict:
    """DAPO's soft overlong punishment (algorithms.md §1.2) with L_max = rollout.max_new_tokens:
    0 up to L_max − buffer generated tokens, then falling linearly to −factor at L_max."""
    if not trajs:
        return {}
    pen = overlong_penalty(torch.tensor([t.num_generated for t in trajs]), ctx.max_new_tokens, buffer, factor).tolist()
    for t, p in zip(trajs, pen):
        t.rewards["overlong"] = p
        t.reward = t.reward + p
    return {}


@register_reward_term("flawed_positive")
def flawed_positive(trajs, ctx, *, penalty: float = 1.0, detector: str = "rule") -> dict:
    """FAPO (algorithms.md §13.5): a correct rollout whose reasoning a detector flags as flawed loses
    `penalty`. `detector`: "rule" (arithmetic steps checked by forkrl.tasks.flaws) or
    "module:callable" (prompt, completion, answer) -> index of the first flawed step, or −1."""
    detect = load_detector(detector)
    for t in trajs:
        p = -penalty if t.correct >= 1 and detect(t.sample.prompt, t.text, t.sample.answer) >= 0 else 0.0
        t.rewards["flawed_positive"] = p
        t.reward = t.reward + p
    return {}


@register_reward_term("tool_call_bonus")
def tool_call_bonus(trajs, ctx, *, coef: float = 0.1, decay_steps: int = 200) -> dict:
    """SPEAR's intrinsic tool-call reward (algorithms.md §13.4 step 2): coef × tool calls, the coefficient
    decaying to 0 over `decay_steps` steps on a cosine; a wrong answer's total is capped at 0, so calling
    tools never pays by itself."""
    c = cosine_decay(ctx.step - 1, decay_steps, coef)
    for t in trajs:
        bonus = c * len(t.tool_calls)
        t.rewards["tool_call_bonus"] = bonus
        total = t.reward + bonus
        t.reward = total if t.correct >= 1 else min(0.0, total)
    return {}
