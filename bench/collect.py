"""One collection (a training step's sampling, no learning) of a recipe: seconds, tokens, and what the
sampler reports.

    python bench/collect.py [--config configs/latr_long.yaml] [--set key=value ...]

Builds the recipe's trainer and collects its first step's batch with the recipe's sampler. Prints
JSON: seconds, decoded + prefilled tokens, milliseconds per token, the final trajectories' tokens,
and the step's `sampler/*` metrics. Meant for `bench/ab.py` (the same samples on both sides when a
change leaves sampling alone: compare their `tokens`).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/latr_long.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override, key=value")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from forkrl.config import load_config
    from forkrl.train import Trainer

    cfg = load_config(args.config, ["log.progress=false", "log.tensorboard=false", "eval.every=0",
                                    "output_dir=/tmp/forkrl-bench-collect", *args.set])
    trainer = Trainer(cfg)
    start = time.perf_counter()
    batch = trainer.loop.source.next_batch(1)
    seconds = time.perf_counter() - start
    m = batch.metrics
    tokens = m.get("sampler/decoded_tokens", 0.0) + m.get("sampler/prefilled_tokens", 0.0)
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                      "config": args.config, "seconds": round(seconds, 2), "tokens": tokens,
                      "ms_per_token": round(1000 * seconds / max(tokens, 1), 3),
                      "trajectory_tokens": sum(len(t.tokens) for t in batch.trajectories),
                      "sampler": {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("sampler/")}}, indent=1))


if __name__ == "__main__":
    main()
