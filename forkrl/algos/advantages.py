"""Outcome advantage estimators (algorithms.md §0-1).

Every estimator has the signature
    fn(rewards [B], group_ids [B] (long), mask [B, T], **params) -> (advantages [B, T], metrics)
A response's scalar advantage is broadcast over its tokens and zeroed where `mask` is 0, so
token-level estimators can share the signature.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from forkrl.algos.registry import per_turn_index
from forkrl.registry import register_advantage


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


@register_advantage("hapo")
def hapo(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, eps: float = 1e-6, fallback_abs: float = 5.0
         ) -> tuple[Tensor, dict]:
    """HAPO token-level group average (Liu et al., 2025, arXiv 2509.16591; algorithms.md §7 b step 2):
    the group's mean and population std of the reward are taken over all valid tokens of the group
    (a response's reward counted once per token),
        mu_tok = sum_i n_i R_i / sum_i n_i,   sigma_tok = sqrt(sum_i n_i (R_i - mu_tok)^2 / sum_i n_i)
        A_i    = (R_i - mu_tok) / (sigma_tok + eps)
    and a group where any |A_i| >= fallback_abs (5) falls back to GRPO's advantages.
    """
    r = rewards.double()
    n = mask.double().sum(-1)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    G = int(inverse.max()) + 1 if inverse.numel() else 0
    tok = torch.zeros(G, dtype=torch.float64).index_add_(0, inverse, n).clamp(min=1)
    mu = torch.zeros(G, dtype=torch.float64).index_add_(0, inverse, n * r) / tok
    var = torch.zeros(G, dtype=torch.float64).index_add_(0, inverse, n * (r - mu[inverse]) ** 2) / tok
    adv = (r - mu[inverse]) / (var.sqrt()[inverse] + eps)
    grpo_adv, _ = grpo(rewards, group_ids, mask, eps=eps)
    bad = torch.zeros(G, dtype=torch.bool).index_put_((inverse,), adv.abs() >= fallback_abs, accumulate=True)
    fallback = bad[inverse]
    out = torch.where(fallback.unsqueeze(-1), grpo_adv.double(), _broadcast(adv, mask).double()).float()
    _, std, _ = _group_stats(rewards, group_ids)
    metrics = _metrics(adv, std)
    metrics["adv/hapo_fallback_groups_frac"] = float(bad.double().mean()) if G else 0.0
    return out, metrics


def _base_advantage(name: str, rewards: Tensor, group_ids: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
    if name not in ("grpo", "drgrpo", "rloo", "hapo"):
        raise ValueError(f"base advantage must be one of grpo, drgrpo, rloo, hapo; got {name!r}")
    return {"grpo": grpo, "drgrpo": drgrpo, "rloo": rloo, "hapo": hapo}[name](rewards, group_ids, mask)


@register_advantage("empg")
def empg(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, entropy: Tensor, base: Literal["grpo", "drgrpo", "rloo", "hapo"] = "grpo",
         k: float = 1.0, k_future: float = 1.0, zeta: float = 0.1, normalize: bool = True
         ) -> tuple[Tensor, dict]:
    """EMPG, Entropy-Modulated Policy Gradients (arXiv 2509.09265; algorithms.md §13.2, §25). A step is
    one assistant turn; H_s its mean token entropy at sampling time.
        H^_s = (H_s - min H) / (max H - min H + 1e-8)                (min, max over the batch's steps)
        g_s  = exp(-k H^_s) / mean_batch exp(-k H^)                 (batch mean of g is 1)
        f_s  = exp(-k_future H^_s)
        A'   = g_s A_i + zeta f_{s+1}                               (f of the next step; 0 after the last)
    then (normalize=True) A' is standardised over the batch's generated tokens. UNVERIFIED parts, our
    choices: the last step gets no bonus, and the final normalisation is a token-level z-score.
    A confident step of a failed trajectory gets g > 1 and so a larger penalty (§25).
    """
    base_adv, metrics = _base_advantage(base, rewards, group_ids, mask)
    seq_adv = base_adv.double().sum(-1) / mask.double().sum(-1).clamp(min=1)
    turn = per_turn_index(mask)
    ent = entropy.double()
    # one entry per (row, turn), in row order then turn order
    steps = [(b, s) for b in range(mask.shape[0]) for s in range(1, int(turn[b].max()) + 1)]
    flat = torch.tensor([float(ent[b][turn[b] == s].mean()) for b, s in steps], dtype=torch.float64)
    out = torch.zeros_like(mask, dtype=torch.float64)
    if flat.numel():
        lo, hi = flat.min(), flat.max()
        norm_h = (flat - lo) / (hi - lo + 1e-8)
        g_all = torch.exp(-k * norm_h)
        g_all = g_all / g_all.mean()
        f_all = torch.exp(-k_future * norm_h)
        for i, (b, s) in enumerate(steps):
            has_next = i + 1 < len(steps) and steps[i + 1][0] == b
            bonus = float(f_all[i + 1]) if has_next else 0.0
            out[b][turn[b] == s] = float(g_all[i]) * float(seq_adv[b]) + zeta * bonus
        valid = mask > 0
        if normalize and int(valid.sum()) > 1:
            v = out[valid]
            out = torch.where(valid, (out - v.mean()) / (v.std() + 1e-8), out)
        metrics["adv/empg_g_min"] = float(g_all.min())
        metrics["adv/empg_g_max"] = float(g_all.max())
    return (out * mask).float(), metrics


@register_advantage("aepo")
def aepo(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, entropy: Tensor, base: Literal["grpo", "drgrpo", "rloo", "hapo"] = "grpo",
         alpha: float = 0.1) -> tuple[Tensor, dict]:
    """AEPO entropy-aware advantage (arXiv 2510.14545; algorithms.md §3 b step 4, UNVERIFIED):
        A^_{i,t} = A_i (1 + alpha z_{i,t}),  z = sampling-time token entropy standardised over the batch's
    generated tokens. Our choices: the batch z-score and alpha = 0.1 (the sign of A survives |z| < 10).
    """
    base_adv, metrics = _base_advantage(base, rewards, group_ids, mask)
    valid = mask > 0
    e = entropy.double()
    if int(valid.sum()) > 1:
        v = e[valid]
        z = (e - v.mean()) / (v.std() if v.std() > 0 else 1.0)
    else:
        z = torch.zeros_like(e)
    out = base_adv.double() * (1 + alpha * z) * mask
    return out.float(), metrics


def step_discounted_returns(rewards: Tensor, steps: Tensor, gamma: float) -> Tensor:
    """UI-S1's discounted future return per step sample (algorithms.md §18 step 3): within each episode,
    backwards over its steps, G_t = r_t + gamma * G_{t+1}, except at a mismatched step, where
    G_t = r_t and the running sum restarts, so credit never crosses a patch. `steps` [B, 3]: episode
    id, step index, matched. Rows that are not steps (episode -1) keep their reward."""
    r = rewards.double()
    out = r.clone()
    episode, index, matched = steps[:, 0], steps[:, 1], steps[:, 2].bool()
    for e in torch.unique(episode[episode >= 0]).tolist():
        rows = (episode == e).nonzero().flatten()
        rows = rows[torch.argsort(index[rows], descending=True)]
        running = 0.0
        for i in rows.tolist():
            running = float(r[i]) if not matched[i] else float(r[i]) + gamma * running
            out[i] = running
    return out


@register_advantage("uis1")
def uis1(rewards: Tensor, group_ids: Tensor, mask: Tensor, *, steps: Tensor | None, gamma: float = 0.5,
         w_episode: float = 1.0, w_step: float = 1.0, normalization: Literal["mean_std_norm", "mean_norm"] = "mean_std_norm", eps: float = 1e-6
         ) -> tuple[Tensor, dict]:
    """UI-S1's semi-online advantage (Lu et al., 2025, arXiv 2509.11543; algorithms.md §18 step 4) for
    step-level samples (one row per step of an episode; a group is one task's episodes):
        A = w_E * A^E + w_S * A^S
        A^S: the discounted return G_t (`step_discounted_returns`, gamma 0.5) normalised within
             (task, step index t)
        A^E: the episode's reward, here the sum of its step rewards (UNVERIFIED which field UI-S1 uses),
             normalised within the task over all its step samples (mean and std across all data)
    normalization: mean_std_norm divides by the (Bessel) std + eps, mean_norm only subtracts the mean."""
    if steps is None:
        raise ValueError("advantage uis1 needs step-level samples of episodes (rollout.sampler: semi_online)")
    if normalization not in ("mean_std_norm", "mean_norm"):
        raise ValueError(f"uis1 normalization must be mean_std_norm or mean_norm, got {normalization!r}")
    G = step_discounted_returns(rewards, steps, gamma)
    episode = steps[:, 0]
    ep_reward = rewards.double().clone()
    for e in torch.unique(episode[episode >= 0]).tolist():
        rows = episode == e
        ep_reward[rows] = rewards.double()[rows].sum()
    # (task, step index) groups for A^S: one id per distinct pair
    _, step_group = torch.unique(torch.stack([group_ids, steps[:, 1]], 1), dim=0, return_inverse=True)

    def normalise(x, groups):
        mean, std, _ = _group_stats(x, groups)
        return (x - mean) / (std + eps) if normalization == "mean_std_norm" else x - mean
    a_step = normalise(G, step_group)
    a_episode = normalise(ep_reward, group_ids)
    adv = w_episode * a_episode + w_step * a_step
    metrics = {**_metrics(adv, _group_stats(rewards, group_ids)[1]), "uis1/return_mean": float(G.mean()),
               "uis1/episode_reward_mean": float(ep_reward.mean()),
               "uis1/matched_frac": float(steps[:, 2].double().mean())}
    return _broadcast(adv, mask), metrics
