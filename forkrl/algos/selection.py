"""Which samples and tokens train, and reward shaping that depends only on the samples.

A sample selector has the signature fn(values [B], group_ids [B], **params) -> keep mask [B] (bool).
A token selector has the signature fn(entropy [B, T], mask [B, T], **params) -> keep mask [B, T]
(bool, never true where mask is 0); the loss and its token-mean normaliser then count only the
kept tokens.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from forkrl.registry import register_selector, register_token_selector


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


def schedule(start: float, end: float, progress: float, kind: str = "linear") -> float:
    """A keep-ratio moving from `start` (progress 0) to `end` (progress 1): linear or cosine."""
    p = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        p = 0.5 * (1 - math.cos(math.pi * p))
    elif kind != "linear":
        raise ValueError(f"schedule must be 'linear' or 'cosine', got {kind!r}")
    return start + (end - start) * p


def max_variance_subset(values: Tensor, k: int) -> Tensor:
    """Indices of the k values with the largest variance among all k-subsets. The optimum takes the
    j largest and k - j smallest values for some j (tested against brute force), so it tries every j."""
    n = values.numel()
    if k >= n:
        return torch.arange(n)
    order = torch.argsort(values.double(), stable=True)
    best, best_var = None, -1.0
    for j in range(k + 1):
        idx = torch.cat([order[:k - j], order[n - j:]]) if j else order[:k]
        v = values.double()[idx]
        var = float(((v - v.mean()) ** 2).mean())
        if var > best_var + 1e-12:
            best, best_var = idx, var
    return best


@register_selector("d3s_samples")
def d3s_samples(values: Tensor, group_ids: Tensor, *, progress: float = 0.0, start: float = 0.5, end: float = 1.0,
                schedule_kind: Literal["linear", "cosine"] = "linear", min_keep: int = 2) -> Tensor:
    """D3S sample-level down-sampling, intra-group variant D3S-I (arXiv 2509.22115; algorithms.md §12.2):
    from each group keep the ceil(rho G) rollouts (at least min_keep) whose advantages have the
    largest variance (which bounds the policy-gradient norm), rho rising from `start` to `end` over
    training. `values` are the rollouts' advantages, computed on the full group before selection.
    UNVERIFIED (our choices): the ratios, the linear schedule and min_keep.
    """
    rho = schedule(start, end, progress, schedule_kind)
    keep = torch.zeros_like(group_ids, dtype=torch.bool)
    for g in torch.unique(group_ids):
        idx = (group_ids == g).nonzero().flatten()
        k = min(len(idx), max(min_keep, math.ceil(rho * len(idx))))
        keep[idx[max_variance_subset(values[idx], k)]] = True
    return keep


@register_token_selector("d3s_tokens")
def d3s_tokens(entropy: Tensor, mask: Tensor, *, adv: Tensor, progress: float = 0.0, start: float = 0.5,
               end: float = 1.0, schedule_kind: Literal["linear", "cosine"] = "linear") -> Tensor:
    """D3S token-level down-sampling (algorithms.md §12.2 step 2): keep the top ceil(rho N) valid tokens
    by |A_{i,t}| H_{i,t}, rho rising from `start` to `end` over training (UNVERIFIED ratios, our choice)."""
    valid = mask.bool()
    n_valid = int(valid.sum())
    keep = torch.zeros_like(valid)
    if n_valid:
        k = math.ceil(schedule(start, end, progress, schedule_kind) * n_valid)
        score = (adv.abs() * entropy).float()
        flat = torch.where(valid, score, torch.full_like(score, -torch.inf)).flatten()
        keep.view(-1)[torch.topk(flat, k).indices] = True
    return keep & valid


@register_token_selector("high_entropy_steps")
def high_entropy_steps(entropy: Tensor, mask: Tensor, *, top_ratio: float = 0.8) -> Tensor:
    """DART high-entropy step selection (arXiv 2509.23866; algorithms.md §15 curation 3): a step is one
    assistant turn (a run of generated tokens between observations; a whole single-turn response);
    its entropy the mean token entropy. Keep the top ceil(top_ratio * steps) steps of the batch
    (global ranking) and drop the rest from the loss. UNVERIFIED, our choice: 0.8, global."""
    if not 0 < top_ratio <= 1:
        raise ValueError(f"top_ratio must be in (0, 1], got {top_ratio}")
    from forkrl.algos.registry import per_turn_index
    turn = per_turn_index(mask)
    steps = []  # (mean entropy, row, turn)
    for b in range(mask.shape[0]):
        for s in range(1, int(turn[b].max()) + 1):
            sel = turn[b] == s
            steps.append((float(entropy[b][sel].double().mean()), b, s))
    keep = torch.zeros_like(mask, dtype=torch.bool)
    n_keep = math.ceil(top_ratio * len(steps))
    for _, b, s in sorted(steps, key=lambda x: -x[0])[:n_keep]:
        keep[b] |= turn[b] == s
    return keep


def resample_on_correct(correct: Tensor, penalty: Tensor, keep: int, *, min_each: int = 2,
                        generator: torch.Generator | None = None) -> Tensor:
    """GRPO-RoC down-sampling of one oversampled group (rStar2-Agent, arXiv 2508.20722;
    algorithms.md §13.6): from N rollouts keep `keep`, with negatives and positives in proportion to
    their shares of the pool, each at least `min_each` when the pool has that many; negatives drawn
    uniformly (all kinds of failure stay), positives the ones with the lowest penalty (the cleanest
    successes; ties broken at random). Returns the kept indices, sorted."""
    n = correct.numel()
    if keep >= n:
        return torch.arange(n)
    pos = (correct > 0).nonzero().flatten()
    neg = (correct <= 0).nonzero().flatten()
    n_pos = round(keep * len(pos) / n)
    n_pos = max(n_pos, min(min_each, len(pos)))
    n_pos = min(n_pos, len(pos), keep - min(min_each, len(neg), keep))
    n_neg = min(keep - n_pos, len(neg))
    n_pos = min(keep - n_neg, len(pos))
    neg_pick = neg[torch.randperm(len(neg), generator=generator)[:n_neg]]
    shuffled = pos[torch.randperm(len(pos), generator=generator)]
    pos_pick = shuffled[torch.argsort(penalty[shuffled].double(), stable=True)[:n_pos]]
    return torch.sort(torch.cat([pos_pick, neg_pick])).values
