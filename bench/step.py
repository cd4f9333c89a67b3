"""One quickstart RL step on the embedded model: seconds for sampling, scoring and learning, and peak RSS.

    python bench/step.py [--prompts 4] [--samples 8] [--new-tokens 128] [--steps 2]

Defaults: 32 completions (4 prompts x 8) of up to 128 new tokens, float32, the quickstart task and
algorithm; end-of-sequence is honoured, so completions may be shorter. Prints JSON (per-step timings
after a warm-up step, and the process's peak RSS).
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
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from forkrl.config import load_config
    from forkrl.train import Trainer
    from forkrl.train.trainer import peak_rss_gb

    cfg = load_config(args.config, [
        f"rollout.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
        f"rollout.max_new_tokens={args.new_tokens}", "output_dir=runs/bench_step", "log.progress=false",
        "task.system_prompt=null"])  # no brevity instruction: longer completions
    trainer = Trainer(cfg)
    rows = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        trajs = trainer.rollout(trainer.next_prompts(args.prompts), seed=i, tag=f"b{i}")
        t1 = time.perf_counter()
        trainer.score(trajs)
        t2 = time.perf_counter()
        trainer.learner.update(trajs, step=i + 1)
        t3 = time.perf_counter()
        rows.append({"sampling_s": t1 - t0, "scoring_s": t2 - t1, "learning_s": t3 - t2,
                     "completions": len(trajs), "new_tokens": sum(t.num_generated for t in trajs)})
    measured = rows[1:]
    med = {k: round(statistics.median(r[k] for r in measured), 2) for k in ("sampling_s", "scoring_s", "learning_s")}
    print(json.dumps({
        "bench": "step", "model": cfg.model.name, "dtype": cfg.model.dtype, "task": cfg.task.dataset,
        "completions": args.prompts * args.samples, "max_new_tokens": args.new_tokens,
        "mean_new_tokens": round(statistics.mean(r["new_tokens"] / r["completions"] for r in measured), 1),
        **med, "step_s": round(sum(med.values()), 2), "peak_rss_gb": round(peak_rss_gb(), 2),
        "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
        "steps": measured,
    }, indent=1))


if __name__ == "__main__":
    main()
