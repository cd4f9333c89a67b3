"""APRIL vs synchronous sampling on long-tailed responses, on the embedded model, in one run.

    python bench/april.py [--steps 4] [--groups 4] [--n 8] [--max-new-tokens 160] [--threads 2]

The task and prompt of configs/april.yaml (the tutor prompt makes response lengths long-tailed).
Both samplers get the same stream of prompts and must deliver --groups complete groups of --n per
step, for --steps steps (the weights do not change between steps: this measures sampling only).
  sync   samples the step's groups to the end: the step lasts as long as its longest response
  april  keeps 2x the groups in flight, returns once --groups are complete, resumes the rest later
Prints JSON: completed trajectories delivered, seconds, trajectories per second, tokens decoded,
the response-length distribution, and APRIL's speed-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--over-sampling", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from forkrl.collect import LocalPositions
    from forkrl.config import load_config
    from forkrl.rollout import (
        SamplerContext,
        SamplingParams,
        build_sampler,
        run_sampler,
    )
    from forkrl.train import Trainer

    cfg = load_config("configs/april.yaml", ["log.progress=false", "log.tensorboard=false",
                                             "output_dir=/tmp/forkrl-bench-april", "rollout.prefix_cache_mb=0"])
    trainer = Trainer(cfg)
    params = SamplingParams(temperature=cfg.rollout.temperature, max_tokens=args.max_new_tokens, n=args.n)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "steps": args.steps, "groups": args.groups, "n": args.n,
              "max_new_tokens": args.max_new_tokens}
    for name in ("sync", "april"):
        sampler = build_sampler("independent") if name == "sync" else build_sampler("april", {"over_sampling": args.over_sampling})
        positions = LocalPositions()  # the same prompt stream for both
        delivered, lengths, decoded, seconds = 0, [], 0, 0.0
        for step in range(1, args.steps + 1):
            wanted = sampler.prompts_wanted(args.groups) if name == "april" else args.groups
            samples = [trainer.source.sample_at(p) for p in positions.take(wanted)]
            prompts = [trainer.task.prompt_ids(s, trainer.tokenizer) for s in samples]
            ctx = SamplerContext(tokenizer=trainer.tokenizer, version=step, step=step, samples=samples, groups=args.groups)
            start = time.perf_counter()
            groups, budget = run_sampler(sampler, trainer.engine, prompts, params, seed=step, ctx=ctx)
            seconds += time.perf_counter() - start
            delivered += sum(len(g) for g in groups)
            lengths += [len(t.tokens) for g in groups for t in g]
            decoded += budget.decoded_tokens
        result[name] = {"trajectories": delivered, "seconds": round(seconds, 2),
                        "trajectories_per_s": round(delivered / seconds, 3), "decoded_tokens": decoded,
                        "length_median": statistics.median(lengths), "length_p90": sorted(lengths)[int(0.9 * len(lengths))],
                        "length_max": max(lengths)}
    result["april_speedup"] = round(result["april"]["trajectories_per_s"] / result["sync"]["trajectories_per_s"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
