"""Metric names other dashboards know: `log.metric_names: verl | trl` renames what TensorBoard and
wandb receive (metrics.jsonl, the report and `forkrl compare` keep forkrl's names). A metric with no
counterpart keeps its forkrl name, so nothing is dropped.

    forkrl                     verl                          TRL (GRPOTrainer)
    reward/mean, /std          critic/score/mean, /std       reward, reward_std
    reward/<fn>                critic/score/<fn>             rewards/<fn>/mean
    response_length/mean, max  response_length/mean, /max    completions/mean_length, /max_length
    response/clip_frac         response_length/clip_ratio    completions/clipped_ratio
    policy/entropy             actor/entropy                 entropy
    clip/low_frac + high_frac  actor/pg_clipfrac             clip_ratio/region_mean (and /low_mean, /high_mean)
    clip/dual_frac             actor/pg_clipfrac_lower       -
    ppo_kl, kl                 actor/ppo_kl, actor/kl_loss   -, kl
    grad_norm, lr              actor/grad_norm, actor/lr     grad_norm, learning_rate
    adv/mean                   critic/advantages/mean        -
    adv/zero_std_groups_frac   -                             frac_reward_zero_std
    time/sampling_s, _learning_s, _step_s, _scoring_s   timing_s/gen, /update_actor, /step, /reward
    eval/<metric>              val-core/<task>/<metric>      eval_<metric>
"""
from __future__ import annotations

SCHEMES = ("forkrl", "verl", "trl")

_RENAMES = {
    "verl": {
        "reward/mean": "critic/score/mean", "reward/std": "critic/score/std",
        "response/clip_frac": "response_length/clip_ratio", "policy/entropy": "actor/entropy",
        "clip/dual_frac": "actor/pg_clipfrac_lower", "ppo_kl": "actor/ppo_kl", "kl": "actor/kl_loss",
        "grad_norm": "actor/grad_norm", "lr": "actor/lr", "adv/mean": "critic/advantages/mean",
        "time/sampling_s": "timing_s/gen", "time/learning_s": "timing_s/update_actor", "time/step_s": "timing_s/step",
        "time/scoring_s": "timing_s/reward",
    },
    "trl": {
        "reward/mean": "reward", "reward/std": "reward_std", "response_length/mean": "completions/mean_length",
        "response_length/max": "completions/max_length", "response/clip_frac": "completions/clipped_ratio",
        "policy/entropy": "entropy", "clip/low_frac": "clip_ratio/low_mean", "clip/high_frac": "clip_ratio/high_mean",
        "adv/zero_std_groups_frac": "frac_reward_zero_std", "lr": "learning_rate",
    },
}


def rename(metrics: dict, scheme: str, reward_names: set[str] = frozenset(), task: str = "task") -> dict:
    """`metrics` under `scheme`'s names; `reward_names`: the reward functions (their reward/<fn> keys)."""
    if scheme == "forkrl":
        return dict(metrics)
    table = _RENAMES[scheme]
    out = {}
    for key, value in metrics.items():
        if key in table:
            out[table[key]] = value
        elif key.startswith("reward/") and key[len("reward/"):] in reward_names:
            fn = key[len("reward/"):]
            out[f"critic/score/{fn}" if scheme == "verl" else f"rewards/{fn}/mean"] = value
        elif key.startswith("eval/"):
            out[f"val-core/{task}/{key[5:]}" if scheme == "verl" else f"eval_{key[5:]}"] = value
        else:
            out[key] = value
    if "clip/low_frac" in metrics and "clip/high_frac" in metrics:  # both clip sides together
        out["actor/pg_clipfrac" if scheme == "verl" else "clip_ratio/region_mean"] = (
            metrics["clip/low_frac"] + metrics["clip/high_frac"])
        if scheme == "verl":
            out.pop("clip/low_frac", None), out.pop("clip/high_frac", None)
    return out
