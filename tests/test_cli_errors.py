"""What a new user meets first: every mistake is one `forkrl:` line and exit 2, before any weights
load; a run is never lost (a failing reward keeps the last step) or overwritten; `forkrl eval RUN_DIR`
scores the trained model; `forkrl config` prints a recipe that loads back."""
import json

import pytest
import yaml

import forkrl.train.trainer as trainer_module
from forkrl.cli import main
from forkrl.config import build_config, load_config
from forkrl.train import Trainer

TINY = ["model.name=tiny-random", "log.progress=false", "log.tensorboard=false"]


def _data(tmp_path, n=40, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"prompt": f"Say something about the number {i}.", "answer": str(i)}) + "\n"
                            for i in range(n)))
    return str(path)


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if any model is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")
    monkeypatch.setattr(trainer_module, "load_policy", refuse)


def _bad_inputs(tmp_path):
    good = _data(tmp_path)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "answer": "1"}\n{not json\n')
    no_prompt = tmp_path / "noprompt.jsonl"
    no_prompt.write_text('{"question": "a", "answer": "1"}\n')
    (tmp_path / "needs_difficulty.py").write_text("def r(prompts, completions, difficulty):\n    return [0.0]\n")
    run = tmp_path / "existing"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    not_a_run = tmp_path / "empty_dir"
    not_a_run.mkdir()
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text('{"prompt": "short", "answer": "1"}\n' + json.dumps({"prompt": "word " * 20000, "answer": "2"}) + "\n")
    null_answer = tmp_path / "null.jsonl"
    null_answer.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": null}\n')
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    file = ["train", "configs/quickstart.yaml", "task.source=file", f"output_dir={tmp_path}/out"] + TINY
    return {
        "missing data file": (file + [f"task.train_path={tmp_path}/nope.jsonl"], "data file not found"),
        "bad row": (file + [f"task.train_path={bad_json}"], r"bad.jsonl:2: not valid JSON"),
        "row without the prompt field": (file + [f"task.train_path={no_prompt}"], r"noprompt.jsonl:1: row has no text"),
        "reward module missing": (file + [f"task.train_path={good}", "task.rewards=[{function: 'no_such_mod:f'}]"],
                                  r"task.rewards\[0\].function: cannot import 'no_such_mod'"),
        "reward signature": (file + [f"task.train_path={good}",
                                     f"task.rewards=[{{function: '{tmp_path}/needs_difficulty.py:r'}}]"],
                             "needs the argument 'difficulty'"),
        "missing model folder": (["train", "configs/quickstart.yaml", f"output_dir={tmp_path}/out",
                                  f"model.name={tmp_path}/no_model"], "model.name: no model file or folder"),
        "wandb not installed": (file + [f"task.train_path={good}", "log.wandb_project=x"],
                                r"log.wandb_project needs wandb, which is not installed: pip install 'forkrl\[wandb\]'"),
        "empty held-out set": (["train", "configs/quickstart.yaml", f"output_dir={tmp_path}/out", "task.train_size=2000"]
                               + TINY, "no held-out prompt is disjoint from the training prompts"),
        "run directory exists": (["train", "configs/quickstart.yaml", f"output_dir={run}"] + TINY,
                                 "already holds a run .*--resume.*--overwrite"),
        "eval on a folder that is not a run": (["eval", str(not_a_run)], "is not a forkrl run: it has no config.yaml"),
        "report on a folder that is not a run": (["report", str(not_a_run)], "is not a forkrl run"),
        "unknown config key": (["train", "configs/quickstart.yaml", "train.learning_rate=1e-5"], "train.lr"),
        "hf dataset file missing": (file[:2] + [f"output_dir={tmp_path}/out", "task.source=hf", f"task.dataset={tmp_path}/nope.parquet"] + TINY,
                                    "data file not found"),
        "prompt longer than the context": (file + [f"task.train_path={long_prompt}"],
                                           r"long.jsonl:2: the prompt is \d+ tokens, more than the \d+ that fit"),
        "null answer": (file + [f"task.train_path={null_answer}"], r"null.jsonl:2: the answer field 'answer' is null"),
        "not UTF-8": (file + [f"task.train_path={latin1}"], r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"),
        "unknown sandbox option": (file + [f"task.train_path={good}", "env.enabled=true",
                                           "env.tools=[{name: python, memroy_mb: 100}]"], "tool 'python' has no option memroy_mb"),
        "sandbox limit not positive": (file + [f"task.train_path={good}", "env.enabled=true",
                                               "env.tools=[{name: python, timeout_s: 0}]"], "timeout_s must be a positive"),
        "bad LoRA options": (file + [f"task.train_path={good}", "model.lora={r: 8, no_such_option: 1}"], "model.lora"),
        "no ranks": (["train", "--nproc", "0", "configs/quickstart.yaml", f"output_dir={tmp_path}/out0"] + TINY,
                     "--nproc 0: give at least 1 rank"),
        "cuda without a GPU": (file + [f"task.train_path={good}", "train.device=cuda"], "no CUDA device here"),
    }


def test_bad_inputs_print_one_line_and_exit_2_before_any_weights_load(tmp_path, capsys, monkeypatch, no_weights):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    cases = _bad_inputs(tmp_path)
    assert len(cases) >= 10
    for name, (argv, expected) in cases.items():
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("forkrl: "), f"{name}: {err!r}"
        import re
        assert re.search(expected, lines[0]), f"{name}: {lines[0]!r} lacks {expected!r}"


def test_debug_shows_the_traceback(tmp_path, no_weights):
    with pytest.raises(Exception, match="data file not found"):
        main(["--debug", "train", "configs/quickstart.yaml", "task.source=file", f"task.train_path={tmp_path}/x.jsonl",
              f"output_dir={tmp_path}/out"])


def _cfg(tmp_path, out="run", **sections):
    data = {"output_dir": str(tmp_path / out), "model": {"name": "tiny-random"},
            "task": {"source": "file", "train_path": _data(tmp_path), "eval_size": 4,
                     "rewards": [{"function": "tests.rewards:low_token_ids"}]},
            "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 8},
            "train": {"steps": 4, "lr": 1e-2, "checkpoint_every": 0}, "eval": {"at_start": False},
            "log": {"progress": False, "tensorboard": False}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return build_config(data)


def _rows(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/", "memory/"))}
            for r in rows if "reward/mean" in r]


def test_a_reward_that_raises_at_step_3_leaves_step_2_which_resumes_exactly(tmp_path, monkeypatch):
    import tests.rewards as rewards
    straight = _cfg(tmp_path, "straight")
    Trainer(straight).train()

    real, calls = rewards.low_token_ids, {"n": 0}

    def fails_on_the_third_batch(prompts, completions, completion_ids, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the reward server is down")
        return real(prompts, completions, completion_ids, **kw)

    monkeypatch.setattr(rewards, "low_token_ids", fails_on_the_third_batch)
    failing = _cfg(tmp_path, "failing")
    with pytest.raises(Exception, match="the reward server is down"):
        Trainer(failing).train()
    assert (tmp_path / "failing" / "checkpoints" / "latest").read_text() == "step_000002"
    monkeypatch.setattr(rewards, "low_token_ids", real)
    Trainer(failing).train(resume=True)
    assert _rows(tmp_path / "straight") == _rows(tmp_path / "failing")


def _train_with_failing_reward(tmp_path, capsys, function: str) -> tuple[int, str]:
    """`forkrl train` with a reward from tests/rewards.py that fails at its third batch: (exit code, last line)."""
    import tests.rewards as rewards
    rewards.BATCHES_SCORED["n"] = 0
    code = main(["train", "configs/quickstart.yaml", "task.source=file", f"task.train_path={_data(tmp_path)}",
                 f"task.rewards=[{{function: 'tests.rewards:{function}'}}]", f"output_dir={tmp_path}/r",
                 "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "train.steps=5", "eval.at_start=false",
                 "rollout.max_new_tokens=4"] + TINY)
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_failure_mid_run_says_which_step_was_saved(tmp_path, capsys):
    code, err = _train_with_failing_reward(tmp_path, capsys, "fails_on_the_third_batch")
    assert code == 2 and "the reward server is down" in err
    assert "; step 2 is saved: fix it and continue with forkrl train configs/quickstart.yaml" in err
    assert err.endswith("--resume")
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text() == "step_000002"


def test_sys_exit_in_a_reward_leaves_a_checkpoint_and_a_message(tmp_path, capsys):
    code, err = _train_with_failing_reward(tmp_path, capsys, "exits_on_the_third_batch")
    assert code == 2 and "exits_on_the_third_batch" in err and "called sys.exit(3)" in err, err
    assert "step 2 is saved" in err
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text() == "step_000002"


def test_second_run_into_the_same_directory_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    data = _data(tmp_path)
    argv = ["train", "configs/quickstart.yaml", "task.source=file", f"task.train_path={data}", "train.steps=1",
            f"output_dir={tmp_path}/r", "eval.at_start=false", "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4"] + TINY
    assert main(argv) == 0
    first = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert main(argv) == 2 and "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == first  # untouched
    (tmp_path / "r" / "notes.txt").write_text("mine")
    assert main(argv + ["--overwrite"]) == 0
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"  # only forkrl's own files are replaced


def test_config_prints_a_recipe_that_loads_back(tmp_path, capsys):
    assert main(["config", "configs/dapo.yaml", "train.lr=3e-6"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_config(path) == load_config("configs/dapo.yaml", ["train.lr=3e-6"])
    assert yaml.safe_load(text)["train"]["lr"] == 3e-6


def test_eval_run_dir_scores_the_trained_model_and_lora_adapters_load_with_peft(tmp_path, capsys):
    """SFT teaches tiny-random to answer 7 (every answer of the task): the run's model scores what the
    base model cannot, `forkrl eval RUN_DIR` finds it, and the exported adapters equal the merged model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "sevens.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about the number {i}.", "answer": "7"}) + "\n"
                               for i in range(40)))
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Tell me about {i}."},
                                                      {"role": "assistant", "content": "7"}]}) + "\n" for i in range(16)))
    run = tmp_path / "sft"
    common = ["task.source=file", f"task.train_path={prompts}", "task.eval_size=8", "task.extractor=last_number",
              "task.system_prompt=", "task.prompt_template=Tell me about {prompt}",
              "rollout.max_new_tokens=4"] + TINY
    assert main(["sft", "configs/quickstart.yaml", f"sft.train_path={demos}", "sft.batch_size=8", "train.steps=30",
                 "train.lr=1e-2", "model.lora={r: 16, lora_alpha: 32, target_modules: all-linear}",
                 "model.export=both", f"output_dir={run}"] + common) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert main(["eval", "configs/quickstart.yaml", f"output_dir={tmp_path}/base"] + common) == 0
    base = json.loads(capsys.readouterr().out)
    assert trained["trained"] and not base["trained"] and trained["model"] == str(run / "final")
    assert trained["eval/accuracy"] >= base["eval/accuracy"] + 0.5, (trained, base)
    gens = [json.loads(line) for line in open(run / "eval" / "generations.jsonl")]
    assert len(gens) == trained["eval/n_prompts"] and sum(g["correct"] for g in gens) / len(gens) == trained["eval/accuracy"]
    # a run's config.yaml names the run too (it used to evaluate the base model)
    assert main(["eval", str(run / "config.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["eval/accuracy"] == trained["eval/accuracy"]
    # the adapters, on the base model, are the merged model
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    base_model = AutoModelForCausalLM.from_pretrained(run / "final")  # same architecture; base weights below
    from forkrl.models import load_policy
    tiny, _ = load_policy("tiny-random", seed=0)
    base_model.load_state_dict(tiny.state_dict())
    adapted = PeftModel.from_pretrained(base_model, run / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)
    card = (run / "final" / "README.md").read_text()
    assert "base_model: tiny-random" in card and "| accuracy |" in card
    assert "library_name: peft" in (run / "adapter" / "README.md").read_text()
