"""One learner update of a recipe on its first collected batch: seconds and tokens.

    python bench/learn.py [--config configs/latr_long.yaml] [--rounds 2] [--set key=value ...]

Builds the recipe's trainer, collects its first step's batch with the recipe's sampler (or another:
`--set rollout.sampler=independent --set rollout.sampler_params={}`), then runs the learner's update
on it `--rounds` times, each from the same weights and optimizer state. Prints JSON: seconds per
update (each and the median), the learner's forward tokens, and the first update's entropy, loss
and gradient norm (equal on both sides of `bench/ab.py` when a change leaves the arithmetic alone,
up to rounding). Meant for `bench/ab.py`.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/latr_long.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="config override, key=value")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from forkrl.config import load_config
    from forkrl.train import Trainer

    cfg = load_config(args.config, ["log.progress=false", "log.tensorboard=false", "eval.every=0",
                                    "output_dir=/tmp/forkrl-bench-learn", *args.set])
    trainer = Trainer(cfg)
    batch = trainer.loop.source.next_batch(1)
    learner = trainer.learner
    start = (copy.deepcopy(learner.model.state_dict()), copy.deepcopy(learner.optimizer.state_dict()),
             copy.deepcopy(learner.scheduler.state_dict()))
    seconds, first = [], None
    for _ in range(args.rounds):
        learner.model.load_state_dict(start[0])
        learner.optimizer.load_state_dict(start[1])
        learner.scheduler.load_state_dict(start[2])
        t0 = time.perf_counter()
        metrics, _ = learner.learn(batch, 1)
        seconds.append(round(time.perf_counter() - t0, 2))
        first = first or {k: metrics[k] for k in ("policy/entropy", "loss", "grad_norm", "learner/forward_tokens")}
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                      "config": args.config, "trajectories": len(batch.trajectories), "seconds": seconds,
                      "median_seconds": statistics.median(seconds), "first_update": first}, indent=1))


if __name__ == "__main__":
    main()
