"""DARS: difficulty-adaptive rollout counts (Yang et al., 2025, arXiv 2508.13755; algorithms.md §12.1).

GRPO's total advantage mass per prompt peaks at 50% accuracy and vanishes for hard prompts. After a
first round of N rollouts with accuracy â, a prompt with â < 0.5 gets ΔN more rollouts so that its
mass reaches a target: per-sample mass S(â) = 2â(1−â) (2·sqrt(â(1−â)) when advantages are divided by
the group std), target T* = N/2 (N with std), and
    equal treatment (ET):    ΔN = ⌈(T* − N·S(â)) / S(â)⌉
    hardness-weighted (HW):  ΔN = ⌈(2(1−â)·T* − N·S(â)) / S(â)⌉
with â = 0 read as 0.5/N, and ΔN ≤ N_max − N. The merged group is what GRPO normalises over;
prompts whose merged accuracy is 0 or 1 are dropped. The trainer runs the two rounds
(`rollout.dars`); this module holds the schedule.
"""
from __future__ import annotations

import math


def dars_extra(accuracy: float, n: int, schedule: str = "et", n_max: int = 32, std_normalized: bool = False) -> int:
    """ΔN extra rollouts for a prompt with first-round accuracy `accuracy` over `n` rollouts."""
    if schedule not in ("et", "hw"):
        raise ValueError(f"DARS schedule must be 'et' or 'hw', got {schedule!r}")
    if accuracy >= 0.5:
        return 0
    a = accuracy if accuracy > 0 else 0.5 / n
    mass = 2 * math.sqrt(a * (1 - a)) if std_normalized else 2 * a * (1 - a)
    target = n if std_normalized else n / 2
    if schedule == "hw":
        target = 2 * (1 - a) * target
    extra = math.ceil((target - n * mass) / mass - 1e-9)
    return max(min(extra, n_max - n), 0)
