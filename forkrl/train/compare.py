"""`forkrl compare`: several recipes trained on the same task, seeds, evaluation and budget, one
after another in this process, then tabulated by `forkrl.metrics.compare`.

Each run lives in OUT/<recipe name>/seed<k>/ like any other run, so it can be reported on its own
(`forkrl report`). A comparison that stops part-way resumes: finished runs (summary.json present and
made by the same settings) are read back, an interrupted one continues from its checkpoint.
"""
from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

from forkrl.config import (
    ConfigError,
    build_config,
    read_recipe,
    set_dotted,
    settings_differ,
)
from forkrl.metrics.compare import RunResult, read_run, write_comparison

log = logging.getLogger(__name__)


def parse_budget(budget: str | None) -> tuple[str, int] | None:
    """'20' or 'steps=20' -> ('steps', 20); 'tokens=200000' -> ('tokens', 200000)."""
    if budget is None:
        return None
    kind, _, amount = budget.rpartition("=")
    kind = kind or "steps"
    try:
        value = int(float(amount))
    except ValueError:
        value = 0
    if kind not in ("steps", "tokens") or value <= 0:
        raise ConfigError(f"--budget {budget!r}: expected N, steps=N or tokens=N with N > 0")
    return kind, value


def _run_data(recipe: str, *, task: dict | None, evaluation: dict, seed: int, budget, out: Path,
              overrides: list[str]) -> tuple[dict, str]:
    data = read_recipe(recipe)
    name = data.get("name") or Path(recipe).stem
    if task is not None:
        # a recipe's rewards and reward terms are part of its method (DAPO's -1 offset and overlong shaping,
        # FAPO's penalty), not of its task: they stay unless the task file sets them
        own = data.get("task") or {}
        data["task"] = dict(task)
        for key in ("rewards", "reward_terms"):
            if key in own and key not in task:
                data["task"][key] = own[key]
    data["eval"] = evaluation
    data["seed"] = seed
    data["output_dir"] = str(out / name / f"seed{seed}")
    if budget is not None:
        kind, value = budget
        set_dotted(data, "train.steps" if kind == "steps" else "train.token_budget", value)
    return data, name


def compare(recipes: list[str], *, task: str | None = None, seeds: int = 2, budget: str | None = None,
            out: str = "runs/compare", overrides: list[str] | None = None) -> dict[str, Path]:
    """Trains every recipe with seeds 0..seeds-1 and writes the comparison; returns its file paths.

    task: a YAML file whose `task` section (or, without one, whole content) replaces each recipe's,
    except the recipe's rewards and reward terms unless the file sets them; without it the recipes
    must already share a task. The first recipe's `eval` section is used for
    all, so every run is measured the same way. overrides (key=value) apply to every run.
    """
    from forkrl.train.trainer import Trainer

    if not recipes:
        raise ConfigError("forkrl compare needs at least one recipe")
    overrides = list(overrides or [])
    parsed_budget = parse_budget(budget)
    task_section = None
    if task is not None:
        spec = read_recipe(task)
        task_section = spec.get("task", spec)
    raw = [read_recipe(r) for r in recipes]
    if task_section is None and any(r.get("task") != raw[0].get("task") for r in raw[1:]):
        raise ConfigError("the recipes define different tasks; pass --task TASK.yaml to run them all on one")
    evaluation = dict(raw[0].get("eval") or {})
    root = Path(out)
    names = [r.get("name") or Path(p).stem for r, p in zip(raw, recipes)]
    if len(set(names)) < len(names):
        raise ConfigError(f"recipes share a name ({names}); give each a distinct `name:`")

    results: list[RunResult] = []
    for recipe in recipes:
        for seed in range(seeds):
            data, name = _run_data(recipe, task=task_section, evaluation=evaluation, seed=seed,
                                   budget=parsed_budget, out=root, overrides=overrides)
            cfg = build_config(data, overrides)
            run_dir = Path(cfg.output_dir)
            settings = cfg.model_dump(mode="json")
            meta_path = run_dir / "compare_run.json"
            if meta_path.exists() and settings_differ(json.loads(meta_path.read_text()).get("config") or {}, settings):
                raise ConfigError(f"{run_dir} holds a run with other settings; choose another --out or remove it")
            if meta_path.exists() and (run_dir / "summary.json").exists():
                log.info("compare: %s seed %d already finished in %s", name, seed, run_dir)
            else:
                log.info("compare: training %s seed %d -> %s", name, seed, run_dir)
                start = time.perf_counter()
                trainer = Trainer(cfg)
                trainer.train(resume=True)
                wall = time.perf_counter() - start
                run_dir.mkdir(parents=True, exist_ok=True)
                meta_path.write_text(json.dumps({"recipe": recipe, "seed": seed, "wall_s": wall, "config": settings}))
                del trainer
                gc.collect()
            results.append(read_run(run_dir, name, seed))
    budget_text = (f"{parsed_budget[1]:,} {parsed_budget[0]}" if parsed_budget else "each recipe's own steps")
    rewards = ("" if task_section is None else " Rewards: the task file's." if "rewards" in task_section
               else " Rewards: each recipe's own (the task file sets none).")
    description = (f"{len(recipes)} recipes × {seeds} seeds, budget {budget_text}, task from "
                   f"{task or recipes[0]}, evaluation from {recipes[0]}.{rewards}")
    return write_comparison(results, root, description)
