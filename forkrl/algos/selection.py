"""Which samples and tokens train, and reward shaping that depends only on the samples.

A sample selector has the signature fn(values [B], group_ids [B], **params) -> keep mask [B] (bool).
A token selector has the signature fn(entropy [B, T], mask [B, T], **params) -> keep mask [B, T]
(bool, never true where mask is 0); the loss and its token-mean normaliser then count only the
kept tokens.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from forkrl.algos.registry import register_selector, register_token_selector


@register_selector("nonzero_std_groups")
def nonzero_std_groups(values: Tensor, group_ids: Tensor, *, tol: float = 0.0) -> Tensor:
    """DAPO dynamic sampling filter (Yu et al., 2025, arXiv 2503.14476; algorithms.md §1.2 step 2):
    keep every sample of a group whose metric (accuracy by default) has std > tol; a group of one
    is kept. Groups whose rewards are all equal give zero advantage and only dilute the batch.
    """
    keep = torch.zeros_like(group_ids, dtype=torch.bool)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        vals = values[idx].double()
        keep[idx] = bool(vals.numel() == 1 or vals.std() > tol)
    return keep


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment (algorithms.md §1.2 step 4), added to the reward:
        L_exp = max_len - buffer
        R_len = min(-(|o| - L_exp) / buffer * factor, 0)
    0 up to L_exp, falling linearly to -factor at max_len (generation is truncated at max_len).
    """
    if buffer <= 0 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer}")
    expected = max_len - buffer
    pen = -(lengths.double() - expected) / buffer * factor
    return torch.clamp(pen, max=0.0)


@register_token_selector("forking_tokens")
def forking_tokens(entropy: Tensor, mask: Tensor, *, top_ratio: float = 0.2, bottom: bool = False) -> Tensor:
    """High-entropy "forking" tokens (Wang et al., 2025, "Beyond the 80/20 Rule", arXiv 2506.01939;
    algorithms.md §5): keep the top ceil(top_ratio * N_valid) valid tokens by entropy (torch.topk),
    i.e. H >= the (1 - top_ratio)-quantile, with top_ratio = 0.2. `bottom=True` keeps the other
    valid tokens instead (the paper's bottom-80% ablation).
    """
    if not 0 < top_ratio <= 1:
        raise ValueError(f"top_ratio must be in (0, 1], got {top_ratio}")
    valid = mask.bool()
    n_valid = int(valid.sum())
    top = torch.zeros_like(valid)
    if n_valid:
        k = math.ceil(top_ratio * n_valid)
        scores = torch.where(valid, entropy.float(), torch.full_like(entropy, -torch.inf, dtype=torch.float32))
        top.view(-1)[torch.topk(scores.flatten(), k).indices] = True
    return (valid & ~top) if bottom else top
