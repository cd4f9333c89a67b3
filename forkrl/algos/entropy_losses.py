"""Entropy-aware policy losses (algorithms.md §4): Clip-Cov and KL-Cov.

Cui et al., 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
(arXiv 2505.22617). Entropy falls fastest through the few tokens whose log-probability and
advantage covary most, since for a softmax policy under policy gradient
    H(pi^{k+1}) - H(pi^k)  ~  -eta * Cov(log pi(a|s), pi(a|s) * A(s, a)).
Both losses restrict the update of those tokens.

The covariance is computed over the valid tokens of the tensors passed in. The learner passes one
micro-batch at a time, which is the reference behaviour (§4 f), so the selection depends on the
micro-batch size.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkrl.algos.losses import AggNorm, _masked_frac, agg_loss, clipped_surrogate
from forkrl.algos.registry import register_loss


def token_covariance(logp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """Cov_j = (log pi(y_j) - mean log pi) * (A_j - mean A), with means over valid tokens (§4 b).
    Detached; zero on masked tokens."""
    m = mask.bool()
    lp, a = logp.detach(), adv.detach()
    n = m.sum().clamp(min=1)
    lp_mean = (lp * m).sum() / n
    a_mean = (a * m).sum() / n
    return torch.where(m, (lp - lp_mean) * (a - a_mean), torch.zeros_like(lp))


@register_loss("clip_cov")
def clip_cov(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, entropy: Tensor | None = None,
             agg: str = "token-mean", norm: AggNorm | None = None, clip_low: float = 1.0, clip_high: float = 1.0,
             clip_ratio: float = 2e-4, cov_low: float = 1.0, cov_high: float = 5.0) -> tuple[Tensor, dict]:
    """Clip-Cov (§4 b, defaults from the official `*_clip_cov.sh` scripts):
        candidates = valid tokens not already clipped by the ratio clip, with cov_low < Cov_j < cov_high
        I          = floor(clip_ratio * N) of them (at least 1), drawn at random (torch's global RNG)
        l_j        = 0 for j in I (no gradient), else the clipped surrogate max(-r A, -clip(r) A)
    N counts the valid tokens. The base clip is 1/1, a range of [0, 2], so the ratio is almost unclipped.
    """
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    loss_mat, metrics = clipped_surrogate(ratio, adv, mask, clip_low, clip_high)
    clipped_by_ratio = (-adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)) > (-adv * ratio)
    cov = token_covariance(logp, adv, mask)
    candidates = mask.bool() & ~clipped_by_ratio & (cov > cov_low) & (cov < cov_high)
    idx = candidates.nonzero()
    n_pick = min(max(int(clip_ratio * int(mask.bool().sum())), 1), len(idx))
    keep = torch.ones_like(loss_mat)
    if n_pick:
        chosen = idx[torch.randperm(len(idx))[:n_pick]]
        keep[chosen[:, 0], chosen[:, 1]] = 0.0
    metrics["cov/selected_frac"] = _masked_frac(keep == 0, mask)
    metrics["cov/candidates"] = float(len(idx))
    metrics["cov/mean"] = float(cov[mask.bool()].mean()) if mask.any() else 0.0
    return agg_loss(loss_mat * keep, mask, agg, norm), metrics


@register_loss("kl_cov")
def kl_cov(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, entropy: Tensor | None = None,
           agg: str = "token-mean", norm: AggNorm | None = None, kl_ratio: float = 2e-3,
           kl_coef: float = 1.0) -> tuple[Tensor, dict]:
    """KL-Cov (§4 b, defaults from the official 7B script: k = 0.2% = 2e-3, beta = 1):
        I   = the top max(1, floor(kl_ratio * N)) valid tokens by Cov_j
        l_j = -r_j A_j + kl_coef * |log r_j|   for j in I
        l_j = -r_j A_j                           otherwise (no ratio clipping at all)
    """
    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    loss_mat = -adv * ratio
    cov = token_covariance(logp, adv, mask)
    valid = mask.bool()
    n_valid = int(valid.sum())
    penalised = torch.zeros_like(valid)
    if n_valid:
        k = max(1, int(kl_ratio * n_valid))
        flat = torch.where(valid, cov, torch.full_like(cov, -torch.inf)).flatten()
        penalised.view(-1)[torch.topk(flat, k).indices] = True
    loss_mat = torch.where(penalised, loss_mat + kl_coef * log_ratio.abs(), loss_mat)
    metrics = {
        "cov/selected_frac": _masked_frac(penalised, mask),
        "cov/mean": float(cov[valid].mean()) if n_valid else 0.0,
        "ppo_kl_abs": float(log_ratio.detach().abs()[valid].mean()) if n_valid else 0.0,
    }
    return agg_loss(loss_mat, mask, agg, norm), metrics
