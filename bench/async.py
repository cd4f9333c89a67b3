"""Synchronous vs one-step-stale decoupled training on Ray, with slow generation simulated, in one run.

    python bench/async.py [--model tiny-random] [--steps 8] [--workers 2] [--delay 0.002]

Both runs use the same recipe: `--workers` rollout workers and one learner as Ray actors on a local
cluster. Each worker sleeps `--delay` seconds per decoded token after sampling (a stand-in for a slow
or remote generator: the sleep costs no CPU, so it measures scheduling, not contention for this
machine's cores).
  sync     distributed.max_staleness=0: the learner waits for every batch, the workers for every update
  stale-1  distributed.max_staleness=1: workers sample batch k+1 while the learner trains on batch k
The first step of each run (actor start-up, first weights) is left out. Prints JSON: trained
trajectories per second, the learner's idle share (time waiting for rollouts / step time), seconds
per step, the largest policy lag trained, and the speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _prompts(path: Path, n: int = 200) -> str:
    path.write_text("".join(json.dumps({"prompt": f"Say something about the number {i}.", "answer": str(i)}) + "\n"
                            for i in range(n)))
    return str(path)


def run(model: str, staleness: int, args, tmp: Path) -> dict:
    from forkrl.config import build_config
    from forkrl.distributed.decoupled import DecoupledRun
    cfg = build_config({
        "output_dir": str(tmp / f"s{staleness}"), "seed": 0, "model": {"name": model},
        "task": {"source": "file", "train_path": _prompts(tmp / "prompts.jsonl"), "eval_size": 4,
                 "rewards": [{"function": "tests.rewards:low_token_ids"}]},
        "rollout": {"prompts_per_step": args.groups, "samples_per_prompt": args.n, "max_new_tokens": args.max_new_tokens},
        "train": {"steps": args.steps + 1, "lr": 1e-3},
        "algo": {"rollout_correction": {"mode": "token_tis" if staleness else "none"}},
        "eval": {"at_start": False, "size": 1, "max_new_tokens": 4},
        "log": {"progress": False, "tensorboard": False},
        "distributed": {"workers": args.workers, "max_staleness": staleness, "simulated_token_delay_s": args.delay},
    })
    dr = DecoupledRun(cfg)
    try:
        history = dr.train()["history"][1:]  # without the first step
    finally:
        dr.shutdown()
    wall = sum(m["time/step_s"] for m in history)
    waited = sum(m["async/wait_s"] for m in history)
    trained = sum(m["train/sequences"] for m in history)
    return {"max_staleness": staleness, "steps": len(history), "trajectories": int(trained),
            "seconds": round(wall, 2), "trajectories_per_s": round(trained / wall, 2),
            "seconds_per_step": round(wall / len(history), 3),
            "learner_idle_share": round(waited / wall, 3),
            "learner_update_s": round(sum(m["time/learning_s"] for m in history) / len(history), 3),
            "max_lag_trained": max(m["staleness/max"] for m in history)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--delay", type=float, default=0.002, help="simulated seconds per decoded token, per worker")
    args = ap.parse_args()
    import ray
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # tests.rewards in the actors
    ray.init(num_cpus=max(os.cpu_count() or 1, args.workers + 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    with tempfile.TemporaryDirectory() as tmp:
        sync = run(args.model, 0, args, Path(tmp))
        stale = run(args.model, 1, args, Path(tmp))
    ray.shutdown()
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "model": args.model,
        "workers": args.workers, "groups_x_samples": f"{args.groups}x{args.n}", "max_new_tokens": args.max_new_tokens,
        "delay_s_per_token": args.delay, "sync": sync, "stale_1": stale,
        "speedup_trajectories_per_s": round(stale["trajectories_per_s"] / sync["trajectories_per_s"], 2)}, indent=1))


if __name__ == "__main__":
    main()
