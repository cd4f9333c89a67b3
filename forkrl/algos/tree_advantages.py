"""Advantages and token selection for tree-shaped groups, where branches share the tokens before
their branch point.

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
  Every token gets its node's advantage. `fusion: probability` is BranchGRPO's probability-weighted
  reward fusion (`--tree_prob_weighted`, §23 b step 2): an inner node's value is
  R(n) = Σ_c softmax_c(α·log p(c|n))·R(c) over its children c, applied from the leaves up, where
  log p(c|n) is the sum of the sampled log-probs of c's tokens (the segment's probability given its
  parent, §23 f); a leaf node's value is the mean reward of its rows.
- `branch_pruning` (a token selector): BranchGRPO's depth and width pruning (§23 b step 5): which
  segments' tokens train.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from forkrl.algos import advantages as _base  # noqa: F401  (registers the base estimators)
from forkrl.registry import ADVANTAGES, register_advantage, register_token_selector


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
def tree_hard(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, origin: Tensor, base: Literal["grpo", "drgrpo", "rloo", "hapo"] = "grpo"
              ) -> tuple[Tensor, dict]:
    base_adv, metrics = ADVANTAGES.get(base)(rewards, group_ids, mask)
    row_adv = (base_adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    T = mask.shape[1]
    shared_mean, holders = _share(origin[:, :T], row_adv)
    adv = torch.where(holders > 1, shared_mean, base_adv.double()).float() * mask
    metrics["tree/shared_token_frac"] = float(((holders > 1) & (mask > 0)).sum() / mask.sum().clamp(min=1))
    return adv, metrics


def tree_nodes(origin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per position of [B, T] `origin`: its node (a maximal run of tokens held by the same rows, named
    by the key of its first token), the node's depth (branch points above it in the row) and whether
    the node starts there."""
    T = origin.shape[1]
    _, holders = _share(origin, torch.zeros(origin.shape[0]))
    valid = origin >= 0
    # along a row the set of rows sharing a token only shrinks; each shrink is a branch point
    prev = torch.cat([holders[:, :1], holders[:, :-1]], dim=1)
    split = (holders < prev) & valid
    depth = split.long().cumsum(-1)
    pos = torch.arange(T).expand_as(origin)
    first = split | (pos == 0)
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(-1).values
    return origin.gather(1, start), depth, first


def _fused_values(node: Tensor, first: Tensor, valid: Tensor, mask: Tensor, rewards: Tensor, logp: Tensor,
                  alpha: float) -> Tensor:
    """Per position, the probability-weighted value of its node (BranchGRPO §23 b step 2). A row's
    nodes are the runs between its `first` positions; a node's children are the nodes that follow it
    in some row. Rows that end inside a node that other rows continue (no tree sampler makes one)
    count as one more child, with log p = 0 and their mean reward."""
    lp = (logp.double() * (mask > 0)).cumsum(-1)
    children: dict[int, dict[int, float]] = {}
    ended: dict[int, list[float]] = {}
    for r in range(node.shape[0]):
        starts = (first[r] & valid[r]).nonzero().flatten().tolist()
        if not starts:
            continue
        ends = starts[1:] + [int(valid[r].nonzero().max()) + 1]
        keys = [int(node[r, s]) for s in starts]
        for j in range(1, len(keys)):
            seg = float(lp[r, ends[j] - 1] - lp[r, starts[j] - 1])
            children.setdefault(keys[j - 1], {})[keys[j]] = seg
        ended.setdefault(keys[-1], []).append(float(rewards[r]))
    fused: dict[int, float] = {}

    def value(key: int) -> float:
        """Softmax-weighted over the node's children (a leaf: its rows, one child of weight 1)."""
        if key not in fused:
            terms = [(alpha * seg, value(c)) for c, seg in children.get(key, {}).items()]
            if key in ended:
                terms.append((0.0, sum(ended[key]) / len(ended[key])))
            w = torch.softmax(torch.tensor([t for t, _ in terms], dtype=torch.float64), 0).tolist()
            fused[key] = sum(wi * v for wi, (_, v) in zip(w, terms))
        return fused[key]

    out = torch.zeros(node.shape, dtype=torch.float64)
    keys = torch.unique(node[valid])
    table = torch.tensor([value(int(k)) for k in keys], dtype=torch.float64)
    out[valid] = table[torch.searchsorted(keys, node[valid])]
    return out


@register_advantage("branch_depth")
def branch_depth(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, origin: Tensor, eps: float = 1e-8,
                 fusion: Literal["mean", "probability"] = "mean", alpha: float = 1.0, sampling_logp: Tensor | None = None
                 ) -> tuple[Tensor, dict]:
    if fusion not in ("mean", "probability"):
        raise ValueError(f"branch_depth: fusion must be 'mean' or 'probability', got {fusion!r}")
    if fusion == "probability" and sampling_logp is None:
        raise ValueError("branch_depth: fusion 'probability' needs the sampled log-probs (sampling_logp)")
    T = mask.shape[1]
    origin = origin[:, :T]
    value, _ = _share(origin, rewards)
    valid = origin >= 0
    node, depth, first = tree_nodes(origin)
    if fusion == "probability":
        value = _fused_values(node, first, valid, mask, rewards, sampling_logp[:, :T], alpha)
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


@register_token_selector("branch_pruning")
def branch_pruning(entropy: Tensor, mask: Tensor, *, origin: Tensor, adv: Tensor, step: int, progress: float,
                   depth_pruning: tuple[int, ...] = (), depth_pruning_slide_interval: int | None = None,
                   depth_pruning_stop_depth: int | None = None, width_pruning_mode: Literal[0, 1, 2] = 0,
                   width_pruning_ratio: float = 0.5, pruning_step_ratio: float = 1.0) -> Tensor:
    """BranchGRPO's pruning (arXiv 2509.06040; algorithms.md §23 b step 5 and f): tree segments whose
    loss is dropped, while the sampled tree stays whole. Segments are `tree_nodes`; a segment's
    advantage is the mean of `adv` over its tokens (one value under `branch_depth`).

    - Depth pruning: segments at a depth in `depth_pruning` (branch points above them) do not train.
      With `depth_pruning_slide_interval` the window moves ⌊step / interval⌋ depths towards the root,
      until its shallowest depth reaches `depth_pruning_stop_depth` (default: the depth of the last
      split's parents, the deepest depth in the batch minus one).
    - Width pruning acts on the last layer: leaf segments a split created.
      Mode 1 keeps, among the children of each parent, the top max(1, ⌊ratio·k⌋) by advantage (the
      reference's "keep best from each parent"). Mode 2 keeps over the whole batch the best ⌊K/2⌋ and
      the worst ⌈K/2⌉, K = max(2, ⌊ratio·count⌋). Ties go to the earlier row.
    - Both apply while training progress < `pruning_step_ratio` (the reference prunes while
      step ≤ ⌊max_steps·ratio⌋: the same steps whenever max_steps·ratio is whole; 1.0: always).

    A pruned leaf is the end of its row, so the learner does not run it at all (`PackedBatch.select`
    cuts each row after its last trained token).
    """
    if width_pruning_mode not in (0, 1, 2):
        raise ValueError(f"branch_pruning: width_pruning_mode must be 0 (off), 1 (best per parent) or 2 "
                         f"(best and worst overall), got {width_pruning_mode!r}")
    if not 0 < width_pruning_ratio <= 1:
        raise ValueError(f"branch_pruning: width_pruning_ratio must be in (0, 1], got {width_pruning_ratio}")
    if depth_pruning_slide_interval is not None and depth_pruning_slide_interval < 1:
        raise ValueError(f"branch_pruning: depth_pruning_slide_interval must be at least 1, got {depth_pruning_slide_interval}")
    keep = mask > 0
    if progress >= pruning_step_ratio or not keep.any():
        return keep
    origin = origin[:, :mask.shape[1]]
    valid = origin >= 0
    node, depth, first = tree_nodes(origin)
    pruned = torch.zeros_like(keep)
    window = sorted(set(int(d) for d in depth_pruning))
    if window:
        if depth_pruning_slide_interval is not None:
            stop = depth_pruning_stop_depth
            if stop is None:
                stop = max(int(depth[valid].max()) - 1, 0)
            shift = min(step // depth_pruning_slide_interval, max(window[0] - stop, 0))
            window = [d - shift for d in window]
        pruned |= torch.isin(depth, torch.tensor(window)) & valid
    if width_pruning_mode:
        parent: dict[int, int] = {}
        for r in range(origin.shape[0]):
            keys = node[r][first[r] & valid[r]].tolist()
            parent.update(zip(keys[1:], keys[:-1]))
        trained = keep & valid
        keys, inverse = torch.unique(node[trained], return_inverse=True)
        total = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, inverse, adv[trained].double())
        count = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, inverse, torch.ones(len(inverse), dtype=torch.float64))
        value = dict(zip(keys.tolist(), (total / count).tolist()))
        has_child = set(parent.values())
        last = [k for k in value if k in parent and k not in has_child]   # in row order: keys grow with rows

        def best_first(ks: list[int]) -> list[int]:
            return sorted(ks, key=lambda k: -value[k])  # stable: ties keep row order

        kept: list[int] = []
        if width_pruning_mode == 1:
            siblings: dict[int, list[int]] = {}
            for k in last:
                siblings.setdefault(parent[k], []).append(k)
            for ks in siblings.values():
                kept += best_first(ks)[:max(1, int(len(ks) * width_pruning_ratio))]
        else:
            ordered = best_first(last)
            K = max(2, int(len(last) * width_pruning_ratio))
            kept = ordered[:K // 2] + ordered[len(ordered) - (K - K // 2):]
        dropped = sorted(set(last) - set(kept))
        if dropped:
            pruned |= torch.isin(node, torch.tensor(dropped)) & valid
    return keep & ~pruned
