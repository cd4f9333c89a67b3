"""UI-S1's text-agent steps (Lu et al., 2025, arXiv 2509.11543; algorithms.md §18): the action format,
how a step's action is judged against the expert's, and the step reward.

A step is written `<think>thought</think>` then `<action>type: argument</action>`, with type `search`
(the argument must name the entity the expert looked up, its `key`) or `answer` (the argument must be
the expert's answer). The expert trajectories are rows {prompt, answer, steps: [{thought, action:
{type, arg, key}, observation}]} (data/fictional_kb/experts_*.jsonl).

    step reward r_t = 0.1 * format + 0.9 * action        (UI-S1's gui_traj reward)
    format = 1 when a non-empty thought is present
    action = 1 exact match, 0.5 the type only, 0.1 parses but wrong type, 0 does not parse
"""
from __future__ import annotations

import re

from forkrl.registry import register_reward

_ACTION = re.compile(r"<action>\s*(\w+)\s*:\s*(.*?)\s*</action>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
ACTION_TYPES = ("search", "answer")


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def parse_action(text: str) -> tuple[str, str] | None:
    """The first `<action>type: argument</action>` with a known type, else None."""
    m = _ACTION.search(text)
    if not m or m.group(1).lower() not in ACTION_TYPES:
        return None
    return m.group(1).lower(), m.group(2).strip()


def action_score(text: str, expert: dict) -> float:
    """1.0 when the action matches the expert's (same type; a search names the expert's `key`, an
    answer equals it), 0.5 for the type only, 0.1 for a parsed action of another type, 0 otherwise."""
    action = parse_action(text)
    if action is None:
        return 0.0
    kind, arg = action
    if kind != expert["type"]:
        return 0.1
    key = _norm(expert.get("key") or expert["arg"])
    hit = key in _norm(arg) if kind == "search" else _norm(arg) == key
    return 1.0 if hit else 0.5


def format_score(text: str) -> float:
    m = _THINK.search(text)
    return 1.0 if m and m.group(1).strip() else 0.0


def step_reward(text: str, expert: dict, format_weight: float = 0.1, action_weight: float = 0.9) -> float:
    return format_weight * format_score(text) + action_weight * action_score(text, expert)


def expert_text(step: dict) -> str:
    """The expert's step as the policy would write it (what the Patch Module puts in the history)."""
    a = step["action"]
    return f"<think>{step['thought']}</think>\n<action>{a['type']}: {a['arg']}</action>"


def observation_text(step: dict) -> str:
    return f"\n<information>{step['observation']}</information>\n" if step.get("observation") else ""


@register_reward("uis1_step")
def uis1_step(prompts: list[str], completions: list[str], expert_action: list[dict | None], *,
              format_weight: float = 0.1, action_weight: float = 0.9, **_) -> list[float | None]:
    """UI-S1's step reward of each step sample against its expert action (the `expert_action` column the
    semi_online sampler gives each step); None for a completion that is not a step."""
    return [None if e is None else step_reward(c, e, format_weight, action_weight)
            for c, e in zip(completions, expert_action)]
