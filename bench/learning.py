"""Learning per second across seeds: held-out accuracy after a step budget, per step and per second,
for precision settings, on the quickstart and on TRL's GRPO setup. Prints JSON.

    python bench/learning.py [--setup quickstart trl] [--seeds 3] [--out runs/bench_learning]

Settings (each a recipe variant, trained with seeds 0..S-1):
  bf16-default    rollout.engine_dtype=auto and train.bf16_autocast=auto: bf16 sampling weights and
                  KV cache on CPUs with native bf16 (AVX-512 BF16 / AMX), bf16 autocast in the learner
                  where bf16 products also measured faster than float32 ones (forkrl.cpu)
  bf16-autocast   bf16 sampling and bf16 autocast whatever the measurement says (what `auto` chose on
                  every CPU with native bf16 before it measured)
  float32         rollout.engine_dtype=float32, train.bf16_autocast=false
  bf16-token_tis  the default plus truncated importance weights for the sampler/learner mismatch
                  (algo.rollout_correction.mode=token_tis, cap 2)
  bf16-sampling   bf16 sampling weights and KV cache, the learner in float32 (train.bf16_autocast=false)

Setups:
  quickstart  configs/quickstart.yaml as it is (20 steps); evaluation: 100 held-out prompts, greedy and
              8 samples at T = 1 each (800 sampled answers)
  trl         TRL's GRPO settings: one-digit chain_sum, the question + " Answer with just the number."
              through the chat template, 8 prompts x 8 samples, lr 1e-5 constant, <= 48 new tokens,
              token-mean, clip 0.2, no KL, 15 steps, 120 training prompts; 64 held-out prompts, greedy
              and 4 samples at T = 1

It is `forkrl compare` underneath (one mechanism): the runs, their tables and curves are in
OUT/<setup>/ and `forkrl compare A.yaml B.yaml --seeds 3` runs the same comparison for any two recipes.
The evaluation's own noise (the binomial standard error of the sampled accuracy) is printed next to the
seeds' spread, so a reader sees whether the evaluation or the seeds dominate.

Each run evaluates itself with its own engine, so a bf16 run's accuracy is measured by bf16 sampling.
The `judge` entries score every final model, and the base model, with one judge instead: the float32
engine, `--judge-samples` (16) samples per held-out prompt at T = 1 plus greedy, each seed's own
held-out prompts and evaluation seed (`forkrl eval RUN_DIR rollout.engine_dtype=float32 ...`).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = {
    "bf16-default": [],
    "float32": ["rollout.engine_dtype=float32", "train.bf16_autocast=false"],
    # the measurements' suggestion: keep bf16's speed, correct the sampler/learner mismatch it measures
    "bf16-token_tis": ["algo.rollout_correction.mode=token_tis"],
    # which half costs the per-step gap: bf16 sampling with a float32 learner
    "bf16-sampling": ["train.bf16_autocast=false"],
    # the learner in bf16 where the measurement would keep it in float32
    "bf16-autocast": ["rollout.engine_dtype=bfloat16", "train.bf16_autocast=true"],
}
SETUPS = {
    "quickstart": ["eval.samples=8", "eval.temperature=1.0", "log.progress=false"],
    "trl": ["task.system_prompt=", "task.prompt_template={prompt} Answer with just the number.",
            "task.train_size=120", "task.eval_size=64", "rollout.max_new_tokens=48", "train.lr=1e-5",
            "train.steps=15", "eval.samples=4", "eval.temperature=1.0", "log.progress=false"],
}


def recipe_files(setup: str, out: Path, settings: list[str]) -> list[str]:
    """One recipe per setting: the quickstart with the setup's and the setting's overrides, by name."""
    from forkrl.config import dump_config, load_config
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in settings:
        overrides = SETTINGS[name]
        cfg = load_config(str(ROOT / "configs/quickstart.yaml"), SETUPS[setup] + overrides + [f"name={setup}-{name}"])
        path = out / f"{setup}-{name}.yaml"
        data = yaml.safe_load(dump_config(cfg))
        data.pop("output_dir", None)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        paths.append(str(path))
    return paths


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4), "std": round(statistics.stdev(values), 4) if len(values) > 1
            else None, "min": round(min(values), 4), "max": round(max(values), 4)}


def read_seed(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    meta = json.loads((run / "compare_run.json").read_text())
    before, after = summary["before"], summary["after"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    mismatch = [r["train/logprob_mismatch"] for r in rows if isinstance(r.get("train/logprob_mismatch"), float)]
    return {"steps": summary["steps"], "wall_s": meta["wall_s"], "before": before, "after": after,
            "mismatch_mean": statistics.mean(mismatch) if mismatch else None,
            "mismatch_max": max(mismatch) if mismatch else None, "n_prompts": after["eval/n_prompts"]}


JUDGE = ["rollout.engine_dtype=float32", "eval.temperature=1.0", "log.progress=false", "log.tensorboard=false"]


def judge(target: str, overrides: list[str], out: Path) -> dict:
    """Held-out scores of a run's final model (target = the run's folder) or a recipe's base model by one
    judge for every setting: the float32 engine, `--judge-samples` samples per prompt at T = 1 and greedy,
    the run's own held-out prompts and evaluation seed. Cached in `out`."""
    if out.exists():
        return json.loads(out.read_text())
    import contextlib
    import io

    from forkrl.cli import main as forkrl_main
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = forkrl_main(["eval", target, *JUDGE, *overrides])
    if code != 0:
        raise RuntimeError(f"forkrl eval {target} failed ({code})")
    text = buffer.getvalue()
    scores = json.loads(text[text.index("{"):])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(scores, indent=1))
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setup", nargs="+", default=["quickstart", "trl"], choices=list(SETUPS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--out", default="runs/bench_learning")
    p.add_argument("--judge-samples", type=int, default=16,
                   help="samples per held-out prompt for the common float32 judge (0: the runs' own evaluations only)")
    args = p.parse_args()
    import torch

    from forkrl.train.compare import compare
    torch.set_num_threads(2)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}, "seeds": args.seeds, "setups": {}}
    for setup in args.setup:
        out = Path(args.out) / setup
        start = time.perf_counter()
        recipes = recipe_files(setup, out / "recipes", args.settings)
        compare(recipes, seeds=args.seeds, out=str(out))
        samples = int(next(o for o in SETUPS[setup] if o.startswith("eval.samples=")).split("=")[1])
        per_setting = {}
        for name in args.settings:
            runs = [read_seed(out / f"{setup}-{name}" / f"seed{s}") for s in range(args.seeds)]
            greedy = [r["after"]["eval/accuracy"] for r in runs]
            sampled = [r["after"]["eval/sampled_accuracy"] for r in runs]
            gain = [r["after"]["eval/sampled_accuracy"] - r["before"]["eval/sampled_accuracy"] for r in runs]
            wall = [r["wall_s"] for r in runs]
            p_hat = statistics.mean(sampled)
            n = runs[0]["n_prompts"] * samples
            per_setting[name] = {
                "sampled_accuracy_before": spread([r["before"]["eval/sampled_accuracy"] for r in runs]),
                "sampled_accuracy_after": spread(sampled),
                "greedy_accuracy_before": spread([r["before"]["eval/accuracy"] for r in runs]),
                "greedy_accuracy_after": spread(greedy),
                "sampled_gain_per_step": spread([g / r["steps"] for g, r in zip(gain, runs)]),
                "sampled_gain_per_100s": spread([100 * g / w for g, w in zip(gain, wall)]),
                "wall_s": spread(wall),
                "logprob_mismatch_mean": spread([r["mismatch_mean"] for r in runs if r["mismatch_mean"] is not None]),
                "logprob_mismatch_max": max(r["mismatch_max"] for r in runs if r["mismatch_max"] is not None),
                # the evaluation's own noise: binomial standard error of a sampled accuracy over n answers
                "eval_standard_error": round(math.sqrt(p_hat * (1 - p_hat) / n), 4), "eval_sampled_answers": n,
            }
        if args.judge_samples:
            judged = {}
            n = args.judge_samples
            for s_ in range(args.seeds):
                recipe = out / "recipes" / f"{setup}-{args.settings[0]}.yaml"
                judged[("base", s_)] = judge(str(recipe), [f"seed={s_}", f"eval.samples={n}", "output_dir=/tmp/forkrl-judge"],
                                             out / "judge" / f"base-seed{s_}.json")
                for name in args.settings:
                    run = out / f"{setup}-{name}" / f"seed{s_}"
                    judged[(name, s_)] = judge(str(run), [f"eval.samples={n}"], out / "judge" / f"{name}-seed{s_}.json")
            for name in args.settings:
                runs = [read_seed(out / f"{setup}-{name}" / f"seed{s_}") for s_ in range(args.seeds)]
                after = [judged[(name, s_)]["eval/sampled_accuracy"] for s_ in range(args.seeds)]
                before = [judged[("base", s_)]["eval/sampled_accuracy"] for s_ in range(args.seeds)]
                gain = [a - b for a, b in zip(after, before)]
                p_hat = statistics.mean(after)
                per_setting[name]["judge"] = {
                    "sampled_accuracy_before": spread(before), "sampled_accuracy_after": spread(after),
                    "greedy_accuracy_after": spread([judged[(name, s_)]["eval/accuracy"] for s_ in range(args.seeds)]),
                    "sampled_gain_per_step": spread([g / r["steps"] for g, r in zip(gain, runs)]),
                    "sampled_gain_per_100s": spread([100 * g / r["wall_s"] for g, r in zip(gain, runs)]),
                    "eval_standard_error": round(math.sqrt(p_hat * (1 - p_hat) / (runs[0]["n_prompts"] * n)), 4),
                    "eval_sampled_answers": runs[0]["n_prompts"] * n}
        result["setups"][setup] = {"settings": per_setting, "wall_s": round(time.perf_counter() - start, 1),
                                   "compare_table": str(out / "compare.md")}
        print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
