"""SPEAR's self-imitation replay (algorithms.md §13.4; arXiv 2509.22601).

Successful trajectories (advantage >= threshold) enter a bounded buffer and leave it after
`max_age` steps. Each step a few are replayed with a recalibrated advantage,
    A~ = R - b,   b = the 50th percentile of the last `reward_window` trajectory rewards
(or, baseline "decay", the stored advantage times decay^age), keeping only A~ > 0, and the
self-imitation loss enters with a weight gamma_t rising on a cosine schedule to `loss_coef`.
"""
from __future__ import annotations

import dataclasses
import random
from collections import deque

import numpy as np

from forkrl.algos.schedules import cosine_decay, cosine_ramp  # noqa: F401  (re-exported)
from forkrl.types import Trajectory


class ReplayBuffer:
    def __init__(self, cfg):
        self.cfg = cfg  # ReplayConfig
        self.entries: deque = deque(maxlen=cfg.capacity)   # (step added, trajectory, advantage then)
        self.rewards: deque = deque(maxlen=cfg.reward_window)

    def add(self, step: int, trajectories: list[Trajectory], advantages: list[float]) -> int:
        """Record this step's rewards; store its trajectories with advantage >= threshold."""
        self.rewards.extend(t.reward for t in trajectories)
        n = 0
        for t, a in zip(trajectories, advantages):
            if t.source == "policy" and a >= self.cfg.adv_threshold:
                self.entries.append((step, t, float(a)))
                n += 1
        return n

    def sample(self, step: int, seed: int) -> tuple[list[Trajectory], dict]:
        """Up to `batch_size` replay trajectories for `step` with their recalibrated advantages."""
        c = self.cfg
        while self.entries and step - self.entries[0][0] > c.max_age:
            self.entries.popleft()
        live = [e for e in self.entries if step - e[0] <= c.max_age]
        baseline = float(np.percentile(list(self.rewards), c.percentile)) if self.rewards else 0.0
        candidates = []
        for added, t, a in live:
            adv = t.reward - baseline if c.baseline == "percentile" else a * c.decay ** (step - added)
            if adv > 0:
                candidates.append((t, adv))
        rng = random.Random(seed)
        chosen = rng.sample(candidates, min(c.batch_size, len(candidates)))
        out = [dataclasses.replace(t, advantage=adv, source="replay", group=f"replay/{t.group}") for t, adv in chosen]
        return out, {"replay/buffer_size": float(len(live)), "replay/baseline": baseline,
                     "replay/candidates": float(len(candidates))}

    def state_dict(self) -> dict:
        return {"entries": list(self.entries), "rewards": list(self.rewards)}

    def load_state_dict(self, state: dict) -> None:
        self.entries = deque(state.get("entries", []), maxlen=self.cfg.capacity)
        self.rewards = deque(state.get("rewards", []), maxlen=self.cfg.reward_window)
