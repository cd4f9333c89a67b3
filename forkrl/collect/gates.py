"""Group gates: what a step keeps of its scored groups, in the order a recipe lists them (`rollout.gates`).

    gate(groups, refill, ctx, **params) -> (kept groups, metrics)

`groups` are lists of scored trajectories (one list per prompt); `refill.fresh()` returns new groups
that have passed the gates listed before this one, `refill.resample(samples, n, ...)` more samples of
given prompts; `ctx` is the step's `CollectContext`. A gate that needs more samples per fresh prompt
says so in its decorator (`samples_per_prompt=`), and one that cannot run with some setting says so
with `check=` (called at config time with the whole config and the gate's parameters).

Combinations compose: with `[dars, dynamic_sampling]` DARS first boosts hard prompts and drops the
unlearnable ones, then dynamic sampling refills with fresh groups that DARS treats too. A gate's
metrics are summed over the rounds of a step, so gates report counts. One that cannot go with another
refuses in its `check` (entropy_target must be last: it rewrites the final batch).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from forkrl.algos import ADVANTAGES, SELECTORS
from forkrl.algos.selection import resample_on_correct as roc_select
from forkrl.registry import register_gate
from forkrl.rollout.agent import roc_penalty
from forkrl.rollout.dars import dars_extra

log = logging.getLogger("forkrl")


def _metric_check(cfg, *, metric: str = "correct", **_) -> str | None:
    return None if metric in ("correct", "reward") else f"metric must be 'correct' or 'reward', got {metric!r}"


def _dars_check(cfg, *, schedule: str = "et", metric: str = "correct", n_max: int = 32, **_) -> str | None:
    if schedule not in ("et", "hw"):
        return f"schedule must be 'et' (equal treatment) or 'hw' (hardness-weighted), got {schedule!r}"
    if n_max < 1:
        return f"n_max must be at least 1, got {n_max}"
    return _metric_check(cfg, metric=metric)


def _roc_check(cfg, *, oversample: int = 2, min_each: int = 2, **_) -> str | None:
    if oversample < 1 or min_each < 0:
        return f"oversample must be >= 1 and min_each >= 0, got {oversample}, {min_each}"
    return None


def _value(metric: str):
    return (lambda t: float(t.correct >= 1)) if metric == "correct" else (lambda t: t.reward)


@register_gate("dynamic_sampling", check=_metric_check)
def dynamic_sampling(groups, refill, ctx, *, metric: str = "correct", max_gen_batches: int = 10):
    """DAPO dynamic sampling (algorithms.md §1.2): keep only groups whose `metric` (correct | reward)
    varies, refilling with fresh groups until `rollout.prompts_per_step` are kept or
    `max_gen_batches` generation batches were drawn (0 = unlimited; the first batch counts)."""
    value = _value(metric)
    kept: list = []
    batches = 1
    while True:
        flat = [t for g in groups for t in g]
        if flat:
            ids = torch.tensor([i for i, g in enumerate(groups) for _ in g])
            keep = SELECTORS["nonzero_std_groups"](torch.tensor([value(t) for t in flat]), ids)
            varied = {int(i) for i, k in zip(ids.tolist(), keep.tolist()) if k}
            kept += [g for i, g in enumerate(groups) if i in varied][:ctx.prompts_per_step - len(kept)]
        if len(kept) >= ctx.prompts_per_step or (max_gen_batches and batches >= max_gen_batches):
            break
        groups = refill.fresh()
        batches += 1
    if len(kept) < ctx.prompts_per_step:
        log.warning("step %d: dynamic sampling kept %d of %d groups after %d generation batches",
                    ctx.step, len(kept), ctx.prompts_per_step, batches)
    return kept, {"dapo/gen_batches": batches, "dapo/kept_groups": len(kept)}


@register_gate("dars", check=_dars_check)
def dars(groups, refill, ctx, *, schedule: str = "et", n_max: int = 32, std_normalized: bool = False,
         metric: str = "correct"):
    """DARS' second round (algorithms.md §12.1): ΔN more rollouts for each prompt whose first-round
    accuracy (mean of `metric`) is below 0.5, merged into its group (`forkrl.rollout.dars` holds the
    ET/HW schedule; n_max caps the total per prompt, the reference uses 32 ET / 64 HW); groups whose
    merged `metric` does not vary are dropped. The released configs divide by no std
    (`advantage: drgrpo`, `std_normalized: false`)."""
    value = _value(metric)
    extra = [dars_extra(sum(value(t) for t in g) / len(g), len(g), schedule, n_max, std_normalized) for g in groups]
    merged = [list(g) for g in groups]
    added = 0
    for k in sorted(set(extra) - {0}):  # one generation call per distinct count
        idx = [i for i, e in enumerate(extra) if e == k]
        more = refill.resample([groups[i][0].sample for i in idx], n=k, sub=500 + k, tag=f"dars{k}")
        for i, new in zip(idx, more):  # join the first-round group of the same prompt
            for t in new:
                t.group = groups[i][0].group
            merged[i] += new
            added += len(new)
    kept = [g for g in merged if len({value(t) for t in g}) > 1]
    return kept, {"dars/extra_rollouts": float(added), "dars/boosted_prompts": float(sum(e > 0 for e in extra)),
                  "dars/dropped_groups": float(len(merged) - len(kept))}


def _roc_samples(n: int, *, oversample: int = 2, **_) -> int:
    return n * oversample


@register_gate("resample_on_correct", samples_per_prompt=_roc_samples, check=_roc_check)
def resample_on_correct(groups, refill, ctx, *, oversample: int = 2, min_each: int = 2):
    """GRPO-RoC (rStar2-Agent, algorithms.md §13.6): fresh prompts are sampled `oversample` x n times;
    groups whose rewards are all equal are dropped, the others cut to n: failures uniformly, successes
    with the fewest tool errors and format issues (`roc_penalty`), at least `min_each` of each kind."""
    n = ctx.samples_per_prompt
    gen = torch.Generator().manual_seed(ctx.seed(5))
    kept = []
    pool = sum(len(g) for g in groups)
    for g in groups:
        if len({t.reward for t in g}) == 1:
            continue
        idx = roc_select(torch.tensor([t.correct for t in g]), torch.tensor([roc_penalty(t, ctx.answer_tag) for t in g]),
                         n, min_each=min_each, generator=gen)
        kept.append([g[i] for i in idx.tolist()])
    flat = [t for g in kept for t in g]
    return kept, {"roc/kept_groups": float(len(flat) // max(n, 1)), "roc/pool": float(pool),
                  "roc/kept_accuracy": float(sum(t.correct for t in flat) / len(flat)) if flat else 0.0}


def _entropy_target_check(cfg, **_) -> str | None:
    names = [g["name"] for g in cfg.rollout.gates]
    if names[-1] != "entropy_target":
        return (f"entropy_target must come last (it replaces rows of the step's final batch), "
                f"but {names[-1]!r} follows it")
    if cfg.train.old_logprobs == "sampling":
        return ("train.old_logprobs='sampling' cannot be used with the entropy_target gate (it samples at other "
                "temperatures, so the sampling log-probs are not the policy's at the training temperature); use 'recompute'")
    return None


@register_gate("entropy_target", check=_entropy_target_check)
def entropy_target(groups, refill, ctx, *, target: float = 0.5, t_high: float = 1.2, t_low: float = 0.8,
                   prompt_frac: float = 0.25, max_samples: int = 60, adv_threshold: float = 0.05):
    """Arbitrary-Entropy PO (algorithms.md §13.3 b): hold the policy entropy at `target` (H*). When the
    last update's entropy is at or below it, resample `prompt_frac` of the step's prompts hotter
    (`t_high`), else colder (`t_low`); keep the samples whose GRPO advantage exceeds `adv_threshold`,
    with advantage 1, up to `max_samples` (halved when cooling). They take the place of as many of the
    step's first rows, which keep shaping their groups' statistics but do not train."""
    entropy = ctx.feedback.policy_entropy
    flat = [t for g in groups for t in g]
    if entropy is None or not flat:
        return groups, {}  # no update has reported the policy entropy yet
    below = entropy <= target
    temperature = t_high if below else t_low
    samples = list({t.group: t.sample for t in flat}.values())
    k = max(1, math.ceil(prompt_frac * len(samples)))
    extra_groups = refill.resample(samples[:k], sub=997, tag="reg", temperature=temperature, observe=False)
    extra = [t for g in extra_groups for t in g]
    ids = torch.tensor([i for i, g in enumerate(extra_groups) for _ in g])
    adv, _ = ADVANTAGES["grpo"](torch.tensor([t.reward for t in extra]), ids, torch.ones(len(extra), 1))
    kept = [t for t, a in zip(extra, adv[:, 0].tolist()) if a > adv_threshold]
    n_reg = min(max_samples, len(kept), len(flat))
    if not below:
        n_reg //= 2
    for t in kept[:n_reg]:
        t.advantage = 1.0
    # the first n_reg rows of the batch become statistics-only
    out, left = [], n_reg
    for g in groups:
        out.append([dataclasses.replace(t, source="stats_only") if i < left else t for i, t in enumerate(g)])
        left = max(0, left - len(g))
    chosen = {id(t) for t in kept[:n_reg]}
    out += [[t for t in g if id(t) in chosen] for g in extra_groups]
    out = [g for g in out if g]
    return out, {"entropy_target/temperature": temperature, "entropy_target/rows": float(n_reg),
                 "entropy_target/kept": float(len(kept))}
