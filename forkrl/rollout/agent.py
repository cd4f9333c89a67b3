"""Multi-turn rollouts with tools: generate until a tool call closes, run it, append the observation,
continue — until an answer, EOS, the turn or tool-call limit, or the token budget.

`Trajectory.text` is what the policy wrote (its turns, joined), which rewards read; the observations
are in `tokens` only. Token-in, token-out: each turn continues from the exact token ids of the prompt, of everything the
policy sampled and of the observations, so the tokens trained on are the tokens sampled (nothing is
decoded and re-encoded). Observation tokens carry loss mask 0, log-prob 0 and entropy nan.
"""
from __future__ import annotations

import dataclasses
import math

from forkrl.envs.env import ToolEnv
from forkrl.rollout.types import GenerationRequest, SamplingParams, ToolCall, Trajectory


@dataclasses.dataclass
class _Episode:
    traj: Trajectory
    tool_calls: int = 0
    turns: int = 0
    done: bool = False


def multi_turn_rollout(engine, env: ToolEnv, tokenizer, prompt_ids: list[list[int]], groups: list[str],
                       samples: list, params: SamplingParams, seed: int, version: int = 0) -> list[Trajectory]:
    """`params.n` episodes per prompt; returns trajectories grouped by prompt in order."""
    b = env.budget
    stop = list(dict.fromkeys([*params.stop, *env.protocol.stop_strings()]))
    episodes = [_Episode(Trajectory(prompt_ids=list(p), tokens=[], logprobs=[], entropies=[], loss_mask=[],
                                    group=g, policy_version=[], sample=s, finish="length"))
                for p, g, s in zip(prompt_ids, groups, samples) for _ in range(params.n)]
    for turn in range(b.max_turns):
        live = [e for e in episodes if not e.done]
        if not live:
            break
        requests = []
        for e in live:
            left = min(params.max_tokens, b.max_total_tokens - len(e.traj.tokens))
            requests.append(GenerationRequest(e.traj.prompt_ids + e.traj.tokens,
                                              dataclasses.replace(params, n=1, max_tokens=max(left, 1), stop=stop),
                                              keep_kv=turn + 1 < b.max_turns))  # the next turn continues it
        outs = engine.generate(requests, seed=(seed * 1_000_003 + turn) % 2 ** 62)
        calls_per_episode = []
        for e, (c,) in zip(live, outs):
            t = e.traj
            t.tokens += c.token_ids
            t.logprobs += c.logprobs
            t.entropies += c.entropies
            t.loss_mask += [1] * len(c.token_ids)
            t.policy_version += [version] * len(c.token_ids)
            t.text += c.text
            e.turns += 1
            calls = env.protocol.parse_calls(c.text) if c.finish == "stop" else []
            if c.finish != "stop" or env.protocol.has_answer(c.text) or not calls:
                e.done, t.finish = True, ("answer" if env.protocol.has_answer(c.text) else c.finish)
                calls = []
            elif len(t.tokens) >= b.max_total_tokens:
                e.done, t.finish, calls = True, "length", []
            elif e.turns >= b.max_turns:
                e.done, t.finish, calls = True, "turns", []
            elif e.tool_calls + len(calls) > b.max_tool_calls:
                e.done, t.finish, calls = True, "tool_budget", []
            calls_per_episode.append(calls)
        flat = [(e, c) for e, calls in zip(live, calls_per_episode) for c in calls]
        results = env.execute([c for _, c in flat]) if flat else []
        per_episode: dict[int, list] = {}
        for (e, c), r in zip(flat, results):
            per_episode.setdefault(id(e), []).append((c, r))
        for e in live:
            if id(e) not in per_episode:
                continue
            t = e.traj
            pairs = per_episode[id(e)]
            text = env.protocol.format_observation([r.text for _, r in pairs])
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:b.max_observation_tokens]
            ids = ids[:max(b.max_total_tokens - len(t.tokens), 0)]
            start = len(t.tokens)
            t.tokens += ids
            t.logprobs += [0.0] * len(ids)
            t.entropies += [math.nan] * len(ids)
            t.loss_mask += [0] * len(ids)
            t.policy_version += [version] * len(ids)
            for c, r in pairs:
                t.tool_calls.append(ToolCall(c.tag, (start, start + len(ids)), ok=r.ok, seconds=r.seconds))
            e.tool_calls += len(pairs)
            if len(t.tokens) >= b.max_total_tokens:
                e.done, t.finish = True, "length"
    for e in episodes:
        e.traj.turns = e.turns
        if not e.done:
            e.traj.finish = "turns"
    return [e.traj for e in episodes]


def roc_penalty(traj: Trajectory, answer_tag: str = "answer") -> float:
    """GRPO-RoC's penalty of a trajectory (algorithms.md §13.6): p_err + p_fmt, with
    p_err = the share of its tool calls that failed (0.5 when it made none) and
    p_fmt = min((answer blocks - 1) / turns, 1), or 1 when the answer tags are missing or unbalanced."""
    calls = traj.tool_calls
    p_err = sum(not c.ok for c in calls) / len(calls) if calls else 0.5
    opened, closed = traj.text.count(f"<{answer_tag}>"), traj.text.count(f"</{answer_tag}>")
    if opened == 0 or opened != closed:
        p_fmt = 1.0
    else:
        p_fmt = min((opened - 1) / max(traj.turns, 1), 1.0)
    return p_err + p_fmt
