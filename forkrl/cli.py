"""Command line: `forkrl train|sft RECIPE [key=value ...] [--resume | --overwrite] [--ray]`,
`forkrl eval RUN_DIR|RECIPE [key=value ...]`, `forkrl config RECIPE [key=value ...]`, `forkrl report RUN_DIR`,
`forkrl compare RECIPE... [--task T] [--seeds S] [--budget B]`.

A mistake in what the user gave (config, data, reward, model path, run directory, a missing optional
package) prints one `forkrl: ...` line and exits 2, before any weights load; `--debug` shows the traceback."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from forkrl.config import ConfigError, ModelConfig, dump_config, load_config
from forkrl.errors import UserError


def _setup(threads: int | None) -> None:
    import torch
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, rank 0 tells the story; the others only warn
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=("" if rank == 0 else f"[rank {rank}] ") + "%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "urllib3", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if threads:
        torch.set_num_threads(threads)


def cmd_train(args, sft: bool = False) -> int:
    from forkrl.train import Trainer

    # SFT trains with the NLL loss whatever loss the recipe names (its parameters go with it)
    cfg = load_config(args.config, args.overrides + (["algo.loss=nll", "algo.loss_params={}"] if sft else []))
    if sft:
        if not cfg.sft.train_path:
            raise ConfigError("forkrl sft needs sft.train_path: a .jsonl/.parquet file of {\"messages\": [...]} rows")
    elif cfg.sft.train_path:
        raise ConfigError("sft.train_path is set: run this recipe with `forkrl sft`")
    from forkrl.train.run_dir import prepare_output_dir
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the run directory
        prepare_output_dir(cfg.output_dir, resume=args.resume, overwrite=args.overwrite)
    if getattr(args, "nproc", None) is not None and "LOCAL_RANK" not in os.environ:
        return _launch_ranks(args, cfg)
    start = time.perf_counter()
    if getattr(args, "ray", False) or cfg.distributed.swarm.enabled:
        from forkrl.distributed import (
            launch,  # rollout workers and learner as Ray actors
        )
        summary = launch(cfg, resume=args.resume)
        if cfg.distributed.swarm.enabled:
            peers = [{"output_dir": f"{cfg.output_dir}/peer{i}", "held_out_accuracy_before": p["before"].get("eval/accuracy"),
                      "held_out_accuracy_after": p["after"].get("eval/accuracy")} for i, p in enumerate(summary["peers"])]
            print(json.dumps({"name": cfg.name, "wall_s": round(time.perf_counter() - start, 1), "peers": peers}, indent=1))
            return 0
        return _report(cfg, summary, start)
    trainer = Trainer(cfg)
    again = f"forkrl {args.command} {args.config} {' '.join(args.overrides)}".rstrip() + " --resume"
    try:
        summary = trainer.train(resume=args.resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted; resume with: {again}", file=sys.stderr)
        return 130
    except UserError as e:  # a reward, tool or data problem mid-run: the last completed step was saved
        saved = trainer.loop.last_saved_step
        where = f"; step {saved} is saved: fix it and continue with {again}" if saved else ""
        raise UserError(f"{e}{where}") from e
    return _report(cfg, summary, start)


def _launch_ranks(args, cfg) -> int:
    """`forkrl train --nproc N`: the same command as N ranks under torchrun (one machine; for several,
    run torchrun yourself with its rendezvous flags, see the README). The task, rewards and model path
    are checked here first, so a mistake is one line before any rank starts."""
    import subprocess

    from forkrl.tasks import build_task
    from forkrl.train.trainer import check_before_loading
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: give at least 1 rank")
    build_task(cfg.task, seed=cfg.seed)
    check_before_loading(cfg)
    if cfg.rollout.prompts_per_step % args.nproc:
        raise UserError(f"--nproc {args.nproc}: rollout.prompts_per_step={cfg.rollout.prompts_per_step} is not a "
                        "multiple of it (each rank collects whole groups of its own)")
    child, skip = [], False
    for a in args.raw_argv:  # the same arguments, without --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            child.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "forkrl.cli", *child]
    return subprocess.run(cmd).returncode


def _report(cfg, summary: dict, start: float) -> int:
    if summary.get("export") is None and int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for the run
    before, after = summary.get("before", {}), summary["after"]
    result = {"name": cfg.name, "steps": summary["steps"], "wall_s": round(time.perf_counter() - start, 1),
              "held_out_accuracy_before": before.get("eval/accuracy"),
              "held_out_accuracy_after": after["eval/accuracy"], "n_held_out": after["eval/n_prompts"],
              "output_dir": cfg.output_dir, "model": summary["export"]}
    for key in ("eval/tool_use_frac", "eval/pass@1", "eval/sampled_tool_use_frac"):
        if key in after:
            result[f"{key.removeprefix('eval/')}_before"] = before.get(key)
            result[f"{key.removeprefix('eval/')}_after"] = after[key]
    print(json.dumps(result, indent=1))
    return 0


def cmd_sft(args) -> int:
    return cmd_train(args, sft=True)


def cmd_eval(args) -> int:
    """A run's trained model with the run's config (RUN_DIR, or RUN_DIR/config.yaml), or a recipe's
    model as it is; a run's scores and every generation go to RUN_DIR/eval/."""
    from forkrl.train import Trainer
    from forkrl.train.run_dir import find_run, trained_model

    run = find_run(args.config)
    cfg = load_config(run / "config.yaml" if run else args.config, args.overrides)
    kind, where = trained_model(run) if run else ("base", None)
    if kind == "final":  # the exported model is merged: LoRA is already in its weights
        cfg.model = ModelConfig(name=str(where), dtype=cfg.model.dtype)
    if run:
        cfg.output_dir = str(run)
    trainer = Trainer(cfg)  # the same evaluation as in training, tools included
    if kind == "checkpoint":
        trainer.resume()
    res = trainer.evaluate(generations=True)
    generations = res.pop("generations")
    result = {"model": str(where) if where else cfg.model.name, "trained": kind != "base", "task": trainer.task.name,
              **res}
    if run:
        out = run / "eval"
        out.mkdir(exist_ok=True)
        (out / "scores.json").write_text(json.dumps(result, indent=1))
        with (out / "generations.jsonl").open("w") as f:
            f.writelines(json.dumps(g) + "\n" for g in generations)
        result["written"] = [str(out / "scores.json"), str(out / "generations.jsonl")]
    print(json.dumps(result, indent=1))
    return 0


def cmd_config(args) -> int:
    """The resolved config, every default written out, as a YAML recipe."""
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_compare(args) -> int:
    from forkrl.train.compare import compare
    start = time.perf_counter()
    paths = compare(args.recipes, task=args.task, seeds=args.seeds, budget=args.budget, out=args.out,
                    overrides=args.set)
    print(paths["markdown"].read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()} | {"wall_s": round(time.perf_counter() - start, 1)},
                     indent=1))
    return 0


def cmd_report(args) -> int:
    from forkrl.metrics.report import write_report
    from forkrl.train.run_dir import find_run
    if find_run(args.run_dir) is None:
        raise UserError(f"{args.run_dir} is not a run directory (forkrl report takes a run's output_dir)")
    print(write_report(args.run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkrl", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error, not one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (("train", cmd_train, "run RL training from a YAML recipe"),
                               ("sft", cmd_sft, "supervised fine-tuning on conversations (sft.train_path)"),
                               ("eval", cmd_eval, "held-out accuracy of a run's trained model (RUN_DIR) or a recipe's"),
                               ("config", cmd_config, "print the resolved config (defaults included) as YAML")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", help="run directory (eval) or YAML recipe, e.g. configs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-5 model.name=tiny-random")
        if name in ("train", "sft"):
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
            p.add_argument("--overwrite", action="store_true",
                           help="replace the run in output_dir (forkrl's files there only)")
        if name == "train":
            p.add_argument("--nproc", type=int, default=None, metavar="N",
                           help="N data-parallel ranks on this machine under torchrun (FSDP2 learner; NCCL on CUDA, "
                                "gloo on CPU); without it, one process and no torchrun")
            p.add_argument("--ray", action="store_true",
                           help="decoupled rollout workers and learner on Ray (the distributed section; pip install 'forkrl[ray]')")
        p.set_defaults(fn=fn)
    p = sub.add_parser("compare", help="train several recipes on one task, seeds and budget; tabulate mean ± 95%% CI")
    p.add_argument("recipes", nargs="+", help="YAML recipes, e.g. configs/grpo.yaml configs/dapo.yaml")
    p.add_argument("--task", help="YAML file whose task section every recipe uses (default: the recipes' own)")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..S-1 per recipe (default 2)")
    p.add_argument("--budget", help="N or steps=N (training steps), or tokens=N (sampled tokens) per run")
    p.add_argument("--out", default="runs/compare", help="where the runs, compare.md/.csv/.html go")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every run, e.g. --set train.lr=1e-5 (repeatable)")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("report", help="write RUN_DIR/report.html (plots, entropy-shaded samples) from a run's logs")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_report)
    raw = list(argv) if argv is not None else sys.argv[1:]
    args = parser.parse_args(raw)
    args.raw_argv = raw
    _setup(args.threads)
    try:
        return args.fn(args)
    except UserError as e:
        if args.debug:
            raise
        print("forkrl: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
