"""Every recipe in configs/ runs end to end on the tiny model (3 steps, small batches)."""
import glob
import json

import pytest

from forkrl.config import load_config
from forkrl.train import Trainer

RECIPES = sorted(glob.glob("configs/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.split("/")[-1])
def test_recipe_runs_three_steps_on_tiny_random(path, tmp_path):
    cfg = load_config(path, [
        "model.name=tiny-random", f"output_dir={tmp_path}", "train.steps=3", "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=4", "rollout.max_new_tokens=8", "task.train_size=20", "task.eval_size=4",
        "eval.at_start=false", "eval.every=0", "algo.dynamic_sampling.max_gen_batches=2", "log.progress=false",
        "log.tensorboard=false", "algo.overlong.buffer=4"])
    summary = Trainer(cfg).train()
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3]
