"""Reward terms: shaping added to each trajectory's reward after the task's rewards, in the order a
recipe lists them (`task.reward_terms`).

    term(trajs, ctx, **params) -> metrics

A term writes its value under its own name in `t.rewards` (logged as `reward/<name>`) and changes
`t.reward`; `ctx` is the step's `CollectContext` (step, lengths, seeds). Terms run wherever a batch
is scored, so a trajectory scored again elsewhere (a swarm peer's external groups) is shaped the
same way.
"""
from __future__ import annotations

import re

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


def _router_needs_the_route_tool(cfg, **_) -> str | None:
    names = [t if isinstance(t, str) else t.get("name") for t in cfg.env.tools] if cfg.env.enabled else []
    if "route" not in names:
        return "needs the route tool (env.enabled: true, env.tools: [{name: route, pool: [...]}]) to price the calls"
    return None


@register_reward_term("router_r1", check=_router_needs_the_route_tool)
def router_r1(trajs, ctx, *, alpha: float = 0.0, metric: str = "em", buffer_size: int = 1000) -> dict:
    """Router-R1's reward (algorithms.md §20), in place of the task's: -1 when the format check fails
    (forkrl.envs.router.format_problem on the policy's text, or a call the route tool refused as an
    unknown model), 0 without an answer or with a zero outcome, else (1 - alpha) * outcome +
    alpha * R_cost. The outcome is `metric` (em | f1) of the last <answer> against the sample's
    answer (a list of golds, or one). R_cost is the percentile-normalised sqrt of what the
    trajectory's routed calls cost (ToolCall.cost) over a sliding buffer of the last `buffer_size`
    trajectories; every trajectory's cost enters it, in batch order (Router-R1 leaves open which).
    Logged per trajectory: reward/router_format (0 or -1), reward/router_outcome, reward/router_cost
    (USD) and reward/router_cost_reward; per step, `router/calls/<model>`: the share of the step's
    calls each model answered (a refused call counts as `unknown_model` or `malformed_route`)."""
    from forkrl.envs.router import (
        cost_reward,
        exact_match,
        format_problem,
        parse_route,
        token_f1,
        total_reward,
    )
    from forkrl.tasks.answers import extract_answer
    if metric not in ("em", "f1"):
        raise ValueError(f"router_r1 metric must be 'em' or 'f1', got {metric!r}")
    score = exact_match if metric == "em" else token_f1
    buffer = ctx.state.setdefault("cost_buffer", [])
    routes: dict[str, int] = {}
    for t in trajs:
        problem = format_problem(t.text, len(t.tool_calls))
        if problem is None and any(c.error == "unknown_model" for c in t.tool_calls):
            problem = "unknown model"
        answer = extract_answer(t.text, "answer_tag")
        golds = t.sample.answer if isinstance(t.sample.answer, list) else [str(t.sample.answer)]
        outcome = score(answer, golds) if answer is not None else 0.0
        cost = sum(c.cost for c in t.tool_calls)
        r_cost = cost_reward(cost, buffer, buffer_size)
        t.rewards.update({"router_format": 0.0 if problem is None else -1.0, "router_outcome": outcome,
                          "router_cost": cost, "router_cost_reward": r_cost})
        t.reward = total_reward(problem is None, answer is not None, outcome, r_cost, alpha)
        # the i-th search block is the i-th call; a refused call counts under its error (unknown_model,
        # malformed_route), so the metric names stay the pool's
        for query, call in zip(re.findall(r"<search>(.*?)</search>", t.text, re.S), t.tool_calls):
            route = parse_route(query)
            name = route[0] if call.error is None and route is not None else (call.error or "malformed_route")
            routes[name] = routes.get(name, 0) + 1
    total = sum(routes.values())
    return {f"router/calls/{name}": n / total for name, n in sorted(routes.items())}


@register_reward_term("team_reward")
def team_reward(trajs, ctx) -> dict:
    """MARFT's rewards (algorithms.md §19): the environment's reward of an episode goes to its last
    step (the last agent of the profile) and every earlier step gets 0; every step of the episode
    counts as correct when the last one is. `t.rewards["team_reward"]` holds the episode's reward.
    Metrics: `marft/team_reward`, the mean episode reward, and `marft/team_accuracy`."""
    episodes: dict[tuple[str, str], list] = {}
    for t in trajs:
        if t.episode_step is None:
            raise ValueError("team_reward shares an episode's reward among its steps, but a trajectory is not a step "
                             "of an episode (use it with rollout.sampler: marft)")
        episodes.setdefault((t.group, t.episode_step.episode), []).append(t)
    rewards, correct = [], []
    for steps in episodes.values():
        last = max(steps, key=lambda t: t.episode_step.index)
        rewards.append(last.reward)
        correct.append(last.correct)
        for t in steps:
            t.rewards["team_reward"] = last.reward
            t.correct = last.correct
            if t is not last:
                t.reward = 0.0
    if not rewards:
        return {}
    return {"marft/team_reward": sum(rewards) / len(rewards), "marft/team_accuracy": sum(correct) / len(correct)}
