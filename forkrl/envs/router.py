"""Router-R1's routing environment, its protocol and its reward (Zhang et al., 2025, arXiv 2506.09033;
algorithms.md §20): routes (`model-name: query`), the format check that overrides everything, the EM
or token-F1 outcome, and the cost term, a percentile-normalised square root of the routed calls'
price over a sliding buffer.

    R = -1                                  if the format check fails
        0                                   if there is no answer or the outcome is 0
        (1 - alpha) * R_out + alpha * R_cost otherwise

The route tool (forkrl.envs.tools.Route) prices each call; the `router_r1` reward term
(forkrl.collect.reward_terms) puts these pieces together on a step's trajectories.
"""
from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

TAGS = ("think", "search", "information", "answer")
_TAG = re.compile(r"<(/?)(think|search|information|answer)>")
_ROUTE = re.compile(r"^\s*([^:\n]+?)\s*:\s*(\S.*)$", re.DOTALL)


def parse_route(query: str) -> tuple[str, str] | None:
    """`model-name: query` -> (name, query); None when malformed."""
    m = _ROUTE.match(query)
    return (m.group(1).strip(), m.group(2).strip()) if m else None


def format_problem(text: str, answered_calls: int, models: set[str] | list[str] | None = None) -> str | None:
    """What breaks Router-R1's format in the policy's text (its turns joined; the environment's
    `<information>` blocks are not in it, `answered_calls` counts them), or None when it holds:

    no tags; unbalanced or nested tags; no <think> block, or an empty or "..." one; not exactly one
    <answer> block; search blocks != information blocks (the model writing its own <information>
    counts as one more); not starting with <think> or not ending with </answer>; a malformed
    `name: query`; an unknown model name (checked when `models` is given; in training the route tool
    refuses unknown names itself)."""
    tags = list(_TAG.finditer(text))
    if not tags:
        return "no tags"
    open_tag = None
    counts = Counter()
    spans: dict[str, list[str]] = {t: [] for t in TAGS}
    start = 0
    for m in tags:
        closing, name = m.group(1) == "/", m.group(2)
        if not closing:
            if open_tag is not None:
                return f"<{name}> nested in <{open_tag}>"
            open_tag, start = name, m.end()
        else:
            if open_tag != name:
                return f"</{name}> without its opening tag"
            counts[name] += 1
            spans[name].append(text[start:m.start()])
            open_tag = None
    if open_tag is not None:
        return f"<{open_tag}> left open"
    if not spans["think"] or any(not s.strip() or s.strip() == "..." for s in spans["think"]):
        return "no <think> block, or an empty one"
    if counts["answer"] != 1:
        return f"{counts['answer']} <answer> blocks"
    if counts["search"] != answered_calls + counts["information"]:
        return "search blocks do not match information blocks"
    stripped = text.strip()
    if not stripped.startswith("<think>") or not stripped.endswith("</answer>"):
        return "does not start with <think> and end with </answer>"
    for query in spans["search"]:
        route = parse_route(query)
        if route is None:
            return f"malformed route {query.strip()[:40]!r}"
        if models is not None and route[0] not in models:
            return f"unknown model {route[0]!r}"
    return None


def _normalize(s: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, golds: list[str]) -> float:
    return float(any(_normalize(prediction) == _normalize(g) for g in golds))


def token_f1(prediction: str, golds: list[str]) -> float:
    """The best token-level F1 of the prediction against any gold answer."""
    best = 0.0
    pred = _normalize(prediction).split()
    for g in golds:
        gold = _normalize(g).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def cost_reward(cost: float, buffer: list[float], size: int = 1000, eps: float = 1e-8) -> float:
    """R_cost = 1 - clip((x - P5) / (P95 - P5), 0, 1) with x = sqrt(cost), P5 and P95 (linear
    interpolation) over `buffer`, the last `size` values of x, the new one pushed first (the list is
    changed in place: it is the reward term's checkpointed state); 0.5 while P95 - P5 < eps."""
    x = float(np.sqrt(max(cost, 0.0)))
    buffer.append(x)
    del buffer[:-size]
    p5, p95 = np.percentile(np.asarray(buffer, dtype=np.float64), [5, 95])
    if p95 - p5 < eps:
        return 0.5
    return float(1.0 - np.clip((x - p5) / (p95 - p5), 0.0, 1.0))


def total_reward(format_ok: bool, answered: bool, outcome: float, cost_reward: float, alpha: float) -> float:
    """§20's rule: the format check overrides everything; cost counts only for an answer that scores."""
    if not format_ok:
        return -1.0
    if not answered or outcome == 0:
        return 0.0
    return (1 - alpha) * outcome + alpha * cost_reward
