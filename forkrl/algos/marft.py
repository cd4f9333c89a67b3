"""MARFT's action-level pieces (Liao et al., 2025, arXiv 2504.16129; algorithms.md §19): an agent's
action is its whole response, so its log-probability is the sum of its token log-probs (optionally
normalised), and MARFT-A clips the ratio of those action log-probs. The flattened (step, agent) GAE is
`forkrl.algos.values.gae`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkrl.algos.losses import AggNorm
from forkrl.registry import register_loss

NORMALIZATIONS = ("sum", "token", "word")


def action_logprob(logp: Tensor, mask: Tensor, *, mode: str = "sum", words: Tensor | None = None) -> Tensor:
    """[B] log pi(action) of each row's response from its token log-probs [B, T] over `mask`:
        sum:   sum_t log p_t                       (MARFT's default `normalization_mode`)
        token: sum_t log p_t / (number of tokens)
        word:  sum_t log p_t / words               (`words` [B]: the response's word count)"""
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {mode!r}; allowed: {NORMALIZATIONS}")
    m = mask.to(logp.dtype)
    total = (logp * m).sum(-1)
    if mode == "sum":
        return total
    if mode == "token":
        return total / m.sum(-1).clamp(min=1)
    if words is None:
        raise ValueError("normalization 'word' needs each response's word count")
    return total / words.to(logp.dtype).clamp(min=1)


@register_loss("action_ppo")
def action_ppo(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "token-mean",
               norm: AggNorm | None = None, weight: Tensor | None = None, clip: float = 0.2,
               normalization: str = "sum") -> tuple[Tensor, dict]:
    """MARFT-A's per-agent PPO on the action-level ratio (§19 "Update"):
        r_i = exp(log pi(a_i) - log pi_old(a_i))       (action_logprob, `normalization` sum | token)
        L   = -(1/N) sum_i min(r_i A_i, clip(r_i, 1 - clip, 1 + clip) A_i)
    with A_i the row's advantage (its first valid token's) and N the rows of the mini-batch
    (`norm.seqs`); `weight` scales a row by its first valid token's weight. Rows without tokens count
    in N and add nothing."""
    m = mask > 0
    has = m.any(-1)
    first = m.float().argmax(-1, keepdim=True)
    a = adv.gather(-1, first).squeeze(-1).detach()
    lp = action_logprob(logp, mask, mode=normalization)
    old = action_logprob(old_logp.detach(), mask, mode=normalization)
    ratio = torch.exp((lp - old).clamp(-20, 20))
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    if weight is not None:
        surrogate = surrogate * weight.gather(-1, first).squeeze(-1).detach()
    n = norm.seqs if norm is not None and norm.seqs is not None else float(len(a))
    loss = -(surrogate * has).sum() / n
    clipped = ((ratio - 1).abs() > clip) & has
    return loss, {"marft/action_ratio_mean": float(ratio[has].mean()) if has.any() else 1.0,
                  "marft/clip_frac": float(clipped.sum() / has.sum().clamp(min=1)),
                  "ppo_kl": float((old - lp).detach()[has].mean()) if has.any() else 0.0}
