"""`forkrl compare`: intervals by hand, and two tiny recipes compared end to end through the CLI."""
import csv
import json
import math

import pytest
import yaml

from forkrl.cli import main
from forkrl.metrics.compare import mean_ci
from tests.test_trainer import _prompts


def test_mean_ci_student_t_by_hand():
    # two seeds: sd = 0.1414, t(0.975, 1) = 12.706 -> half-width 12.706 * 0.1414 / sqrt(2) = 1.2706
    mean, half = mean_ci([0.4, 0.6])
    assert mean == pytest.approx(0.5) and half == pytest.approx(1.2706, abs=1e-3)
    # three: sd = 1, t(0.975, 2) = 4.303 -> 4.303 / sqrt(3) = 2.484
    assert mean_ci([1.0, 2.0, 3.0]) == (pytest.approx(2.0), pytest.approx(2.484, abs=1e-3))
    assert math.isnan(mean_ci([0.7])[1]) and mean_ci([0.7])[0] == 0.7


def _recipe(tmp_path, name, algo):
    data = {"name": name, "model": {"name": "tiny-random"},
            "task": {"source": "file", "train_path": _prompts(tmp_path), "eval_size": 4,
                     "rewards": [{"function": "tests.rewards:low_token_ids"}]},
            "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 6},
            "algo": algo, "train": {"steps": 50, "lr": 1e-2},
            "eval": {"at_start": False, "every": 1, "size": 4},
            "log": {"progress": False, "tensorboard": False}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_compare_two_recipes_over_two_seeds(tmp_path, capsys):
    a = _recipe(tmp_path, "grpo_tiny", {"advantage": "grpo"})
    b = _recipe(tmp_path, "drgrpo_tiny", {"advantage": "drgrpo", "agg": "seq-mean-token-sum-norm"})
    out = tmp_path / "cmp"
    argv = ["compare", a, b, "--seeds", "2", "--budget", "3", "--out", str(out)]
    assert main(argv) == 0
    md = (out / "compare.md").read_text()
    assert "| grpo_tiny | 2 |" in md and "| drgrpo_tiny | 2 |" in md and " ± " in md
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["recipe"] for r in rows] == ["grpo_tiny", "drgrpo_tiny"]
    for r in rows:
        assert 0 <= float(r["held-out accuracy mean"]) <= 1 and float(r["tokens sampled mean"]) > 0
        assert float(r["wall time (s) mean"]) > 0 and r["final entropy mean"] not in ("", "nan")
    for recipe in ("grpo_tiny", "drgrpo_tiny"):
        for seed in (0, 1):
            summary = json.loads((out / recipe / f"seed{seed}" / "summary.json").read_text())
            assert summary["steps"] == 3
    # the two seeds really differ
    s0 = json.loads((out / "grpo_tiny/seed0/summary.json").read_text())["after"]["budget/sampled_tokens"]
    s1 = json.loads((out / "grpo_tiny/seed1/summary.json").read_text())["after"]["budget/sampled_tokens"]
    assert s0 != s1 or (out / "grpo_tiny/seed0/samples.jsonl").read_text() != (out / "grpo_tiny/seed1/samples.jsonl").read_text()
    page = (out / "compare.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    # a second call reads the finished runs back instead of training them again
    before = (out / "grpo_tiny/seed0/summary.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "grpo_tiny/seed0/summary.json").stat().st_mtime_ns == before
    # other settings in the same place are refused, not mixed in
    assert main(["compare", a, "--seeds", "1", "--budget", "2", "--out", str(out)]) == 2


def test_token_budget_stops_the_run(tmp_path):
    a = _recipe(tmp_path, "grpo_tiny", {"advantage": "grpo"})
    out = tmp_path / "cmp"
    assert main(["compare", a, "--seeds", "1", "--budget", "tokens=60", "--out", str(out)]) == 0
    summary = json.loads((out / "grpo_tiny/seed0/summary.json").read_text())
    # 2 prompts x 4 samples x <= 6 tokens = at most 48 tokens a step: the budget ends it after 2 steps
    assert summary["steps"] == 2 and 60 <= summary["after"]["budget/sampled_tokens"] <= 96


def test_bad_budget_names_the_allowed_forms(tmp_path, capsys):
    a = _recipe(tmp_path, "grpo_tiny", {"advantage": "grpo"})
    assert main(["compare", a, "--budget", "hours=3", "--out", str(tmp_path / "x")]) == 2
    assert "steps=N or tokens=N" in capsys.readouterr().err


def test_a_shared_task_keeps_each_recipes_rewards_and_reward_terms(tmp_path):
    """--task replaces the task, not the method: DAPO's +1/-1 rewards and overlong shaping stay (unless
    the task file sets them)."""
    from forkrl.train.compare import _run_data
    data, _ = _run_data("configs/dapo.yaml", task={"dataset": "chain_sum"}, evaluation={}, seed=0, budget=None,
                        out=tmp_path, overrides=[])
    assert data["task"] == {"dataset": "chain_sum", "reward_terms": [{"name": "overlong", "buffer": 8, "factor": 1.0}],
                            "rewards": [{"name": "correct", "weight": 2.0},
                                        {"function": "forkrl.tasks.rewards:constant_minus_one", "name": "offset",
                                         "weight": 1.0}]}
    data, _ = _run_data("configs/dapo.yaml", task={"dataset": "chain_sum", "reward_terms": [],
                                                   "rewards": [{"name": "correct"}]}, evaluation={},
                        seed=0, budget=None, out=tmp_path, overrides=[])
    assert data["task"]["reward_terms"] == [] and data["task"]["rewards"] == [{"name": "correct"}]
