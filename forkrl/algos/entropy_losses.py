"""Policy losses that treat tokens by their entropy (algorithms.md §3, §4, §7, §8, §9, §13.1).

- clip_cov, kl_cov  (§4)    restrict the tokens whose log-prob/advantage covariance drives entropy down
- hapo              (§7)    entropy-dependent advantage redistribution and asymmetric clip bounds
- steer             (§8)    down-weight tokens predicted to move entropy most
- bapo              (§9)    clip bounds widened until positive tokens carry a target share of the loss
- aepo              (§3.3)  keep a bounded gradient for clipped high-entropy tokens
- epo               (§13.1) entropy bonus with a band around each turn's historical entropy

Batch statistics. Where a method's statistic is a quantile, maximum or mean over tokens, the
reference code takes it over one micro-batch, so its result depends on a memory knob. Here
`scope="batch"` (the default) takes it once over the whole rollout batch in the loss's `prepare`
hook, from the policy the update starts from (old log-probs, sampling-time entropies);
`scope="micro"` reproduces the reference. The choice is logged as `<method>/batch_scope`.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from forkrl.algos.losses import (
    AggNorm,
    _masked_frac,
    agg_loss,
    clipped_surrogate,
    dual_clip,
    ratio_metrics,
)
from forkrl.algos.registry import BatchContext
from forkrl.registry import register_loss

SCOPES = ("batch", "micro")


def _check_scope(scope: str) -> bool:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scope == "batch"


def _ratio(logp: Tensor, old_logp: Tensor) -> tuple[Tensor, Tensor]:
    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)
    return log_ratio, torch.exp(log_ratio)


# ---------------------------------------------------------------------------------------------
# §4 Clip-Cov and KL-Cov (Cui et al., 2025, "The Entropy Mechanism of Reinforcement Learning for
# Reasoning Language Models", arXiv 2505.22617). For a softmax policy under policy gradient
#     H(pi^{k+1}) - H(pi^k)  ~  -eta * Cov(log pi(a|s), pi(a|s) * A(s, a)),
# so the few tokens with the largest covariance drive the entropy drop.
# ---------------------------------------------------------------------------------------------

def token_covariance(logp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """Cov_j = (log pi(y_j) - mean log pi) * (A_j - mean A), with means over valid tokens (§4 b).
    Detached; zero on masked tokens."""
    m = mask.bool()
    lp, a = logp.detach(), adv.detach()
    n = m.sum().clamp(min=1)
    lp_mean = (lp * m).sum() / n
    a_mean = (a * m).sum() / n
    return torch.where(m, (lp - lp_mean) * (a - a_mean), torch.zeros_like(lp))


def _random_pick(candidates: Tensor, n_valid: int, share: float, generator=None) -> Tensor:
    """floor(share * n_valid) (at least 1, at most all) of the true entries of `candidates`, uniformly."""
    idx = candidates.nonzero()
    n_pick = min(max(int(share * n_valid), 1), len(idx))
    picked = torch.zeros_like(candidates)
    if n_pick:
        chosen = idx[torch.randperm(len(idx), generator=generator)[:n_pick]]
        picked[chosen[:, 0], chosen[:, 1]] = True
    return picked


def _top_pick(scores: Tensor, mask: Tensor, share: float) -> Tensor:
    """The top max(1, floor(share * N)) valid entries of `scores`."""
    valid = mask.bool()
    picked = torch.zeros_like(valid)
    n_valid = int(valid.sum())
    if n_valid:
        k = max(1, int(share * n_valid))
        flat = torch.where(valid, scores, torch.full_like(scores, -torch.inf)).flatten()
        picked.view(-1)[torch.topk(flat, k).indices] = True
    return picked


def _clip_cov_prepare(ctx: BatchContext, *, clip_ratio: float = 2e-4, cov_low: float = 1.0, cov_high: float = 5.0,
                      scope: str = "batch", **_) -> tuple[dict, dict]:
    if not _check_scope(scope):
        return {}, ctx.state
    cov = token_covariance(ctx.old_logp, ctx.adv, ctx.mask)
    # at the start of the update the ratio is 1, so no token is clipped yet: every in-range token is a candidate
    candidates = ctx.mask.bool() & (cov > cov_low) & (cov < cov_high)
    picked = _random_pick(candidates, int(ctx.mask.bool().sum()), clip_ratio, ctx.generator)
    return {"cov_picked": picked, "cov": cov, "cov_candidates": float(candidates.sum())}, ctx.state


@register_loss("clip_cov", prepare=_clip_cov_prepare)
def clip_cov(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "token-mean",
             norm: AggNorm | None = None, weight: Tensor | None = None, stats: dict | None = None,
             clip_low: float = 1.0, clip_high: float = 1.0, clip_ratio: float = 2e-4, cov_low: float = 1.0,
             cov_high: float = 5.0, scope: Literal["batch", "micro"] = "batch") -> tuple[Tensor, dict]:
    """Clip-Cov (§4 b, defaults from the official `*_clip_cov.sh` scripts):
        Cov_j      = (log pi_j - mean log pi) (A_j - mean A)
        candidates = valid tokens not already clipped by the ratio clip, with cov_low < Cov_j < cov_high
        I          = floor(clip_ratio * N) of them (at least 1), drawn uniformly at random
        l_j        = 0 for j in I (no gradient), else the clipped surrogate max(-r A, -clip(r) A)
    N counts the valid tokens. The base clip is 1/1, a range of [0, 2], so the ratio is almost unclipped.
    scope="batch": Cov and I over the whole rollout batch, drawn once per batch (at the ratio of 1 the
    update starts from, nothing is clipped yet); "micro": over each micro-batch, as the reference.
    """
    batch_scope = _check_scope(scope) and bool(stats)
    log_ratio, ratio = _ratio(logp, old_logp)
    loss_mat, metrics = clipped_surrogate(ratio, adv, mask, clip_low, clip_high)
    if batch_scope:
        picked, cov, n_cand = stats["cov_picked"], stats["cov"], stats["cov_candidates"]
    else:
        clipped_by_ratio = (-adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)) > (-adv * ratio)
        cov = token_covariance(logp, adv, mask)
        candidates = mask.bool() & ~clipped_by_ratio & (cov > cov_low) & (cov < cov_high)
        picked = _random_pick(candidates, int(mask.bool().sum()), clip_ratio)
        n_cand = float(candidates.sum())
    metrics.update(ratio_metrics(log_ratio, mask))
    metrics["cov/selected_frac"] = _masked_frac(picked, mask)
    metrics["cov/candidates"] = n_cand
    metrics["cov/mean"] = float(cov[mask.bool()].mean()) if mask.any() else 0.0
    metrics["cov/batch_scope"] = float(batch_scope)
    return agg_loss(loss_mat * (~picked).to(loss_mat.dtype), mask, agg, norm, weight), metrics


def _kl_cov_prepare(ctx: BatchContext, *, kl_ratio: float = 2e-3, scope: str = "batch", **_) -> tuple[dict, dict]:
    if not _check_scope(scope):
        return {}, ctx.state
    cov = token_covariance(ctx.old_logp, ctx.adv, ctx.mask)
    return {"cov_picked": _top_pick(cov, ctx.mask, kl_ratio), "cov": cov}, ctx.state


@register_loss("kl_cov", prepare=_kl_cov_prepare)
def kl_cov(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "token-mean",
           norm: AggNorm | None = None, weight: Tensor | None = None, stats: dict | None = None,
           kl_ratio: float = 2e-3, kl_coef: float = 1.0, scope: Literal["batch", "micro"] = "batch") -> tuple[Tensor, dict]:
    """KL-Cov (§4 b, defaults from the official 7B script: k = 0.2% = 2e-3, beta = 1):
        I   = the top max(1, floor(kl_ratio * N)) valid tokens by Cov_j
        l_j = -r_j A_j + kl_coef * |log r_j|   for j in I
        l_j = -r_j A_j                           otherwise (no ratio clipping at all)
    With a single update per rollout batch r = 1 and |log r| has zero gradient: KL-Cov is then
    exactly the unclipped policy gradient; it acts from the second mini-batch or epoch on.
    scope as for clip_cov.
    """
    batch_scope = _check_scope(scope) and bool(stats)
    log_ratio, ratio = _ratio(logp, old_logp)
    loss_mat = -adv * ratio
    if batch_scope:
        picked, cov = stats["cov_picked"], stats["cov"]
    else:
        cov = token_covariance(logp, adv, mask)
        picked = _top_pick(cov, mask, kl_ratio)
    loss_mat = torch.where(picked, loss_mat + kl_coef * log_ratio.abs(), loss_mat)
    valid = mask.bool()
    metrics = ratio_metrics(log_ratio, mask)
    metrics.update({
        "cov/selected_frac": _masked_frac(picked, mask),
        "cov/mean": float(cov[valid].mean()) if valid.any() else 0.0,
        "ppo_kl_abs": float(log_ratio.detach().abs()[valid].mean()) if valid.any() else 0.0,
        "cov/batch_scope": float(batch_scope),
    })
    return agg_loss(loss_mat, mask, agg, norm, weight), metrics




# ---------------------------------------------------------------------------------------------
# §7 HAPO (Liu et al., 2025, "Heterogeneous Adaptive Policy Optimization", arXiv 2509.16591)
# ---------------------------------------------------------------------------------------------

def hapo_entropy_stats(entropy: Tensor, mask: Tensor, pivot: float = 0.8) -> dict[str, float]:
    """Statistics of l = log(max(H, 1e-8)) over valid tokens (§7 b):
        mu = pivot-quantile of l,  sigma = sqrt(mean((l - mu)^2)),  z = (l - mu) / sigma,
        pos_scale = max of the positive z,  neg_scale = |min of the negative z|."""
    valid = mask.bool()
    if not valid.any():
        return {"mu": 0.0, "sigma": 1.0, "pos_scale": 1.0, "neg_scale": 1.0}
    ell = torch.log(entropy.detach().double().clamp(min=1e-8))[valid]
    mu = torch.quantile(ell, pivot)
    sigma = torch.sqrt(((ell - mu) ** 2).mean())
    z = (ell - mu) / sigma if sigma > 0 else torch.zeros_like(ell)
    pos = z[z > 0]
    neg = z[z < 0]
    return {"mu": float(mu), "sigma": float(sigma) if sigma > 0 else 1.0,
            "pos_scale": float(pos.max()) if pos.numel() else 1.0,
            "neg_scale": float(-neg.min()) if neg.numel() else 1.0}


def hapo_normalized_entropy(entropy: Tensor, stats: dict[str, float]) -> Tensor:
    """h in [-1, 1] (on the tokens the stats came from): z / pos_scale for z > 0, z / neg_scale
    for z <= 0, with z = (log max(H, 1e-8) - mu) / sigma. Clamped, as other tokens may fall outside."""
    z = (torch.log(entropy.detach().float().clamp(min=1e-8)) - stats["mu"]) / stats["sigma"]
    h = torch.where(z > 0, z / stats["pos_scale"], z / stats["neg_scale"])
    return h.clamp(-1.0, 1.0)


def _hapo_prepare(ctx: BatchContext, *, entropy_pivot: float = 0.8, scope: str = "batch", **_) -> tuple[dict, dict]:
    if not _check_scope(scope):
        return {}, ctx.state
    s = hapo_entropy_stats(ctx.entropy, ctx.mask, entropy_pivot)
    return {"h": hapo_normalized_entropy(ctx.entropy, s) * ctx.mask, **{f"hapo_{k}": v for k, v in s.items()}}, ctx.state


@register_loss("hapo", prepare=_hapo_prepare)
def hapo(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, entropy: Tensor | None = None,
         agg: str = "token-mean", norm: AggNorm | None = None, weight: Tensor | None = None,
         stats: dict | None = None, clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float | None = 10.0,
         adv_beta: float = 1.0, clip_alpha: float = 1.0, entropy_pivot: float = 0.8,
         scope: Literal["batch", "micro"] = "batch") -> tuple[Tensor, dict]:
    """HAPO's loss (§7 b steps 3-4; defaults from `recipe/qwen2.5_math_7b.sh`). With h in [-1, 1] the
    normalised log-entropy of each token (`hapo_normalized_entropy`, pivot quantile 0.8):
      3. A' = A (1 + adv_beta h); neutral zone r in (1 - clip_low/2, 1 + clip_high/2).
         h > 0 (uncertain):  A inside the neutral zone, A' (amplified) outside it
         h <= 0 (confident): A' (damped) inside the neutral zone, A outside it
      4. h <= 0: eps_lo = clip_low (1 - clip_alpha h)  (a wider lower range);  eps_hi = clip_high
         h > 0:  eps_hi = clip_high (1 + clip_alpha h) (a wider upper range);  eps_lo = clip_low
    then the dual-clip PPO loss (clip_c = 10). The entropy is the current policy's (the reference
    takes its statistics per micro-batch: scope="micro"); scope="batch" takes them over the
    rollout batch from the sampling-time entropies, which are the same policy's at the first update.
    """
    batch_scope = _check_scope(scope) and bool(stats)
    log_ratio, ratio = _ratio(logp, old_logp)
    if batch_scope:
        h = stats["h"]
    else:
        if entropy is None:
            raise ValueError("hapo with scope='micro' needs the current policy's token entropy")
        h = hapo_normalized_entropy(entropy, hapo_entropy_stats(entropy, mask, entropy_pivot)) * mask
    high = h > 0
    r = ratio.detach()
    neutral = (r > 1 - clip_low / 2) & (r < 1 + clip_high / 2)
    amplified = adv * (1 + adv_beta * h)
    adv_eff = torch.where(high, torch.where(neutral, adv, amplified), torch.where(neutral, amplified, adv))
    eps_lo = torch.where(high, torch.full_like(h, clip_low), clip_low * (1 - clip_alpha * h))
    eps_hi = torch.where(high, clip_high * (1 + clip_alpha * h), torch.full_like(h, clip_high))
    loss_mat, metrics = clipped_surrogate(ratio, adv_eff, mask, eps_lo, eps_hi)
    loss_mat = dual_clip(loss_mat, adv_eff, mask, clip_c, metrics)
    metrics.update(ratio_metrics(log_ratio, mask))
    valid = mask.bool()
    metrics["hapo/high_entropy_frac"] = _masked_frac(high, mask)
    metrics["hapo/eps_hi_mean"] = float(eps_hi[valid].mean()) if valid.any() else clip_high
    metrics["hapo/eps_lo_mean"] = float(eps_lo[valid].mean()) if valid.any() else clip_low
    metrics["hapo/batch_scope"] = float(batch_scope)
    return agg_loss(loss_mat, mask, agg, norm, weight), metrics




# ---------------------------------------------------------------------------------------------
# §8 STEER (arXiv 2510.10150): first-order entropy change of one update on token t,
#     Omega_t = (A_t / p_old) p (1 - p) (log p + H_t),
# and a weight that shrinks where |Omega| is large.
# ---------------------------------------------------------------------------------------------

def steer_omega(logp: Tensor, old_logp: Tensor, adv: Tensor, entropy: Tensor) -> Tensor:
    """Omega_t = (A_t / p_old) * p (1 - p) * (log p + H_t), detached (§8 b), computed as
    A_t * (p / p_old) * (1 - p) * (log p + H_t) with the ratio's log clamped to ±20 like every ratio
    here, so a vanishing p_old cannot overflow it."""
    lp = logp.detach()
    _, ratio = _ratio(lp, old_logp.detach())
    return adv.detach() * ratio * (1 - lp.exp()) * (lp + entropy.detach())


def steer_weights(omega: Tensor, omega_max: float, *, mode: str = "exponential", w_min: float = 0.8,
                  w_max: float = 1.0) -> Tensor:
    """exponential: lambda = clip(exp(-kappa |Omega|), w_min, 1), kappa = -ln(w_min) / max(omega_max, 0.02),
    so the token with the largest |Omega| gets w_min. linear: |Omega| mapped linearly onto
    [w_max, w_min] over [0, max(omega_max, 0.02)], clipped to [w_min, w_max]."""
    if not 0 < w_min <= w_max:
        raise ValueError(f"STEER needs 0 < w_min <= w_max, got {w_min}, {w_max}")
    denom = max(float(omega_max), 0.02)
    a = omega.abs()
    if mode == "exponential":
        kappa = -math.log(w_min) / denom
        return torch.exp(-kappa * a).clamp(w_min, 1.0)
    if mode == "linear":
        return (w_max - (w_max - w_min) * a / denom).clamp(w_min, w_max)
    raise ValueError(f"STEER mode must be 'exponential' or 'linear', got {mode!r}")


def _steer_prepare(ctx: BatchContext, *, scope: str = "batch", **_) -> tuple[dict, dict]:
    if not _check_scope(scope):
        return {}, ctx.state
    omega = steer_omega(ctx.old_logp, ctx.old_logp, ctx.adv, ctx.entropy) * ctx.mask
    return {"omega_max": float(omega.abs().max()) if ctx.mask.any() else 0.0}, ctx.state


@register_loss("steer", prepare=_steer_prepare)
def steer(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, entropy: Tensor | None = None,
          agg: str = "token-mean", norm: AggNorm | None = None, weight: Tensor | None = None,
          stats: dict | None = None, clip_low: float = 0.2, clip_high: float = 0.28, clip_c: float | None = 10.0,
          mode: Literal["exponential", "linear"] = "exponential", w_min: float = 0.8, w_max: float = 1.0, scope: Literal["batch", "micro"] = "batch"
          ) -> tuple[Tensor, dict]:
    """STEER (§8 b, defaults from `run/run_exp.sh`): the dual-clip DAPO surrogate of each token times
    lambda_t = `steer_weights(Omega_t)`, computed without gradient from the current p and H_t, token-mean.
    The max |Omega| that sets kappa is over the rollout batch (scope="batch", from the policy the
    update starts from) or over the micro-batch (scope="micro")."""
    if entropy is None:
        raise ValueError("steer needs the current policy's token entropy")
    batch_scope = _check_scope(scope) and bool(stats)
    log_ratio, ratio = _ratio(logp, old_logp)
    omega = steer_omega(logp, old_logp, adv, entropy) * mask
    omega_max = stats["omega_max"] if batch_scope else float(omega.abs().max())
    lam = steer_weights(omega, omega_max, mode=mode, w_min=w_min, w_max=w_max)
    loss_mat, metrics = clipped_surrogate(ratio, adv, mask, clip_low, clip_high)
    loss_mat = dual_clip(loss_mat, adv, mask, clip_c, metrics)
    metrics.update(ratio_metrics(log_ratio, mask))
    valid = mask.bool()
    metrics["steer/weight_mean"] = float(lam[valid].mean()) if valid.any() else 1.0
    metrics["steer/weight_min"] = float(lam[valid].min()) if valid.any() else 1.0
    metrics["steer/omega_max"] = float(omega_max)
    metrics["steer/batch_scope"] = float(batch_scope)
    w = lam if weight is None else lam * weight
    return agg_loss(loss_mat, mask, agg, norm, w), metrics




# ---------------------------------------------------------------------------------------------
# §9 BAPO (arXiv 2510.18927): clip bounds widened step by step until the positive-advantage tokens
# carry a target share of the (effective) advantage mass.
# ---------------------------------------------------------------------------------------------

def bapo_pos_neg_ratio(ratio: Tensor, adv: Tensor, mask: Tensor, c_lo: float, c_hi: float, eps: float = 1e-8) -> float:
    """kappa = Pos / Neg of the effective advantages e = r~ A, r~ = min(r, c_hi) for A >= 0 and
    max(r, c_lo) for A < 0 (§9 b steps 1-2); inf when there is no negative mass."""
    r = ratio.detach()
    eff = torch.where(adv >= 0, torch.clamp(r, max=c_hi), torch.clamp(r, min=c_lo)) * adv * mask
    pos = float(eff.clamp(min=0).sum())
    neg = float((-eff).clamp(min=0).sum())
    return math.inf if neg <= 0 else pos / (neg + eps)


def bapo_bounds(ratio: Tensor, adv: Tensor, mask: Tensor, *, target: float, lower: tuple[float, float, float],
                upper: tuple[float, float, float]) -> tuple[float, float, float, int]:
    """The bound search of §9 b step 3. lower/upper = (start, max, step) of c_lo / c_hi. Raise c_lo
    step by step while kappa < target, then c_hi. Returns (c_lo, c_hi, kappa, steps taken)."""
    (c_lo, lo_max, lo_step), (c_hi, hi_max, hi_step) = lower, upper
    kappa = bapo_pos_neg_ratio(ratio, adv, mask, c_lo, c_hi)
    steps = 0
    while kappa < target and c_lo < lo_max and lo_step > 0:
        c_lo = min(c_lo + lo_step, lo_max)
        kappa = bapo_pos_neg_ratio(ratio, adv, mask, c_lo, c_hi)
        steps += 1
    while kappa < target and c_hi < hi_max and hi_step > 0:
        c_hi = min(c_hi + hi_step, hi_max)
        kappa = bapo_pos_neg_ratio(ratio, adv, mask, c_lo, c_hi)
        steps += 1
    return c_lo, c_hi, kappa, steps


@register_loss("bapo")
def bapo(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "token-mean",
         norm: AggNorm | None = None, weight: Tensor | None = None, target_ratio: float = 1.0,
         lower_start: float = 0.6, lower_max: float = 0.8, lower_step: float = 0.05, upper_start: float = 1.2,
         upper_max: float = 2.0, upper_step: float = 0.05, clip_c: float | None = 3.0) -> tuple[Tensor, dict]:
    """BAPO (§9 b; defaults from `config/bapo_trainer.yaml`: kappa_target = Pos/Neg = 1, i.e. rho_0 = 0.5,
    c_lo in [0.6, 0.8] and c_hi in [1.2, 2.0], steps 0.05; clip_c = 3, verl's default there):
        (c_lo, c_hi) = `bapo_bounds` on this micro-batch's current ratios
        l = max(-r A, -clip(r, c_lo, c_hi) A), dual-clipped for A < 0.
    The bounds are explicit ratio bounds, not 1 +- eps. The search runs on the tokens of the call,
    which is one micro-batch (the reference all-reduces the same sums over data-parallel ranks).
    Logged: bapo/c_lo, bapo/c_hi, bapo/pos_neg_ratio (after the search) and bapo/search_steps.
    """
    if not lower_start <= lower_max or not upper_start <= upper_max:
        raise ValueError("BAPO needs lower_start <= lower_max and upper_start <= upper_max")
    log_ratio, ratio = _ratio(logp, old_logp)
    c_lo, c_hi, kappa, steps = bapo_bounds(ratio, adv, mask, target=target_ratio,
                                           lower=(lower_start, lower_max, lower_step),
                                           upper=(upper_start, upper_max, upper_step))
    loss_mat, metrics = clipped_surrogate(ratio, adv, mask, 1 - c_lo, c_hi - 1)
    loss_mat = dual_clip(loss_mat, adv, mask, clip_c, metrics)
    metrics.update(ratio_metrics(log_ratio, mask))
    metrics.update({"bapo/c_lo": c_lo, "bapo/c_hi": c_hi, "bapo/pos_neg_ratio": min(kappa, 1e6),
                    "bapo/search_steps": float(steps)})
    return agg_loss(loss_mat, mask, agg, norm, weight), metrics


# ---------------------------------------------------------------------------------------------
# §3 step 3 AEPO entropy clipping-balanced loss (arXiv 2510.14545)
# ---------------------------------------------------------------------------------------------

def _entropy_z(entropy: Tensor, mask: Tensor) -> Tensor:
    valid = mask.bool()
    if not valid.any():
        return torch.zeros_like(entropy)
    e = entropy.detach()[valid].double()
    std = float(e.std()) if e.numel() > 1 else 0.0
    z = (entropy.detach() - float(e.mean())) / (std if std > 0 else 1.0)
    return z * mask


def _aepo_prepare(ctx: BatchContext, *, scope: str = "batch", **_) -> tuple[dict, dict]:
    if not _check_scope(scope):
        return {}, ctx.state
    return {"entropy_z": _entropy_z(ctx.entropy, ctx.mask)}, ctx.state


@register_loss("aepo", prepare=_aepo_prepare)
def aepo(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, entropy: Tensor | None = None,
         agg: str = "token-mean", norm: AggNorm | None = None, weight: Tensor | None = None,
         stats: dict | None = None, clip_low: float = 0.2, clip_high: float = 0.28, clip_c: float | None = None,
         high_entropy_only: bool = True, scope: Literal["batch", "micro"] = "batch") -> tuple[Tensor, dict]:
    """AEPO's entropy clipping-balanced loss (§3 b step 3; UNVERIFIED, so every choice is a parameter).
    A token clipped by the ratio bound keeps a gradient scaled by the bound, with the clipped value:
        A > 0, r > 1 + clip_high:  l = -sg((1 + clip_high) / r) r A   (value -(1+eps_hi) A, grad -(1+eps_hi) A dlog pi)
        A < 0, r < 1 - clip_low:   l = -sg((1 - clip_low) / r) r A
    Other tokens use the clipped surrogate. Our choices: "high-entropy" means token entropy above the
    mean of the rollout batch (z > 0; scope="batch", sampling-time entropies) or of the micro-batch
    (scope="micro", current entropies); high_entropy_only=False applies it to every clipped token
    (the GPPO construction). Pair with the `aepo` advantage estimator (§3 b step 4).
    """
    batch_scope = _check_scope(scope) and bool(stats)
    log_ratio, ratio = _ratio(logp, old_logp)
    loss_mat, metrics = clipped_surrogate(ratio, adv, mask, clip_low, clip_high)
    if batch_scope:
        z = stats["entropy_z"]
    else:
        if entropy is None:
            raise ValueError("aepo with scope='micro' needs the current policy's token entropy")
        z = _entropy_z(entropy, mask)
    eligible = (z > 0) if high_entropy_only else torch.ones_like(mask, dtype=torch.bool)
    above = eligible & (adv > 0) & (ratio.detach() > 1 + clip_high)
    below = eligible & (adv < 0) & (ratio.detach() < 1 - clip_low)
    bound = torch.where(above, torch.full_like(ratio, 1 + clip_high), torch.full_like(ratio, 1 - clip_low))
    kept = -(bound / ratio).detach() * ratio * adv
    loss_mat = torch.where(above | below, kept, loss_mat)
    loss_mat = dual_clip(loss_mat, adv, mask, clip_c, metrics)
    metrics.update(ratio_metrics(log_ratio, mask))
    metrics["aepo/kept_clipped_frac"] = _masked_frac(above | below, mask)
    metrics["aepo/batch_scope"] = float(batch_scope)
    return agg_loss(loss_mat, mask, agg, norm, weight), metrics




# ---------------------------------------------------------------------------------------------
# §13.1 EPO (arXiv 2509.22576): entropy bonus over all turns, a smoothing penalty that keeps each
# turn's entropy in a band around its historical average, and a phase-dependent weight.
# ---------------------------------------------------------------------------------------------

def epo_phase_weight(progress: float) -> float:
    """beta(e) of §13.1 b, with progress = e / E_max in [0, 1]:
        first half:  1 - 0.2 (1 - exp(-2u)),  u = progress / 0.5       (1.0 -> ~0.83)
        second half: 0.8 exp(-3u'),           u' = (progress - 0.5) / 0.5"""
    p = min(max(progress, 0.0), 1.0)
    if p < 0.5:
        return 1 - 0.2 * (1 - math.exp(-2 * p / 0.5))
    return 0.8 * math.exp(-3 * (p - 0.5) / 0.5)


def turn_mean(values: Tensor, turn: Tensor, mask: Tensor) -> Tensor:
    """[B, T]: each token replaced by the mean of `values` over its (row, turn) segment."""
    m = mask.to(values.dtype) * (turn > 0)
    n_turns = int(turn.max()) if turn.numel() else 0
    out = torch.zeros_like(values)
    for s in range(1, n_turns + 1):
        seg = (turn == s).to(values.dtype) * m
        mean = (values * seg).sum(-1, keepdim=True) / seg.sum(-1, keepdim=True).clamp(min=1)
        out = out + mean * seg
    return out


def _epo_prepare(ctx: BatchContext, **_) -> tuple[dict, dict]:
    """Fold this batch's mean entropy per turn index into the running history, H_bar_s = the mean
    over all steps so far (this one included) of the batch-average entropy at turn s."""
    history = {int(k): list(v) for k, v in ctx.state.get("turn_entropy", {}).items()}  # s -> [sum, count]
    valid = ctx.mask.bool() & (ctx.turn > 0)
    for s in torch.unique(ctx.turn[valid]).tolist():
        sel = valid & (ctx.turn == s)
        total, count = history.get(s, [0.0, 0])
        history[s] = [total + float(ctx.entropy[sel].double().mean()), count + 1]
    h_bar = torch.zeros_like(ctx.entropy)
    for s, (total, count) in history.items():
        h_bar = torch.where(ctx.turn == s, torch.full_like(h_bar, total / count), h_bar)
    state = {**ctx.state, "turn_entropy": {str(k): v for k, v in history.items()}}
    return {"h_bar": h_bar * ctx.mask, "max_turn": int(ctx.turn.max()) if ctx.turn.numel() else 0}, state


@register_loss("epo", prepare=_epo_prepare)
def epo(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, entropy: Tensor | None = None,
        agg: str = "token-mean", norm: AggNorm | None = None, weight: Tensor | None = None,
        stats: dict | None = None, turn: Tensor | None = None, progress: float = 0.0,
        clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float | None = None, entropy_coef: float = 1e-3,
        smooth_coef: float = 1.0, penalty: float = 0.05, band_low: float = 0.0, band_high: float = 2.0,
        mode: Literal["token", "seq"] = "token", phase_weighting: bool = True, smooth_from_turn: int | None = None
        ) -> tuple[Tensor, dict]:
    """EPO (§13.1 b; defaults from the README / `general_running_server.sh`: c_H = 1e-3, c_S = 1,
    mode token, band (0, 2) x H_bar, p = 0.05):
        L = L_PPO - c_H (H_hat - c_S beta(progress) L_smooth)
        H_hat    = aggregated entropy of every generated token (all turns)
        L_smooth = mean over tokens of turns s >= smooth_from_turn (default: half the largest turn
                   index in the batch, rounded up) of  p relu(H - band_high H_bar_s) + p relu(band_low H_bar_s - H)
    H is the token's entropy (mode "token") or its turn's mean entropy (mode "seq"), H_bar_s the running
    mean entropy at turn s over past steps (`prepare`, checkpointed with the run).
    The released code's penalty is a constant p on out-of-band items, which carries no gradient (a
    bug, §13.1 f): here it grows with the distance outside the band, so it pulls entropy back in.
    """
    if entropy is None or turn is None:
        raise ValueError("epo needs the current token entropy and the turn index of each token")
    if mode not in ("token", "seq"):
        raise ValueError(f"epo mode must be 'token' or 'seq', got {mode!r}")
    log_ratio, ratio = _ratio(logp, old_logp)
    pg, metrics = clipped_surrogate(ratio, adv, mask, clip_low, clip_high)
    pg = dual_clip(pg, adv, mask, clip_c, metrics)
    loss = agg_loss(pg, mask, agg, norm, weight)
    bonus = agg_loss(entropy, mask, agg, norm)
    h_bar = stats["h_bar"] if stats else turn_mean(entropy.detach(), turn, mask)
    max_turn = stats["max_turn"] if stats else int(turn.max())
    first = smooth_from_turn if smooth_from_turn is not None else math.ceil(max_turn / 2)
    h = entropy if mode == "token" else turn_mean(entropy, turn, mask)
    out_of_band = torch.relu(h - band_high * h_bar) + torch.relu(band_low * h_bar - h)
    smooth_mask = mask * (turn >= max(first, 1))
    l_smooth = agg_loss(penalty * out_of_band, smooth_mask, "token-mean")
    beta = epo_phase_weight(progress) if phase_weighting else 1.0
    loss = loss - entropy_coef * (bonus - smooth_coef * beta * l_smooth)
    metrics.update(ratio_metrics(log_ratio, mask))
    sm = smooth_mask.bool()
    metrics["epo/out_of_band_frac"] = _masked_frac(out_of_band > 0, smooth_mask) if sm.any() else 0.0
    metrics["epo/smooth_loss"] = float(l_smooth.detach())
    metrics["epo/phase_weight"] = beta
    return loss, metrics


