"""Command line: `forkrl train CONFIG [key=value ...] [--resume]` and `forkrl eval CONFIG [key=value ...]`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from forkrl.config import ConfigError, load_config


def _setup(threads: int | None) -> None:
    import torch
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)


def cmd_train(args) -> int:
    from forkrl.train import Trainer

    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        summary = trainer.train(resume=args.resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted; resume with: forkrl train {args.config} {' '.join(args.overrides)} --resume",
              file=sys.stderr)
        return 130
    before, after = summary.get("before", {}), summary["after"]
    result = {"name": cfg.name, "steps": summary["steps"], "wall_s": round(time.perf_counter() - start, 1),
              "held_out_accuracy_before": before.get("eval/accuracy"),
              "held_out_accuracy_after": after["eval/accuracy"], "n_held_out": after["eval/n_prompts"],
              "output_dir": cfg.output_dir, "model": summary["export"]}
    print(json.dumps(result, indent=1))
    return 0


def cmd_eval(args) -> int:
    from forkrl.metrics import evaluate
    from forkrl.models import load_policy
    from forkrl.rollout import TorchEngine
    from forkrl.tasks import build_task

    cfg = load_config(args.config, args.overrides)
    model, tok = load_policy(cfg.model.name, dtype=cfg.model.dtype, seed=cfg.seed)
    task = build_task(cfg.task, seed=cfg.seed)
    e = cfg.eval
    res = evaluate(TorchEngine(model, tok, cfg.rollout.max_batch_size), task,
                   task.eval[:e.size] if e.size else task.eval,
                   max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens, stop=cfg.rollout.stop,
                   pass_k=e.pass_k, n_samples=e.samples, temperature=e.temperature, seed=cfg.seed + 17)
    print(json.dumps({"model": cfg.model.name, "task": task.name, **res}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkrl", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (("train", cmd_train, "run RL training from a YAML recipe"),
                               ("eval", cmd_eval, "held-out accuracy and pass@k of a model")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5 model.name=tiny-random")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    _setup(args.threads)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"forkrl: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
