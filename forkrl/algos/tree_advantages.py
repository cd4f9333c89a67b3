"""Advantages for tree-shaped groups, where branches share the tokens before their branch point.

Tokens are identified by `origin` ([B, T], PackedBatch.token_origin): positions with the same key
are one sampled token that several rows share. Plain `grpo` over the leaves is ARPO's soft
attribution (algorithms.md §2 b): a shared token sits in d rows and collects their d advantages.

- `tree_hard`: ARPO's hard attribution: a shared token's advantage is the mean of the advantages
  of the rows that share it, A_shared = (1/d) Σ_{i in branch set} A_i; unshared tokens keep their
  row's (base estimator) advantage.
- `branch_depth`: BranchGRPO's depth-wise advantage adapted to token trees (arXiv 2509.06040;
  algorithms.md §23 b-f). A node is a maximal run of tokens shared by the same rows; its value is
  the mean reward of the leaves below it; its depth is the number of branch points above it; within
  a prompt's tree, nodes are z-scored against the other nodes at their depth,
  A(n) = (R(n) - μ_d) / (σ_d + eps) with the unbiased σ, and 0 where a depth has one node or σ < 1e-6.
  Every token gets its node's advantage.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkrl.algos import advantages as _base  # noqa: F401  (registers the base estimators)
from forkrl.registry import ADVANTAGES, register_advantage


def _share(origin: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Per position: the mean of `values` (per row) over the rows holding that token, and how many rows hold it."""
    B, T = origin.shape
    valid = origin >= 0
    keys, inverse = torch.unique(origin[valid], return_inverse=True)
    rows = torch.arange(B).unsqueeze(-1).expand(B, T)[valid]
    total = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, inverse, values.double()[rows])
    count = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, inverse, torch.ones(len(rows), dtype=torch.float64))
    mean = torch.zeros((B, T), dtype=torch.float64)
    holders = torch.zeros((B, T), dtype=torch.float64)
    mean[valid], holders[valid] = total[inverse] / count[inverse], count[inverse]
    return mean, holders


@register_advantage("tree_hard")
def tree_hard(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, origin: Tensor, base: str = "grpo"
              ) -> tuple[Tensor, dict]:
    base_adv, metrics = ADVANTAGES.get(base)(rewards, group_ids, mask)
    row_adv = (base_adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    T = mask.shape[1]
    shared_mean, holders = _share(origin[:, :T], row_adv)
    adv = torch.where(holders > 1, shared_mean, base_adv.double()).float() * mask
    metrics["tree/shared_token_frac"] = float(((holders > 1) & (mask > 0)).sum() / mask.sum().clamp(min=1))
    return adv, metrics


@register_advantage("branch_depth")
def branch_depth(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, origin: Tensor, eps: float = 1e-8
                 ) -> tuple[Tensor, dict]:
    T = mask.shape[1]
    origin = origin[:, :T]
    value, holders = _share(origin, rewards)
    valid = origin >= 0
    # along a row the set of rows sharing a token only shrinks; each shrink is a branch point
    prev = torch.cat([holders[:, :1], holders[:, :-1]], dim=1)
    split = (holders < prev) & valid
    depth = split.long().cumsum(-1)
    # a node is named by the key of its first token: the token at the last split (or position 0)
    pos = torch.arange(T).expand_as(origin)
    start = torch.where(split | (pos == 0), pos, torch.zeros_like(pos)).cummax(-1).values
    node = origin.gather(1, start)
    adv = torch.zeros_like(value)
    n_nodes = 0
    for g in torch.unique(group_ids).tolist():
        rows = group_ids == g
        sel = valid & rows.unsqueeze(-1)
        for d in torch.unique(depth[sel]).tolist():
            at = sel & (depth == d)
            keys, first = torch.unique(node[at], return_inverse=True)
            # every token of a node has the node's value, so any one of them names it
            vals = torch.zeros(len(keys), dtype=torch.float64).scatter_(0, first, value[at])
            n_nodes += len(keys)
            if len(keys) < 2:
                continue
            std = vals.std()  # unbiased, as BranchGRPO
            if float(std) < 1e-6:
                continue
            adv[at] = ((vals - vals.mean()) / (std + eps))[first]
    return adv.float() * mask, {"adv/mean": float((adv.float() * mask).sum() / mask.sum().clamp(min=1)),
                                "tree/nodes": float(n_nodes), "tree/max_depth": float(depth.max()) if depth.numel() else 0.0}
