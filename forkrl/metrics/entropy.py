"""Entropy dynamics of a run: per-step token-entropy statistics and the entropy–reward law.

- `entropy_stats`: over one step's sampled tokens — mean and quantiles, the share above a
  high-entropy threshold, the mean by position in the response, and the mean over the first k
  generated tokens after a tool observation against everywhere else (ARPO's observation that
  entropy jumps right after a tool returns; algorithms.md §2).
- `fit_entropy_law`: R = -a exp(H) + b (Cui et al., 2025, arXiv 2505.22617; algorithms.md §4) by least
  squares on (entropy, accuracy) points, with standard errors and the predicted ceiling -a + b
  (the performance left when entropy reaches 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

POSITION_BUCKETS = ((0, 8), (8, 32), (32, None))


def post_tool_mask(loss_mask: list[int], k: int = 10) -> list[bool]:
    """True on the first k generated tokens after each observation (a run of loss mask 0)."""
    out, since_obs, seen_obs = [], k, False
    for m in loss_mask:
        if not m:
            since_obs, seen_obs = 0, True
            out.append(False)
            continue
        out.append(seen_obs and since_obs < k)
        since_obs += 1
    return out


def entropy_stats(trajectories, *, high_threshold: float = 1.0, post_tool_k: int = 10) -> dict[str, float]:
    """Statistics of the sampling-time entropy of every generated token of one step's trajectories."""
    values, post, by_pos = [], [], {b: [] for b in POSITION_BUCKETS}
    for t in trajectories:
        after = post_tool_mask(t.loss_mask, post_tool_k)
        pos = 0
        for e, m, a in zip(t.entropies, t.loss_mask, after):
            if not m or e is None or math.isnan(e):
                continue
            values.append(e)
            post.append(a)
            for lo, hi in POSITION_BUCKETS:
                if pos >= lo and (hi is None or pos < hi):
                    by_pos[(lo, hi)].append(e)
            pos += 1
    if not values:
        return {}
    v = np.asarray(values)
    out = {"entropy/mean": float(v.mean()), "entropy/p10": float(np.quantile(v, 0.1)),
           "entropy/p50": float(np.quantile(v, 0.5)), "entropy/p90": float(np.quantile(v, 0.9)),
           "entropy/high_frac": float((v > high_threshold).mean())}
    for (lo, hi), xs in by_pos.items():
        if xs:
            out[f"entropy/pos_{lo}_{hi if hi is not None else 'end'}"] = float(np.mean(xs))
    p = np.asarray(post)
    if p.any():
        out["entropy/after_tool"] = float(v[p].mean())
        if (~p).any():
            out["entropy/elsewhere"] = float(v[~p].mean())
    return out


@dataclass
class EntropyLaw:
    a: float
    b: float
    a_se: float
    b_se: float
    ceiling: float        # -a + b: predicted reward at entropy 0
    ceiling_se: float
    n: int

    def predict(self, entropy: float) -> float:
        return -self.a * math.exp(entropy) + self.b


def fit_entropy_law(entropy: list[float], reward: list[float]) -> EntropyLaw:
    """Least squares of R = b - a x with x = exp(H) (linear in a, b), ordinary standard errors.
    Needs at least 3 points with distinct entropies."""
    H, R = np.asarray(entropy, dtype=float), np.asarray(reward, dtype=float)
    if len(H) < 3 or np.ptp(H) == 0:
        raise ValueError("the entropy law needs at least 3 points with different entropies")
    X = np.stack([np.ones_like(H), -np.exp(H)], axis=1)     # columns: b, a
    coef, *_ = np.linalg.lstsq(X, R, rcond=None)
    b, a = coef
    dof = len(H) - 2
    resid = R - X @ coef
    sigma2 = float(resid @ resid) / dof if dof > 0 else 0.0
    cov = sigma2 * np.linalg.inv(X.T @ X)
    b_se, a_se = math.sqrt(max(cov[0, 0], 0)), math.sqrt(max(cov[1, 1], 0))
    # ceiling = b - a: var = var(b) + var(a) - 2 cov(a, b)
    ceiling_se = math.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0))
    return EntropyLaw(float(a), float(b), a_se, b_se, float(b - a), ceiling_se, len(H))
