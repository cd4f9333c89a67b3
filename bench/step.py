"""One RL step, forkrl vs TRL's GRPOTrainer, on the embedded model, same task and settings, in one run.

    bash bench/setup_trl.sh                       # once: TRL in its own environment, .venv-trl
    python bench/step.py [--steps 3] [--precision fp32 bf16] [--trl-python .venv-trl/bin/python]

Settings shared by both sides: SmolLM2-135M-Instruct with float32 master weights, the quickstart task
(one-digit chain_sum, its system prompt), 4 prompts x 8 samples = 32 completions of exactly 128 new
tokens (end-of-sequence disabled on both sides, so both do the same work), temperature 1, GRPO
advantages (group mean and std), token-mean aggregation (TRL's `loss_type="dapo"`), clip 0.2, no
KL term, one optimizer step per batch, AdamW at lr 1e-5.

precision fp32: everything in float32 on both sides.
precision bf16: bf16 where each framework offers it: forkrl samples with bf16 weights
  (`rollout.engine_dtype=bfloat16`) and trains under bf16 autocast (`train.bf16_autocast=true`);
  TRL runs with `bf16=True` (autocast for its forward passes).

Each side runs in its own process (TRL only in its own virtual environment; forkrl does not depend
on it): a warm-up step, then `--steps` timed steps; it reports the median seconds per step and the
process's peak RSS. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS, SAMPLES, NEW_TOKENS, LR = 4, 8, 128, 1e-5


def peak_rss_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def quickstart_task():
    from forkrl.config import load_config
    from forkrl.tasks import build_task
    cfg = load_config(str(ROOT / "configs/quickstart.yaml"), [])
    return build_task(cfg.task, seed=0)


def run_forkrl(steps: int, precision: str, overrides: list[str] = ()) -> dict:
    import torch

    from forkrl.config import load_config
    from forkrl.train import Trainer

    bf16 = precision == "bf16"
    cfg = load_config(str(ROOT / "configs/quickstart.yaml"), [
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}",
        f"rollout.max_new_tokens={NEW_TOKENS}", f"train.lr={LR}", f"train.steps={steps + 1}",
        f"rollout.engine_dtype={'bfloat16' if bf16 else 'float32'}", f"train.bf16_autocast={str(bf16).lower()}",
        "output_dir=runs/bench_step", "log.progress=false", "log.entropy_probe_tokens=0", *overrides])
    trainer = Trainer(cfg)
    trainer.engine.eos_ids = [-1]  # exactly NEW_TOKENS per completion, as on the TRL side
    times, parts = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        m = trainer.step()
        times.append(time.perf_counter() - start)
        parts.append({k: round(m[k], 2) for k in ("time/sampling_s", "time/learning_s", "time/weight_sync_s")})
    return {"side": "forkrl", "precision": precision, "step_s": round(statistics.median(times[1:]), 2),
            "steps_s": [round(t, 2) for t in times], "parts": parts, "peak_rss_gb": round(peak_rss_gb(), 2),
            "threads": torch.get_num_threads()}


def run_trl(steps: int, precision: str) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from forkrl.models import load_policy

    task = quickstart_task()
    by_id = {s.id: s for s in task.train}
    data = Dataset.from_list([{"prompt": task.messages(s), "sample_id": s.id} for s in task.train])

    def correct(prompts, completions, sample_id, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(task.verifier(by_id[i], t)) for i, t in zip(sample_id, texts)]

    model, tok = load_policy("smollm2-135m")  # the same float32 weights forkrl trains
    args = GRPOConfig(
        output_dir="runs/bench_step_trl", use_cpu=True, bf16=precision == "bf16", seed=0,
        per_device_train_batch_size=PROMPTS * SAMPLES, gradient_accumulation_steps=1, num_generations=SAMPLES,
        max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
        temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, beta=0.0, num_iterations=1, loss_type="dapo", epsilon=0.2,
        max_steps=steps + 1, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0)

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    trainer = GRPOTrainer(model=model, reward_funcs=[correct], args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Timer()])
    trainer.train()
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"side": "trl", "trl": trl.__version__, "precision": precision,
            "step_s": round(statistics.median(times[1:]), 2), "steps_s": [round(t, 2) for t in times],
            "mean_completion_length": lengths, "peak_rss_gb": round(peak_rss_gb(), 2),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--trl-python", default=str(ROOT / ".venv-trl/bin/python"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra forkrl config overrides")
    ap.add_argument("--side", choices=["forkrl", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        out = run_forkrl(args.steps, args.precision[0], args.set) if args.side == "forkrl" else run_trl(args.steps, args.precision[0])
        print("RESULT " + json.dumps(out), flush=True)
        return
    if not Path(args.trl_python).exists():
        sys.exit(f"no TRL environment at {args.trl_python}: run `bash bench/setup_trl.sh` first")
    result = {"bench": "step", "model": "smollm2-135m", "task": "chain_sum (quickstart)",
              "completions": PROMPTS * SAMPLES, "new_tokens": NEW_TOKENS,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "forkrl_overrides": args.set, "runs": []}
    for precision in args.precision:
        pair = {}
        for side, python in (("forkrl", sys.executable), ("trl", args.trl_python)):
            extra = ["--set", *args.set] if side == "forkrl" and args.set else []
            proc = subprocess.run([python, __file__, "--side", side, "--steps", str(args.steps),
                                   "--precision", precision, *extra], cwd=ROOT, capture_output=True, text=True, check=False)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{side} ({precision}) failed:\n{proc.stderr[-3000:]}")
            pair[side] = json.loads(line[len("RESULT "):])
            print(json.dumps(pair[side]), file=sys.stderr, flush=True)
        result["runs"].append({"precision": precision, **pair,
                               "speedup": round(pair["trl"]["step_s"] / pair["forkrl"]["step_s"], 2),
                               "rss_ratio": round(pair["forkrl"]["peak_rss_gb"] / pair["trl"]["peak_rss_gb"], 2)})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
