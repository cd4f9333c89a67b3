"""Tree samplers vs independent sampling at equal final trajectories per prompt, on the embedded model.

    python bench/tree.py [--prompts 8] [--n 8] [--rounds 2] [--threads 2]

Two comparisons, each on its recipe's task and settings, each method from a cold prefix cache and
with the same prompts and seed:
  latr vs independent   configs/latr.yaml (one-digit sums, 24 new tokens)
  arpo vs independent   configs/arpo.yaml (three-digit sums with a Python tool, multi-turn)
Budget per method: trajectories, branch points, decoded and prefilled tokens (prompt tokens run
through the model; tokens served by the prefix cache are reported apart), tool calls, wall time.
Prints JSON, including tokens per trajectory and each tree sampler's ratio to independent sampling.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def compare(config: str, sampler: str, args) -> dict:
    from forkrl.config import load_config
    from forkrl.rollout import (
        RolloutBudget,
        SamplerContext,
        SamplingParams,
        build_sampler,
        run_sampler,
    )
    from forkrl.train import Trainer

    cfg = load_config(config, ["log.progress=false", "log.tensorboard=false", f"output_dir=/tmp/forkrl-bench-{sampler}",
                               *([f"model.name={args.model}"] if args.model else []), *args.set])
    trainer = Trainer(cfg)
    r = cfg.rollout
    params = SamplingParams(temperature=r.temperature, max_tokens=r.max_new_tokens, n=args.n, stop=list(r.stop))
    methods = {"independent": build_sampler("independent"), sampler: build_sampler(sampler, r.sampler_params)}
    totals = {name: RolloutBudget() for name in methods}
    distinct = {name: 0 for name in methods}
    lengths = {name: 0 for name in methods}   # tokens of the final trajectories
    shared = {name: 0 for name in methods}    # of those, tokens shared with the parent (not decoded again)
    for rnd in range(args.rounds):
        samples = trainer.task.train[rnd * args.prompts:(rnd + 1) * args.prompts]
        prompts = [trainer.task.prompt_ids(s, trainer.tokenizer) for s in samples]
        for name, s in methods.items():
            trainer.engine.weights_updated()  # cold prefix cache for every method
            ctx = SamplerContext(env=trainer.env, tokenizer=trainer.tokenizer, step=1)
            groups, b = run_sampler(s, trainer.engine, prompts, params, seed=rnd, ctx=ctx)
            t = totals[name]
            for f in ("trajectories", "branch_points", "decoded_tokens", "prefilled_tokens", "cached_tokens",
                      "tool_calls"):
                setattr(t, f, getattr(t, f) + getattr(b, f))
            t.seconds += b.seconds
            distinct[name] += sum(len({tuple(x.tokens) for x in g}) for g in groups)
            lengths[name] += sum(len(x.tokens) for g in groups for x in g)
            shared[name] += sum(x.branch_at or 0 for g in groups for x in g if x.parent is not None)
    out = {}
    for name, t in totals.items():
        out[name] = {"trajectories": t.trajectories, "distinct_trajectories": distinct[name],
                     "branch_points": t.branch_points, "decoded_tokens": t.decoded_tokens,
                     "prefilled_tokens": t.prefilled_tokens, "cache_served_tokens": t.cached_tokens,
                     "tool_calls": t.tool_calls, "seconds": round(t.seconds, 2),
                     "mean_trajectory_tokens": round(lengths[name] / max(t.trajectories, 1), 2),
                     "shared_prefix_tokens": shared[name],
                     "tokens_per_trajectory": round((t.decoded_tokens + t.prefilled_tokens) / max(t.trajectories, 1), 2),
                     "seconds_per_trajectory": round(t.seconds / max(t.trajectories, 1), 4)}
    base, tree = out["independent"], out[sampler]
    out["ratio_tokens_per_trajectory"] = round(tree["tokens_per_trajectory"] / base["tokens_per_trajectory"], 3)
    out["ratio_seconds_per_trajectory"] = round(tree["seconds_per_trajectory"] / base["seconds_per_trajectory"], 3)
    del trainer
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="final trajectories per prompt, for every method")
    ap.add_argument("--rounds", type=int, default=2, help="batches of --prompts distinct prompts")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["latr", "arpo"], default=None)
    ap.add_argument("--set", action="append", default=[], help="config override for both recipes, key=value")
    ap.add_argument("--model", default=None, help="another policy (a run's final/ folder) instead of the recipe's")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "model": args.model or "recipe's (embedded)", "prompts_per_round": args.prompts, "n": args.n, "rounds": args.rounds}
    if args.only in (None, "latr"):
        result["latr"] = compare("configs/latr.yaml", "latr", args)
    if args.only in (None, "arpo"):
        result["arpo"] = compare("configs/arpo.yaml", "arpo", args)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
