"""A run's output directory: what a run leaves there, refusing to write over it, finding its model again.

    OUTPUT/config.yaml        the resolved config (a recipe: `forkrl train OUTPUT/config.yaml` repeats the run)
    OUTPUT/metrics.jsonl      per-step metrics;   samples.jsonl: a few completions per step, token by token
    OUTPUT/checkpoints/       step_NNNNNN/ and `latest` (forkrl.train.checkpoint)
    OUTPUT/tensorboard/       event files;   summary.json: held-out before/after, steps
    OUTPUT/final/             the trained model (merged), README.md its model card;   adapter/: LoRA adapters
    OUTPUT/eval/              `forkrl eval OUTPUT`: scores.json and generations.jsonl
    OUTPUT/report.html        `forkrl report OUTPUT`, with report/ for its PNGs
"""
from __future__ import annotations

import shutil
from pathlib import Path

from forkrl.errors import RunDirError

# what marks a directory as holding a run, and what --overwrite removes (nothing else is touched)
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "summary.json", "config.yaml", "report.html", "wandb_id")
RUN_FOLDERS = ("checkpoints", "tensorboard", "final", "adapter", "eval", "report")


def holds_run(out: Path) -> bool:
    out = Path(out)
    return any((out / f).exists() for f in ("metrics.jsonl", "summary.json", "checkpoints"))


def prepare_output_dir(out: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an output directory that holds a run unless the user chose to continue it (--resume)
    or replace it (--overwrite, which removes forkrl's own files there and nothing else)."""
    out = Path(out)
    if resume and overwrite:
        raise RunDirError("--resume continues the run in output_dir and --overwrite replaces it: choose one")
    if not holds_run(out) or resume:
        return
    if not overwrite:
        found = [f for f in ("metrics.jsonl", "checkpoints", "summary.json") if (out / f).exists()]
        raise RunDirError(f"output_dir {out} already holds a run ({', '.join(found)}): continue it with --resume, "
                          f"replace it with --overwrite, or choose another output_dir=...")
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)


def find_run(path: str | Path) -> Path | None:
    """The run directory `path` names: the directory itself, or the one holding a config.yaml given
    as `path`; None when `path` is not part of a run (a recipe)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent if path.name == "config.yaml" else None
    if folder is not None and (folder / "config.yaml").exists() and holds_run(folder):
        return folder
    if path.is_dir():
        what = "has no config.yaml" if not (path / "config.yaml").exists() else "has no metrics or checkpoints"
        raise RunDirError(f"{path} is not a forkrl run: it {what} (give a run's output_dir or a YAML recipe)")
    return None


def trained_model(run: Path) -> tuple[str, Path | None]:
    """Where a run's trained weights are: ("final", OUTPUT/final) when the run finished, else
    ("checkpoint", the latest checkpoint)."""
    from forkrl.train.checkpoint import latest_checkpoint
    if (run / "final" / "config.json").exists():
        return "final", run / "final"
    ckpt = latest_checkpoint(run)
    if ckpt is not None:
        return "checkpoint", ckpt
    raise RunDirError(f"{run} has no trained model yet (neither final/ nor a checkpoint)")


def write_model_card(folder: Path, cfg, summary: dict, adapter: bool = False) -> Path:
    """folder/README.md: what was trained, from what, with which recipe, and its held-out scores."""
    before, after = summary.get("before", {}), summary.get("after", {})
    rows = []
    for key in ("eval/accuracy", "eval/pass@1", "eval/sampled_accuracy", "eval/tool_use_frac"):
        if key in after:
            old = before.get(key)
            rows.append(f"| {key.removeprefix('eval/')} | {'-' if old is None else f'{old:.3f}'} | {after[key]:.3f} |")
    task = cfg.task.dataset if cfg.task.source in ("reasoning_gym", "hf") else cfg.task.train_path
    load = (f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), \"{folder}\")" if adapter
            else f"AutoModelForCausalLM.from_pretrained(\"{folder}\")")
    if adapter and cfg.model.adapters:  # peft writes each named adapter to its own subfolder
        first, *rest = cfg.model.adapters
        load = "\n".join([f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "
                          f"\"{folder / first}\", adapter_name=\"{first}\")"]
                         + [f"model.load_adapter(\"{folder / name}\", adapter_name=\"{name}\")" for name in rest]
                         + [f"model.set_adapter(\"{first}\")  # one agent at a time"])
    lines = ["---", f"base_model: {cfg.model.name}", f"library_name: {'peft' if adapter else 'transformers'}",
             f"tags: [forkrl, reinforcement-learning, {cfg.algo.advantage}, {cfg.algo.loss}]", "---", "",
             f"# {cfg.name}", "",
             f"{'LoRA adapters for' if adapter else 'A fine-tune of'} `{cfg.model.name}`, trained by forkrl with the "
             f"recipe `{cfg.name}`" + (f" ({cfg.paper})" if cfg.paper else "") + f" on {cfg.task.source} task "
             f"`{task}` for {summary.get('steps', '?')} steps: advantage `{cfg.algo.advantage}`, loss `{cfg.algo.loss}`, "
             f"{cfg.rollout.prompts_per_step} prompts x {cfg.rollout.samples_per_prompt} samples per step, "
             f"lr {cfg.train.lr}.", ""]
    if rows:
        n = after.get("eval/n_prompts")
        lines += [f"Held-out scores ({n} prompts disjoint from training; greedy unless noted):", "",
                  "| metric | before | after |", "|---|---|---|", *rows, ""]
    lines += ["Load it with:", "", "```python", load, "```", "",
              "The full recipe is the run's `config.yaml` (`forkrl train config.yaml` repeats it).", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path
