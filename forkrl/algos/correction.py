"""Rollout/training mismatch correction: truncated and masked importance weights (algorithms.md §16).

The rollout comes from pi_roll (another engine, stale weights, a different sampling temperature);
PPO's ratio assumes pi_old is the behaviour policy. Per token rho = pi_old / pi_roll, and a detached
weight built from it multiplies the token loss before aggregation (as verl, OpenRLHF and slime do).
"""
from __future__ import annotations

import torch
from torch import Tensor

CORRECTION_MODES = ("none", "token_tis", "seq_tis", "icepop", "seq_mask_tis")


def rollout_correction_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, mode: str = "token_tis",
                               cap: float = 2.0, low: float = 0.0) -> tuple[Tensor, dict]:
    """Detached weights [B, T] and metrics (§16 b):
        token_tis:    w_t = min(rho_t, cap)                             (Yao et al.; DART uses cap = 1)
        seq_tis:      w = min(prod_t rho_t, cap), every token of the row
        icepop:       w_t = rho_t 1[low <= rho_t <= cap]
        seq_mask_tis: w_t = rho_t 1[low <= rho_geo <= cap],  rho_geo = exp(mean_t log rho_t)
    A row whose rollout log-probs are all zero (not recorded) gets w = 1 (DART's fallback).
    """
    if mode not in CORRECTION_MODES:
        raise ValueError(f"unknown rollout correction {mode!r}; allowed: {CORRECTION_MODES}")
    m = mask.to(torch.float64)
    log_rho = ((old_logp.detach() - rollout_logp.detach()).double() * m).clamp(-20, 20)
    rho = log_rho.exp()
    n = m.sum(-1).clamp(min=1)
    if mode == "token_tis" or mode == "none":
        w = rho.clamp(max=cap)
    elif mode == "seq_tis":
        w = log_rho.sum(-1, keepdim=True).exp().clamp(max=cap).expand_as(rho)
    elif mode == "icepop":
        w = rho * ((rho >= low) & (rho <= cap))
    else:
        geo = (log_rho.sum(-1) / n).exp().unsqueeze(-1)
        w = rho * ((geo >= low) & (geo <= cap))
    missing = ((rollout_logp != 0) & (mask > 0)).sum(-1) == 0
    w = torch.where(missing.unsqueeze(-1), torch.ones_like(w), w) * m
    valid = mask > 0
    metrics: dict[str, float] = {}
    if valid.any():
        wv, rv = w[valid], rho[valid]
        w_hat = wv / wv.mean().clamp(min=1e-12)
        metrics = {
            "rollout_corr/is_mean": float(wv.mean()), "rollout_corr/is_max": float(wv.max()),
            "rollout_corr/is_min": float(wv.min()),
            "rollout_corr/eff_sample_size": float(1.0 / (w_hat ** 2).mean().clamp(min=1e-12)),
            "rollout_corr/ratio_frac_high": float((rv > cap).double().mean()),
            "rollout_corr/kl": float((rollout_logp.double() - old_logp.double())[valid].mean()),
            "rollout_corr/probs_diff_mean": float((rollout_logp.double().exp() - old_logp.double().exp())[valid].abs().mean()),
        }
    return w.float(), metrics


def logprob_mismatch(learner_logp: Tensor, sampling_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the sampler's probabilities are from the learner's on the same tokens (algorithms.md §16
    a: the mismatch rollout correction corrects). Per token r = exp(|log p_sampling - log p_learner|)
    (1 = identical); returned as sums over `mask` so ranks and micro-batches add up:
        sum (of r), count_above_2 (tokens with r > 2), max (of r), tokens.
    A row whose sampling log-probs were not recorded (all zero) is left out."""
    m = mask > 0
    recorded = (sampling_logp != 0).any(-1, keepdim=True)
    m = m & recorded
    if not m.any():
        return {"sum": 0.0, "count_above_2": 0.0, "max": 1.0, "tokens": 0.0}
    r = (learner_logp.detach().double() - sampling_logp.double()).abs().clamp(max=50).exp()[m]
    return {"sum": float(r.sum()), "count_above_2": float((r > 2).sum()), "max": float(r.max()),
            "tokens": float(m.sum())}


DURATION_MODES = ("off", "mean", "sum", "raw")


def duration_weights(seconds: Tensor, *, mode: str = "mean") -> tuple[Tensor, dict]:
    """Duration-aware updates (RL for ML-engineering agents, arXiv 2509.01684; algorithms.md §22): an
    action that took dt_i seconds to execute contributes dt_i * A_i * grad log pi(a_i|s_i), which cancels
    the bias toward fast actions that return (and update) more often in asynchronous training. Per row:
        mean: w_i = dt_i / mean_batch(dt)      (the default; §22 leaves the normalisation UNVERIFIED)
        sum:  w_i = dt_i / sum_batch(dt)       raw: w_i = dt_i
    A batch whose actions all took no time gets w = 1. Returns ([B] weights, metrics)."""
    if mode not in DURATION_MODES:
        raise ValueError(f"unknown duration weighting {mode!r}; allowed: {DURATION_MODES}")
    dt = seconds.double().clamp(min=0)
    if mode == "off" or dt.numel() == 0 or float(dt.sum()) == 0.0:
        w = torch.ones_like(dt)
    elif mode == "mean":
        w = dt / dt.mean()
    elif mode == "sum":
        w = dt / dt.sum()
    else:
        w = dt
    metrics = {"duration/seconds_mean": float(dt.mean()) if dt.numel() else 0.0,
               "duration/weight_max": float(w.max()) if w.numel() else 0.0}
    return w.float(), metrics
