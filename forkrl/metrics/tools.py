"""Tool-use statistics of one step's trajectories."""
from __future__ import annotations

from forkrl.types import Trajectory


def tool_metrics(trajs: list[Trajectory], tools: list[str]) -> dict[str, float]:
    """Tool use over one step's trajectories: calls per trajectory (all and by tool), error rate,
    turns, observation tokens, share of trajectories that called a tool, total calls, and their cost."""
    calls = [c for t in trajs for c in t.tool_calls]
    n = max(len(trajs), 1)
    out = {
        "tools/calls_per_traj": len(calls) / n,
        "tools/calls_total": float(len(calls)),
        "tools/error_rate": sum(not c.ok for c in calls) / len(calls) if calls else 0.0,
        "tools/use_frac": sum(bool(t.tool_calls) for t in trajs) / n,
        "tools/turns": sum(t.turns for t in trajs) / n,
        "tools/observation_tokens": sum(len(t.loss_mask) - sum(t.loss_mask) for t in trajs) / n,
        "tools/seconds": sum(c.seconds for c in calls),
        # what the calls cost, for tools that price them (Router-R1's routed models): per trajectory and in all
        "tools/cost_per_traj": sum(c.cost for c in calls) / n,
        "tools/cost_total": sum(c.cost for c in calls),
    }
    for name in tools:
        out[f"tools/{name}_calls_per_traj"] = sum(c.name == name for c in calls) / n
    for finish in ("answer", "tool_budget", "turns", "length"):
        out[f"finish/{finish}_frac"] = sum(t.finish == finish for t in trajs) / n
    return out
