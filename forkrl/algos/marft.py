"""MARFT's action-level pieces (Liao et al., 2025, arXiv 2504.16129; algorithms.md §19): an agent's
action is its whole response, so its log-probability is the sum of its token log-probs (optionally
normalised), and MARFT-A clips the ratio of those action log-probs. The flattened (step, agent) GAE is
`forkrl.algos.values.gae`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkrl.algos.losses import AggNorm
from forkrl.registry import register_loss, register_selector

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
               normalization: str = "sum", words: Tensor | None = None) -> tuple[Tensor, dict]:
    """MARFT-A's per-agent PPO on the action-level ratio (§19 "Update"):
        r_i = exp(log pi(a_i) - log pi_old(a_i))       (action_logprob, `normalization` sum | token | word;
                                                        `words` [B]: each response's word count)
        L   = -(1/N) sum_i min(r_i A_i, clip(r_i, 1 - clip, 1 + clip) A_i)
    with A_i the row's advantage (its first valid token's) and N the rows of the mini-batch
    (`norm.seqs`); `weight` scales a row by its first valid token's weight. Rows without tokens count
    in N and add nothing."""
    m = mask > 0
    has = m.any(-1)
    first = m.float().argmax(-1, keepdim=True)
    a = adv.gather(-1, first).squeeze(-1).detach()
    lp = action_logprob(logp, mask, mode=normalization, words=words)
    old = action_logprob(old_logp.detach(), mask, mode=normalization, words=words)
    ratio = torch.exp((lp - old).clamp(-20, 20))
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    if weight is not None:
        surrogate = surrogate * weight.gather(-1, first).squeeze(-1).detach()
    n = norm.seqs if norm is not None and norm.seqs is not None else float(len(a))
    loss = -(surrogate * has).sum() / n
    clipped = ((ratio - 1).abs() > clip) & has
    return loss, {"marft/action_ratio_mean": float(ratio.detach()[has].mean()) if has.any() else 1.0,
                  "marft/clip_frac": float(clipped.sum() / has.sum().clamp(min=1)),
                  "ppo_kl": float((old - lp).detach()[has].mean()) if has.any() else 0.0}


@register_selector("agent_by_agent")
def agent_by_agent(values: Tensor, group_ids: Tensor, *, adapter: Tensor | None = None, step: int = 1,
                   interval: int = 1000) -> Tensor:
    """MARFT's optional agent-by-agent training (§19, `agent_iteration_interval`): for `interval`
    steps only one agent trains, then the next, in profile order:
        trained agent at step s = floor((s - 1) / interval) mod K
    `adapter` [B] is each row's agent (the index of its LoRA adapter in `model.adapters`, the profile
    order; K = the highest index + 1, every agent acting in every episode); rows of the other agents
    are dropped, so their adapters get no gradient and keep their weights."""
    if adapter is None:
        raise ValueError("agent_by_agent trains one agent's adapter at a time: the rows name no adapter "
                         "(set model.adapters)")
    agents = int(adapter.max()) + 1
    return adapter == ((step - 1) // interval) % agents
