"""A learned critic's formulas: GAE over any sequence of actions, the clipped value loss, explained
variance, and the `gae` advantage estimator (algorithms.md §19-20; Schulman et al., 2016, arXiv
1506.02438; the PPO baseline of verl's quickstart).

One function serves every granularity: `gae` walks the positions where `mask` is 1, so the sequence
may be the generated tokens of a response (observation tokens between turns are skipped: they are
not the policy's actions) or MARFT's flattened (step, agent) actions (§19), where agent K of step t is
followed by agent 1 of step t + 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkrl.algos.losses import AggNorm, agg_loss
from forkrl.registry import register_advantage


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the positions of each row where `mask` is 1, [N, T] each:

        delta_t = r_t + gamma * V_next(t) - V_t        V_next(t) = V at the row's next masked position,
                                                       0 after its last one (the episode ends there)
        A_t     = delta_t + gamma * lam * A_next(t)
        R_t     = A_t + V_t                            (the lambda-return: the critic's target)

    Unmasked positions are skipped (their reward and value are ignored) and get A = R = 0. Computed
    in float64 backwards over T. Returns (advantages, returns)."""
    r, v, m = rewards.double(), values.double(), mask > 0
    N, T = r.shape
    adv = torch.zeros((N, T), dtype=torch.float64)
    next_value = torch.zeros(N, dtype=torch.float64)
    next_adv = torch.zeros(N, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        here = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(here, a, torch.zeros_like(a))
        next_value = torch.where(here, v[:, t], next_value)
        next_adv = torch.where(here, a, next_adv)
    returns = torch.where(m, adv + v, torch.zeros_like(adv))
    return adv.float(), returns.float()


def episode_gae(rewards: Tensor, values: Tensor, mask: Tensor, episodes: Tensor | None, *, gamma: float = 1.0,
                lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """`gae` where the rows of one episode form one sequence, [B, T] each in and out.

    `episodes` [B, 2+] holds each row's (episode id, step index): the rows of an episode are chained
    in step order, each row's masked positions in order, so the last position of a row is followed
    by the first of the next. That is MARFT's flattened (step, agent) sequence (§19): with one value
    per row (its first token), delta_{t,k} = r_{t,k} + gamma V_{t,k+1} - V_{t,k}, and agent K of step t
    is followed by agent 1 of step t + 1; with a value per token it is MARFT-T's chain of per-token
    GAE across agents. A row with episode id -1 (or `episodes` None) is a sequence of its own."""
    if episodes is None or bool((episodes[:, 0] < 0).all()):
        return gae(rewards, values, mask, gamma=gamma, lam=lam)
    m = mask > 0
    chains: dict[int, list[int]] = {}
    for b, (e, i) in enumerate(episodes[:, :2].tolist()):
        chains.setdefault(e if e >= 0 else -1 - b, []).append(b)
    order = [sorted(rows, key=lambda b: int(episodes[b, 1])) for rows in chains.values()]
    where = [[(b, t) for b in rows for t in m[b].nonzero().flatten().tolist()] for rows in order]
    T = max((len(w) for w in where), default=1) or 1
    flat_r, flat_v, flat_m = (torch.zeros(len(where), T) for _ in range(3))
    for c, w in enumerate(where):
        if w:
            rows, cols = zip(*w)
            flat_r[c, :len(w)], flat_v[c, :len(w)] = rewards[rows, cols], values[rows, cols]
            flat_m[c, :len(w)] = 1
    flat_adv, flat_ret = gae(flat_r, flat_v, flat_m, gamma=gamma, lam=lam)
    adv, ret = torch.zeros(rewards.shape), torch.zeros(rewards.shape)
    for c, w in enumerate(where):
        if w:
            rows, cols = zip(*w)
            adv[rows, cols], ret[rows, cols] = flat_adv[c, :len(w)], flat_ret[c, :len(w)]
    return adv, ret


def first_token_mask(mask: Tensor) -> Tensor:
    """[B, T]: 1 on each row's first masked position (where an action-level critic reads the state
    before the response), 0 elsewhere."""
    m = mask > 0
    out = torch.zeros(m.shape, dtype=torch.float32)
    has = m.any(-1)
    out[has, m.float().argmax(-1)[has]] = 1.0
    return out


def outcome_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """[B, T]: each row's scalar reward on its last masked token (the outcome arrives when the
    response ends), zero elsewhere."""
    m = mask > 0
    last = (m * torch.arange(1, m.shape[1] + 1)).argmax(-1)
    out = torch.zeros(m.shape, dtype=torch.float32)
    has = m.any(-1)
    out[has, last[has]] = rewards[has].float()
    return out


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries, with the Bessel-corrected variance, as
    verl's `masked_whiten`; zero where mask is 0."""
    m = mask > 0
    if m.sum() < 2:
        return torch.where(m, x - x[m].mean() if m.any() else x, torch.zeros_like(x))
    vals = x[m].double()
    mean, var = vals.mean(), vals.var(unbiased=True)
    return torch.where(m, ((x.double() - mean) * torch.rsqrt(var + eps)).float(), torch.zeros_like(x))


@register_advantage("gae")
def gae_advantage(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, values: Tensor, returns: Tensor,
                  value_mask: Tensor | None = None, whiten: bool = True) -> tuple[Tensor, dict]:
    """PPO's advantage from a learned critic: A = R - V, the GAE of `gae` (R the lambda-return the
    critic computed with its `algo.critic.gamma` and `lam`, V its values before the update), whitened
    over the positions the critic reads (`value_mask`: every generated token by default, as verl; one
    per response for an action-level critic, MARFT's normalisation over its nonzero entries;
    `whiten=False` keeps the raw scale). Each generated token then takes the advantage of the latest
    critic position at or before it, so an action-level advantage covers its whole response. Groups
    play no part: the critic is the baseline."""
    vm = (mask if value_mask is None else value_mask) > 0
    adv = torch.where(vm, returns - values, torch.zeros_like(values))
    raw = adv[vm]
    if whiten:
        adv = masked_whiten(adv, vm.float())
    if value_mask is not None:
        pos = torch.arange(vm.shape[1]).expand_as(vm)
        latest = torch.where(vm, pos, torch.full_like(pos, -1)).cummax(-1).values
        adv = torch.where((latest >= 0) & (mask > 0), adv.gather(-1, latest.clamp(min=0)), torch.zeros_like(adv))
    metrics = {"adv/mean": float(adv[vm].mean()) if vm.any() else 0.0,
               "adv/abs_mean": float(adv[vm].abs().mean()) if vm.any() else 0.0,
               "adv/raw_mean": float(raw.mean()) if vm.any() else 0.0}
    return adv, metrics


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None = 0.5,
               huber_delta: float | None = None, agg: str = "token-mean",
               norm: AggNorm | None = None) -> tuple[Tensor, dict]:
    """The clipped value loss of PPO (verl `compute_value_loss`; MARFT §19 with a Huber error):

        V_clip = old_V + clip(V - old_V, -clip, +clip)
        loss   = 0.5 * agg( max(e(V - R), e(V_clip - R)) ),    e(x) = x^2, or with huber_delta d:
                 e(x) = x^2 if |x| <= d else 2d|x| - d^2   (twice Huber's loss, so 0.5 * e = Huber)

    `clip=None` is the unclipped loss. Metrics: the loss, the share of tokens where the clipped error
    was the larger (vf_clipfrac), and the mean prediction."""
    def err(x: Tensor) -> Tensor:
        if huber_delta is None:
            return x ** 2
        a = x.abs()
        return torch.where(a <= huber_delta, x ** 2, 2 * huber_delta * a - huber_delta ** 2)

    unclipped = err(values - returns)
    if clip is None:
        worst, clipped_frac = unclipped, torch.zeros_like(unclipped)
    else:
        v_clip = old_values + (values - old_values).clamp(-clip, clip)
        clipped = err(v_clip - returns)
        worst = torch.maximum(unclipped, clipped)
        clipped_frac = (clipped > unclipped).float()
    loss = 0.5 * agg_loss(worst, mask, agg, norm)
    m = mask > 0
    n = m.sum().clamp(min=1)
    return loss, {"critic/vf_loss": float(loss.detach()),
                  "critic/vf_clipfrac": float((clipped_frac * m).sum() / n),
                  "critic/vpred_mean": float((values.detach() * m).sum() / n)}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked entries: 1 is a perfect critic, 0 one no better than a
    constant, negative worse than one. NaN when the returns do not vary."""
    m = mask > 0
    r, v = returns[m].double(), values[m].double()
    if r.numel() < 2 or float(r.var()) == 0.0:
        return float("nan")
    return float(1 - (r - v).var() / r.var())
