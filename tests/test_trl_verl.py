"""TRL's and verl's users bring their reward functions and datasets unchanged."""
import json

import pytest

from forkrl.config import build_config
from forkrl.errors import RewardFunctionError
from forkrl.tasks import Sample, Task, WeightedReward, build_task
from forkrl.train import Trainer
from tests.rewards import compute_score, conversational_length, math_only, reward_len

datasets = pytest.importorskip("datasets")


def _verl_parquet(path, n=30):
    """verl's data layout: chat-message prompt, the answer in reward_model.ground_truth."""
    rows = [{"data_source": "toy/add", "prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
             "extra_info": {"split": "train", "index": i}} for i in range(n)]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def _trl_conversational(path, n=30):
    """TRL's conversational prompt-only format, saved with datasets."""
    rows = [{"prompt": [{"role": "user", "content": f"Name a word with {i} letters."}],
             "task_type": "math" if i % 2 else "text", "answer": str(i)} for i in range(n)]
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def _run(tmp_path, task: dict, steps=2):
    cfg = build_config({
        "output_dir": str(tmp_path / "run"), "model": {"name": "tiny-random"}, "task": {"eval_size": 4, **task},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 8},
        "train": {"steps": steps, "lr": 1e-3}, "eval": {"at_start": False},
        "log": {"progress": False, "tensorboard": False}})
    summary = Trainer(cfg).train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    return summary, [r for r in rows if "reward/mean" in r]


def test_trl_and_verl_rewards_score_by_hand():
    samples = [Sample("a", "p1", "3", {"task_type": "math", "data_source": "d", "extra_info": {"index": 0}}),
               Sample("b", "p2", "4", {"task_type": "text", "data_source": "d", "extra_info": {"index": 1}})]
    task = Task("t", samples, [], verifier=lambda s, c: 0.0, rewards=[
        WeightedReward("reward_len", reward_len, 0.5), WeightedReward("math_only", math_only, 2.0),
        WeightedReward("compute_score", compute_score, 1.0)])
    assert [r.style for r in task.rewards] == ["trl", "trl", "verl"]
    per_fn, total, _ = task.score(samples, ["x" * 18, "the answer is 4"])
    assert per_fn["reward_len"] == [-2.0, -5.0]
    assert per_fn["math_only"][0] == 1.0 and per_fn["math_only"][1] != per_fn["math_only"][1]  # None -> NaN
    assert per_fn["compute_score"] == [0.0, 1.0]
    # None leaves math_only out of sample b's sum: 0.5 * -5 + 1.0 * 1.0
    assert total == [0.5 * -2.0 + 2.0 * 1.0 + 0.0, 0.5 * -5.0 + 1.0]


def test_conversational_prompts_give_message_completions():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    samples = [Sample("a", "hi", None, messages=msgs)]
    task = Task("t", samples, [], verifier=lambda s, c: 0.0, system_prompt="ignored: the data has one",
                rewards=[WeightedReward("conv", conversational_length)])
    assert task.messages(samples[0]) == msgs
    per_fn, total, _ = task.score(samples, ["four"])
    assert total == [4.0]


def test_a_reward_that_cannot_take_forkrls_arguments_fails_when_the_task_is_built(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n" for i in range(20)))
    (tmp_path / "bad_reward.py").write_text("def score(prompts, completions, difficulty):\n    return [0.0]\n")
    cfg = build_config({"task": {"source": "file", "train_path": str(path),
                                 "rewards": [{"function": f"{tmp_path}/bad_reward.py:score"}]}})
    with pytest.raises(RewardFunctionError, match="needs the argument 'difficulty'.*columns"):
        build_task(cfg.task)


def test_verl_parquet_trains_with_compute_score_and_trl_rewards(tmp_path):
    path = _verl_parquet(tmp_path / "train.parquet")
    summary, rows = _run(tmp_path, {"source": "hf", "dataset": path, "rewards": [
        {"function": "tests.rewards:compute_score"}]})
    assert len(rows) == 2 and summary["steps"] == 2
    assert all(0.0 <= r["reward/compute_score"] <= 1.0 for r in rows)
    task = build_task(build_config({"task": {"source": "hf", "dataset": path}}).task)
    s = task.train[0]
    assert s.messages is not None and s.answer == str(int(s.prompt.split()[2]) + 1)
    assert s.columns["reward_model"]["style"] == "rule"  # every column reaches the reward functions


def test_trl_standard_dataset_trains_with_the_documentations_reward_len(tmp_path):
    """TRL's standard prompt-only format saved with datasets, and TRL's own example reward."""
    path = tmp_path / "trl_standard.jsonl"
    datasets.Dataset.from_list([{"prompt": f"Write about {i}.", "task": "len"} for i in range(30)]).to_json(str(path))
    summary, rows = _run(tmp_path, {"source": "hf", "dataset": str(path), "rewards": [
        {"function": "tests.rewards:reward_len"}]})
    assert len(rows) == 2
    assert all(r["reward/reward_len"] <= 0.0 and r["reward/mean"] == r["reward/reward_len"] for r in rows)


def test_trl_conversational_dataset_trains_with_none_rewards(tmp_path):
    path = _trl_conversational(tmp_path / "trl_ds")
    summary, rows = _run(tmp_path, {"source": "hf", "dataset": path, "rewards": [
        {"function": "tests.rewards:conversational_length", "weight": 0.1},
        {"function": "tests.rewards:math_only"}]})
    assert len(rows) == 2 and all(r["reward/conversational_length"] >= 0 for r in rows)
    # the mean over the rows it applies to; a step that drew only text rows has none (null)
    assert all(r["reward/math_only"] in (1.0, None) for r in rows) and 1.0 in [r["reward/math_only"] for r in rows]


def test_task_from_dataset():
    ds = datasets.Dataset.from_list([{"prompt": f"What is {i} * 2?", "solution": str(2 * i)} for i in range(40)])
    task = Task.from_dataset(ds, eval_size=5, rewards=[WeightedReward("reward_len", reward_len)])
    assert len(task.eval) == 5 and len(task.train) == 35
    assert not {s.prompt for s in task.train} & {s.prompt for s in task.eval}
    s = task.train[0]
    assert s.answer == s.columns["solution"]  # TRL's math datasets keep the answer in `solution`
    assert task.correct([s], [f"<answer>{s.answer}</answer>"]) == [1.0]


def test_a_json_array_file_loads(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": f"q{i}", "answer": str(i)} for i in range(20)]))
    task = build_task(build_config({"task": {"source": "file", "train_path": str(path), "eval_size": 2}}).task)
    assert len(task.train) + len(task.eval) == 20


def test_readme_coming_from_trl_or_verl_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's TRL/verl walk-through: its files written out, its commands run (tiny model)."""
    import re
    import runpy
    import shlex
    import sys
    from pathlib import Path

    from forkrl.cli import main
    repo = Path(__file__).resolve().parent.parent
    text = (repo / "README.md").read_text()
    section = re.search(r"### Coming from TRL or verl(.*?)\n### ", text, re.DOTALL).group(1)
    files = re.findall(r"```python\n# (\w+\.py)\n(.*?)```", section, re.DOTALL)
    assert [f for f, _ in files] == ["make_data.py", "my_rewards.py", "verl_reward.py"]
    for name, body in files:
        (tmp_path / name).write_text(body)
    commands = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).strip().splitlines()
    assert commands[0] == "python make_data.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["make_data.py"])
    runpy.run_path("make_data.py")
    small = ["model.name=tiny-random", "train.steps=2", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
             "rollout.max_new_tokens=6", "eval.size=4", "eval.at_start=false", "log.progress=false",
             "log.tensorboard=false"]
    for line in commands[1:]:
        argv = shlex.split(line)
        assert argv[0] == "forkrl"
        argv = [a.replace("configs/", f"{repo}/configs/") for a in argv[1:]]
        assert main(argv + small) == 0, capsys.readouterr().err
        out = json.loads(capsys.readouterr().out)
        assert out["steps"] == 2
    rows = [json.loads(line) for line in open(tmp_path / "runs" / "trl_sums" / "metrics.jsonl")]
    assert all(r["reward/brevity"] <= 0 for r in rows if "reward/brevity" in r)
    rows = [json.loads(line) for line in open(tmp_path / "runs" / "verl_sums" / "metrics.jsonl")]
    assert any("reward/compute_score" in r for r in rows)
