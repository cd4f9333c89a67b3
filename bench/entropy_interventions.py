"""Policy entropy under GRPO and the entropy interventions, on the embedded model, in one run.

    python bench/entropy_interventions.py [--steps 10] [--prompts 4] [--samples 8] [--lr 4e-5]

Every method gets the quickstart task, the same seed (so the same prompts in the same order), the
same step budget, learning rate and 4 optimizer steps per rollout batch (as the papers' recipes
use several mini-batches, so the ratio moves away from 1). Only the loss or token selection differs. Dynamic sampling is
off for all of them, so the budgets stay equal. Each method's reference defaults are used:
  grpo            ppo_clip 0.2/0.2, token-mean
  clip_cov        algorithms.md §4: r = 2e-4, Cov in (1, 5), base clip 1/1
  kl_cov          algorithms.md §4: k = 2e-3, beta = 1, no ratio clip
  forking_tokens  algorithms.md §5: top 20% tokens by entropy, clip 0.2/0.28
Prints JSON: per method, the policy entropy at every step and its mean, training accuracy, and
held-out greedy accuracy after training.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

METHODS = {
    "grpo": ["algo.loss=ppo_clip", "algo.loss_params={clip_low: 0.2, clip_high: 0.2}"],
    "clip_cov": ["algo.loss=clip_cov", "algo.loss_params={}"],
    "kl_cov": ["algo.loss=kl_cov", "algo.loss_params={}"],
    "forking_tokens": ["algo.loss=ppo_clip", "algo.loss_params={clip_low: 0.2, clip_high: 0.28}",
                       "algo.token_selector=forking_tokens"],
}
# not in the default set: the covariance methods with their token share scaled to this batch (about
# 300 tokens, where 2e-4 of them rounds to the minimum of 1 token), and the other entropy-aware losses
EXTRA = {
    "clip_cov_2e-2": ["algo.loss=clip_cov", "algo.loss_params={clip_ratio: 0.02}"],
    "kl_cov_2e-2": ["algo.loss=kl_cov", "algo.loss_params={kl_ratio: 0.02}"],
    "hapo": ["algo.advantage=hapo", "algo.loss=hapo", "algo.loss_params={}", "rollout.adaptive_temperature.enabled=true"],
    "steer": ["algo.loss=steer", "algo.loss_params={}"],
    "bapo": ["algo.loss=bapo", "algo.loss_params={}"],
    "aepo": ["algo.advantage=aepo", "algo.loss=aepo", "algo.loss_params={}"],
    "epo": ["algo.loss=epo", "algo.loss_params={}"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-5)
    ap.add_argument("--mini-batches", type=int, default=4,
                    help="optimizer steps per rollout batch; with 1 the policy ratio is exactly 1, and KL-Cov's "
                         "|log r| penalty has zero gradient: KL-Cov is then GRPO")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"any of {', '.join([*METHODS, *EXTRA])}")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from forkrl.config import load_config
    from forkrl.train import Trainer

    results = {}
    for name in args.methods.split(","):
        out = tempfile.mkdtemp(prefix=f"forkrl-{name}-")
        cfg = load_config("configs/quickstart.yaml", [
            f"output_dir={out}", f"train.steps={args.steps}", f"train.lr={args.lr}",
            f"train.mini_batches={args.mini_batches}",
            f"rollout.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
            "eval.at_start=false", "log.progress=false", "log.tensorboard=false", *{**METHODS, **EXTRA}[name]])
        start = time.perf_counter()
        trainer = Trainer(cfg)
        summary = trainer.train()
        entropy = [m["policy/entropy"] for m in trainer.history]
        results[name] = {
            "policy_entropy_per_step": [round(e, 4) for e in entropy],
            "mean_policy_entropy": round(statistics.mean(entropy), 4),
            "final_policy_entropy": round(entropy[-1], 4),
            "train_accuracy_per_step": [round(m["accuracy"], 3) for m in trainer.history],
            "held_out_accuracy_after": summary["after"]["eval/accuracy"],
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps({"bench": "entropy_interventions", "model": "smollm2-135m", "task": "chain_sum (quickstart)",
                      "steps": args.steps, "mini_batches": args.mini_batches, "completions_per_step": args.prompts * args.samples, "lr": args.lr,
                      "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "results": results},
                     indent=1))


if __name__ == "__main__":
    main()
