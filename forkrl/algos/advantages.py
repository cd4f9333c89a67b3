"""Outcome advantage estimators (algorithms.md §0-1).

Every estimator has the signature
    fn(rewards [B], group_ids [B] (long), mask [B, T], **params) -> (advantages [B, T], metrics)
A response's scalar advantage is broadcast over its tokens and zeroed where `mask` is 0, so
token-level estimators can share the signature.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkrl.algos.registry import register_advantage


def _group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group mean, Bessel-corrected group std and group size (float64 for exactness)."""
    r = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, r)
    mean = total / count
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, (r - mean[inverse]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    # verl convention (§0): a group of size 1 gets mean 0 and std 1
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return mean[inverse], std[inverse], count[inverse]


def _broadcast(adv: Tensor, mask: Tensor) -> Tensor:
    return adv.to(torch.float32).unsqueeze(-1) * mask.to(torch.float32)


def _metrics(adv: Tensor, std: Tensor) -> dict[str, float]:
    return {
        "adv/mean": float(adv.mean()),
        "adv/abs_mean": float(adv.abs().mean()),
        "adv/zero_std_groups_frac": float((std < 1e-8).double().mean()),
    }


@register_advantage("grpo")
def grpo(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, eps: float = 1e-6,
         norm_by_std: bool = True) -> tuple[Tensor, dict]:
    """GRPO (Shao et al., 2024, arXiv 2402.03300; algorithms.md §1.1):
        A_i = (R_i - mean_j R_j) / (std_j R_j + eps)
    std is Bessel-corrected (torch.std) and eps = 1e-6, as in verl; a group of one gets mean 0, std 1.
    With norm_by_std=False this is Dr. GRPO's estimator.
    """
    mean, std, _ = _group_stats(rewards, group_ids)
    adv = rewards.double() - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return _broadcast(adv, mask), _metrics(adv, std)


@register_advantage("drgrpo")
def drgrpo(rewards: Tensor, group_ids: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
    """Dr. GRPO (Liu et al., 2025, arXiv 2503.20783; algorithms.md §1.3): A_i = R_i - mean_j R_j.
    Removes GRPO's std division (difficulty bias); pair with `seq-mean-token-sum-norm` aggregation.
    """
    mean, std, _ = _group_stats(rewards, group_ids)
    adv = rewards.double() - mean
    return _broadcast(adv, mask), _metrics(adv, std)


@register_advantage("rloo")
def rloo(rewards: Tensor, group_ids: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
    """RLOO (Ahmadian et al., 2024, arXiv 2402.14740): leave-one-out baseline
        A_i = R_i - (1/(G-1)) sum_{j != i} R_j  =  G/(G-1) * (R_i - mean_j R_j)
    A group of one has no other sample: its baseline is 0, so A_i = R_i (as verl).
    """
    mean, std, count = _group_stats(rewards, group_ids)
    r = rewards.double()
    adv = torch.where(count > 1, (r - mean) * count / (count - 1).clamp(min=1), r)
    return _broadcast(adv, mask), _metrics(adv, std)
