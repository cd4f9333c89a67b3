"""Policy losses, loss aggregation and KL estimators (algorithms.md §0-1).

A loss has the signature
    fn(logp, old_logp, adv, mask, *, entropy=None, agg="token-mean", norm=AggNorm(), weight=None, **params)
        -> (scalar loss, metrics)
with [B, T] tensors over response tokens. `norm` carries the normalisers of the whole mini-batch,
so that micro-batch losses summed under gradient accumulation equal the mini-batch loss exactly;
`weight` (detached, e.g. truncated importance weights) multiplies each token's loss before
aggregation, leaving the normalisers alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from forkrl.registry import register_loss

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl", "k1+", "k3+", "low_var_kl+")


@dataclass
class AggNorm:
    """Denominators for `agg_loss`; None means "count them in the tensors given".

    tokens: valid tokens in the mini-batch (token-mean); seqs: sequences in the mini-batch
    (seq-mean-*); const: Dr. GRPO's constant C, default the padded response length.
    """
    tokens: float | None = None
    seqs: float | None = None
    const: float | None = None


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str, norm: AggNorm | None = None,
             weight: Tensor | None = None) -> Tensor:
    """Aggregate a [B, T] per-token loss (algorithms.md §0, verl `agg_loss`):
      token-mean:              sum_{i,t} l / sum_{i,t} m
      seq-mean-token-mean:     (1/B) sum_i (sum_t l_i / |o_i|)          (original GRPO)
      seq-mean-token-sum:      (1/B) sum_i sum_t l_i
      seq-mean-token-sum-norm: (1/(B*C)) sum_{i,t} l                    (Dr. GRPO, C = max length)
    B counts every row given (or `norm.seqs`), fully masked rows included: a row with no valid token
    adds zero to the sum and one to the denominator, as in verl.
    """
    norm = norm or AggNorm()
    m = mask.to(loss_mat.dtype)
    masked = loss_mat * m if weight is None else loss_mat * m * weight.detach()
    if mode == "token-mean":
        denom = norm.tokens if norm.tokens is not None else m.sum().clamp(min=1)
        return masked.sum() / denom
    seqs = norm.seqs if norm.seqs is not None else float(mask.shape[0])
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1)
        return per_seq.sum() / seqs
    if mode == "seq-mean-token-sum":
        return masked.sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        const = norm.const if norm.const is not None else float(mask.shape[-1])
        return masked.sum() / (seqs * const)
    raise ValueError(f"unknown loss aggregation {mode!r}; allowed: {AGG_MODES}")


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "low_var_kl") -> Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate on sampled tokens (algorithms.md §0; Schulman's k1-k3):
      k1 = log pi - log pi_ref;  abs = |k1|;  k2 = 0.5 (log pi - log pi_ref)^2
      k3 = low_var_kl = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1, clamped to [-10, 10]
    with the log-ratio clamped to ±20 first, so that exp cannot overflow (an infinite value times the
    clamp's zero gradient would be NaN): beyond the clamp the gradient is zero, as intended.
    A "+" suffix keeps the estimator's value but takes the unbiased k2 gradient (straight-through).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; allowed: {KL_ESTIMATORS}")
    base = kind.rstrip("+")
    diff = logp - ref_logp
    if base == "k1":
        value = diff
    elif base == "abs":
        value = diff.abs()
    elif base == "k2":
        value = 0.5 * diff.square()
    else:  # k3 / low_var_kl
        d = torch.clamp(diff, -20.0, 20.0)
        value = torch.clamp(torch.exp(-d) + d - 1, min=-10, max=10)
    if kind.endswith("+"):
        k2 = 0.5 * diff.square()
        value = k2 - k2.detach() + value.detach()
    return value


def _masked_frac(cond: Tensor, mask: Tensor) -> float:
    m = mask.bool()
    return float((cond & m).sum()) / max(int(m.sum()), 1)


def clipped_surrogate(ratio: Tensor, adv: Tensor, mask: Tensor, clip_low: float | Tensor,
                      clip_high: float | Tensor) -> tuple[Tensor, dict]:
    """Per-token negative clipped surrogate, -S(eps_lo, eps_hi) of algorithms.md §0:
        l = max(-r A, -clip(r, 1 - clip_low, 1 + clip_high) A)
    with the shares of tokens whose gradient the low and high bounds cut off. The epsilons may be
    per-token tensors (HAPO's and BAPO's adaptive bounds)."""
    lo = 1 - clip_low if isinstance(clip_low, Tensor) else torch.full_like(ratio, 1 - clip_low)
    hi = 1 + clip_high if isinstance(clip_high, Tensor) else torch.full_like(ratio, 1 + clip_high)
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, lo, hi))
    metrics = {
        "clip/low_frac": _masked_frac((adv < 0) & (ratio < lo), mask),
        "clip/high_frac": _masked_frac((adv > 0) & (ratio > hi), mask),
    }
    return loss, metrics


def dual_clip(loss_mat: Tensor, adv: Tensor, mask: Tensor, clip_c: float | None, metrics: dict) -> Tensor:
    """Dual clip (Ye et al., 2020; verl; algorithms.md §0): for A < 0 cap the token loss at -clip_c A,
    so a negative token whose ratio has grown huge cannot dominate. None: no dual clip."""
    if clip_c is None:
        return loss_mat
    if clip_c <= 1.0:
        raise ValueError(f"clip_c must be > 1 (dual clip lower bound), got {clip_c}")
    cap = -adv * clip_c
    metrics["clip/dual_frac"] = _masked_frac((adv < 0) & (loss_mat > cap), mask)
    return torch.where(adv < 0, torch.minimum(loss_mat, cap), loss_mat)


def ratio_metrics(log_ratio: Tensor, mask: Tensor) -> dict:
    m = mask.bool()
    if not m.any():
        return {"ppo_kl": 0.0, "ratio/mean": 1.0}
    lr = log_ratio.detach()[m]
    return {"ppo_kl": float((-lr).mean()), "ratio/mean": float(lr.exp().mean())}


@register_loss("ppo_clip")
def ppo_clip(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, entropy: Tensor | None = None,
             agg: str = "token-mean", norm: AggNorm | None = None, weight: Tensor | None = None,
             clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float | None = None) -> tuple[Tensor, dict]:
    """PPO clipped surrogate (Schulman et al., 2017) as used by GRPO/DAPO (algorithms.md §0, §1.1-1.2):
        r = exp(logp - old_logp)
        l = max(-r A, -clip(r, 1 - clip_low, 1 + clip_high) A)
    DAPO's clip-higher is clip_high = 0.28. Dual clip (Ye et al., 2020; verl), when clip_c is set:
        l = min(l, -clip_c A)   for A < 0 only.
    """
    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    clipped, metrics = clipped_surrogate(ratio, adv, mask, clip_low, clip_high)
    clipped = dual_clip(clipped, adv, mask, clip_c, metrics)
    metrics.update(ratio_metrics(log_ratio, mask))
    return agg_loss(clipped, mask, agg, norm, weight), metrics


@register_loss("gspo")
def gspo(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, entropy: Tensor | None = None,
         agg: str = "seq-mean-token-mean", norm: AggNorm | None = None, weight: Tensor | None = None,
         clip_low: float = 3e-4, clip_high: float = 4e-4) -> tuple[Tensor, dict]:
    """GSPO-token (Zheng et al., 2025, arXiv 2507.18071; algorithms.md §1.4):
        log s_i   = (1/|o_i|) sum_t (logp - old_logp)                  (sequence ratio, geometric mean)
        s_{i,t}   = sg[s_i] * pi(o_t) / sg[pi(o_t)]                     (value s_i, own token's gradient)
        l_{i,t}   = max(-s_{i,t} A, -clip(s_{i,t}, 1 - clip_low, 1 + clip_high) A)
    log s_{i,t} is capped at 10. The paper averages over tokens then sequences (seq-mean-token-mean,
    the default here and in configs/gspo.yaml); another `agg` is honoured. `ppo_kl` is the per-token
    mean of -(logp - old_logp), as for every other loss.
    """
    m = mask.to(logp.dtype)
    seq_log_ratio = ((logp - old_logp) * m).sum(-1) / m.sum(-1).clamp(min=1)
    log_s = seq_log_ratio.detach().unsqueeze(-1) + logp - logp.detach()
    s = torch.exp(torch.clamp(log_s, max=10.0))
    loss_mat, metrics = clipped_surrogate(s, adv, mask, clip_low, clip_high)
    metrics.update(ratio_metrics(torch.clamp(logp - old_logp, -20.0, 20.0), mask))
    return agg_loss(loss_mat, mask, agg, norm, weight), metrics


@register_loss("nll")
def nll(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "token-mean",
        norm: AggNorm | None = None, weight: Tensor | None = None) -> tuple[Tensor, dict]:
    """Supervised fine-tuning: negative log-likelihood of the masked tokens, l = -log pi(y_t).
    Advantages are ignored; `forkrl sft` trains with it through the same learner as RL."""
    m = mask.bool()
    mean_nll = float(-logp.detach()[m].mean()) if m.any() else 0.0
    return agg_loss(-logp, mask, agg, norm, weight), {"sft/nll": mean_nll}
