"""Tree samplers vs independent sampling at equal final trajectories per prompt, by training steps
on the embedded model: what sampling and learning spend per trajectory.

    python bench/tree.py [--task short|long] [--steps 2] [--only latr|arpo|branchgrpo|branchgrpo_turns|branchgrpo_pruned]
                         [--threads 2]

Each comparison trains the recipe for `--steps` steps twice from the same weights, prompts and seed:
once with `rollout.sampler: independent`, once with the recipe's tree sampler. Both trainers live in
one process and take their steps in turn, so drift in the machine's speed moves both sides alike.
  short: configs/latr.yaml and configs/branchgrpo.yaml (one-digit sums, 24 new tokens); configs/arpo.yaml
         (three-digit sums with a Python tool, up to 2 calls)
  long:  configs/latr_long.yaml and configs/branchgrpo_long.yaml (ten-term sums worked step by step,
         ~150 tokens); configs/arpo_long.yaml and configs/branchgrpo_tools_long.yaml (`branchgrpo_turns`:
         the same, checked with the Python tool every third step, up to 3 calls); `branchgrpo_pruned`:
         configs/branchgrpo_long.yaml with BranchGRPO's width pruning (mode 2: the batch's best and
         worst half of the leaves train; the learner does not run the others)
Per method: trajectories, branch points, decoded / prefilled / cache-served tokens, tool-result
tokens and calls, the learner's forward tokens and the shared-prefix tokens it did not run again,
the mean rows per decode step, LATR's discarded chain tokens (pruned chains, tokens past the end of a
tree phase), BranchGRPO's fresh samples (for leaves of paths that ended before a split depth), ARPO's
branches and fill-ins (those sampled in reserve, and the reserves dropped), and seconds of sampling
and of learning. Prints JSON with each tree
sampler's ratios to independent sampling: tokens per trajectory (decoded + prefilled) and seconds per
trajectory (sampling + learning, and sampling alone).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

RECIPES = {"short": {"latr": "configs/latr.yaml", "arpo": "configs/arpo.yaml", "branchgrpo": "configs/branchgrpo.yaml"},
           "long": {"latr": "configs/latr_long.yaml", "arpo": "configs/arpo_long.yaml",
                    "branchgrpo": "configs/branchgrpo_long.yaml", "branchgrpo_turns": "configs/branchgrpo_tools_long.yaml",
                    # BranchGRPO's width pruning, mode 2 (§23 b step 5): half the leaves train, the rest are not run
                    "branchgrpo_pruned": ("configs/branchgrpo_long.yaml", [
                        "algo.token_selector=branch_pruning", "algo.token_selector_params={width_pruning_mode: 2}"])}}
SUMS = ("sampler/trajectories", "sampler/branch_points", "sampler/decoded_tokens", "sampler/prefilled_tokens",
        "sampler/cached_tokens", "sampler/env_tokens", "sampler/tool_calls", "sampler/attended_keys",
        "sampler/shared_keys", "learner/forward_tokens",
        "learner/shared_prefix_tokens", "time/sampling_s", "time/learning_s", "time/weight_sync_s",
        "sampler/latr/discarded_tokens", "sampler/branchgrpo/filled", "sampler/arpo/branches",
        "sampler/arpo/fill_ins", "sampler/arpo/fill_ins_ahead", "sampler/arpo/fill_ins_dropped")


class Side:
    """One side of a comparison: a recipe's trainer, with its own sampler (and the entry's `extra`
    overrides) or with independent sampling, and what its steps spent."""

    def __init__(self, config: str, sampler: str | None, args, extra: list[str] = ()):
        from forkrl.config import load_config
        from forkrl.train import Trainer

        swap = ["rollout.sampler=independent", "rollout.sampler_params={}"] if sampler is None else list(extra)
        cfg = load_config(config, ["log.progress=false", "log.tensorboard=false", "eval.every=0",
                                   f"output_dir=/tmp/forkrl-bench-tree-{sampler or 'independent'}",
                                   f"train.steps={args.steps}", *swap,
                                   *([f"model.name={args.model}"] if args.model else []), *args.set])
        self.trainer = Trainer(cfg)
        stats = self.trainer.engine.stats
        self.rows0, self.steps0 = stats.decode_tokens, stats.steps
        self.total = dict.fromkeys(SUMS, 0.0)
        self.rewards: list[float] = []

    def step(self) -> None:
        m = self.trainer.step()
        for k in SUMS:
            self.total[k] += m.get(k, 0.0)
        self.rewards.append(m.get("reward/mean", float("nan")))

    def summary(self) -> dict:
        total, stats = self.total, self.trainer.engine.stats
        n = max(total["sampler/trajectories"], 1)
        out = {k.split("/", 1)[1]: round(v, 2) for k, v in total.items()}
        out.update({
            "reward_mean_per_step": [round(r, 3) for r in self.rewards],
            "mean_batch_rows": round((stats.decode_tokens - self.rows0) / max(stats.steps - self.steps0, 1), 1),
            "tokens_per_trajectory": round((total["sampler/decoded_tokens"] + total["sampler/prefilled_tokens"]) / n, 2),
            "learner_tokens_per_trajectory": round(total["learner/forward_tokens"] / n, 2),
            "sampling_seconds_per_trajectory": round(total["time/sampling_s"] / n, 4),
            "seconds_per_trajectory": round((total["time/sampling_s"] + total["time/learning_s"]) / n, 4),
        })
        return out


def compare(entry: str | tuple[str, list[str]], sampler: str, args) -> dict:
    """Both sides in one process, their steps alternating (independent first at even steps, the tree
    sampler first at odd ones), so a machine that slows or speeds up during the run moves both alike."""
    config, extra = (entry, []) if isinstance(entry, str) else entry
    base, tree = Side(config, None, args), Side(config, sampler, args, extra)
    for step in range(args.steps):
        for side in (base, tree) if step % 2 == 0 else (tree, base):
            side.step()
    base, tree = base.summary(), tree.summary()
    ratio = {k: round(tree[k] / base[k], 3) for k in ("tokens_per_trajectory", "learner_tokens_per_trajectory",
                                                      "seconds_per_trajectory", "sampling_seconds_per_trajectory")}
    return {"config": config, **({"overrides": extra} if extra else {}), "independent": base, sampler: tree,
            "ratio": ratio}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=sorted(RECIPES), default="short")
    ap.add_argument("--steps", type=int, default=2, help="training steps per method")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=sorted({k for recipes in RECIPES.values() for k in recipes}), default=None)
    ap.add_argument("--set", action="append", default=[], help="config override for every run, key=value")
    ap.add_argument("--model", default=None, help="another policy (a run's final/ folder) instead of the recipe's")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "model": args.model or "recipe's (embedded)", "task": args.task,
              "steps": args.steps}
    for sampler, config in RECIPES[args.task].items():
        if args.only in (None, sampler):
            result[sampler] = compare(config, sampler, args)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
