import json

import pytest

from forkrl.config import build_config
from forkrl.metrics import pass_at_k
from forkrl.tasks import (
    RewardFunctionError,
    answers_match,
    build_task,
    extract_answer,
    file_task,
)
from forkrl.tasks.task import Sample, Task, WeightedReward


def test_extract_answer_modes():
    text = "I think 3 then 4. <answer> 12 </answer> so \\boxed{\\frac{1}{2}} and 7"
    assert extract_answer(text, "answer_tag") == "12"
    assert extract_answer(text, "boxed") == "\\frac{1}{2}"
    assert extract_answer(text, "last_number") == "7"
    assert extract_answer(text, "auto") == "12"
    assert extract_answer("x \\boxed{a{b}c} y", "auto") == "a{b}c"
    assert extract_answer("the sum is 1,234.", "last_number") == "1234"
    assert extract_answer("no tags", "answer_tag") is None
    assert extract_answer("none here", "last_number") is None


def test_answers_match_uses_math_equivalence():
    assert answers_match("12", "12.0")
    assert answers_match(" 12. ", "12")
    assert answers_match("\\frac{1}{2}", "0.5")
    assert not answers_match("13", "12")
    assert not answers_match(None, "12")


def test_pass_at_k_unbiased_estimator_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(5, 4, 2) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0


def test_reasoning_gym_held_out_is_disjoint_by_content():
    cfg = build_config({"task": {"dataset": "chain_sum", "train_size": 150, "eval_size": 40,
                                 "dataset_config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}})
    task = build_task(cfg.task, seed=3)
    train = {s.prompt for s in task.train}
    held = [s.prompt for s in task.eval]
    assert len(held) == 40 and len(set(held)) == 40
    assert not train & set(held)
    # the task's own verifier scores the extracted answer
    s = task.eval[0]
    assert task.correct([s, s], [f"The answer is {s.answer}.", "I do not know"]) == [1.0, 0.0]


def test_unknown_reasoning_gym_dataset_lists_names():
    with pytest.raises(ValueError, match="available: .*chain_sum"):
        build_task(build_config({"task": {"dataset": "no_such_set"}}).task)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_file_task_bad_rows_name_file_and_line(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "1"}, "{not json", {"prompt": "b", "answer": "2"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        file_task(bad)
    missing = _write(tmp_path / "missing.jsonl", [{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    with pytest.raises(ValueError, match=r"missing.jsonl:2: row has no text or chat-message field 'prompt'"):
        file_task(missing)


def test_file_task_split_and_weighted_rewards(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": str(i), "level": i % 3} for i in range(50)])
    cfg = build_config({"task": {"source": "file", "train_path": path, "eval_size": 5,
                                 "rewards": [{"name": "correct", "weight": 1.0}, {"name": "format", "weight": 0.5}]}})
    task = build_task(cfg.task)
    assert len(task.eval) == 5 and len(task.train) == 45
    assert not {s.prompt for s in task.train} & {s.prompt for s in task.eval}
    s = task.train[0]
    per_fn, total, correct = task.score([s, s], [f"<answer>{s.answer}</answer>", "no idea"])
    assert per_fn == {"correct": [1.0, 0.0], "format": [1.0, 0.0]}
    assert total == [1.5, 0.0] and correct == [1.0, 0.0]


def test_user_reward_function_gets_columns(tmp_path):
    seen = {}

    def reward(prompts, completions, answer, level, **kw):
        seen.update(level=level, ids=kw.get("completion_ids"))
        return [float(len(c)) for c in completions]

    samples = [Sample("a", "p1", "1", {"level": 2}), Sample("b", "p2", "2", {"level": 0})]
    task = Task("t", samples, [], verifier=lambda s, c: 0.0, rewards=[WeightedReward("len", reward, 2.0)])
    _, total, _ = task.score(samples, ["xy", "xyz"], completion_ids=[[1], [2, 3]])
    assert total == [4.0, 6.0] and seen == {"level": [2, 0], "ids": [[1], [2, 3]]}


def test_failing_reward_function_names_the_sample():
    from tests.rewards import fails_on_seven
    samples = [Sample("ok/1", "what is 3?", "3"), Sample("bad/2", "what is 7?", "7")]
    task = Task("t", samples, [], verifier=lambda s, c: 0.0, rewards=[WeightedReward("strict", fails_on_seven)])
    with pytest.raises(RewardFunctionError, match=r"'strict' failed on sample 'bad/2'.*seven is not allowed"):
        task.score(samples, ["3", "7"])


def test_hanging_reward_function_stops_at_its_deadline_naming_the_sample():
    import time

    from tests.rewards import hangs_on_seven
    samples = [Sample("ok/1", "what is 3?", "3"), Sample("bad/2", "what is 7?", "7")]
    task = Task("t", samples, [], verifier=lambda s, c: 0.0, rewards=[WeightedReward("slow", hangs_on_seven)])
    task.reward_timeout_s = 0.3
    start = time.perf_counter()
    with pytest.raises(RewardFunctionError, match=r"'slow' failed on sample 'bad/2'.*DeadlineExceeded: no result "
                                                  r"within 0.3 s \(task.reward_timeout_s\)"):
        task.score(samples, ["3", "7"])
    assert time.perf_counter() - start < 2                        # the batch's deadline, then the sample's
    _, total, _ = task.score(samples[:1], ["3"])                  # the deadline is disarmed afterwards
    time.sleep(0.4)
    assert total == [0.0]


def test_sys_exit_in_a_reward_becomes_an_error_naming_the_sample():
    def exits(prompts, completions, **_):
        raise SystemExit(3)
    samples = [Sample("s/0", "p", "1")]
    task = Task("t", samples, [], verifier=lambda s, c: 0.0, rewards=[WeightedReward("quitter", exits)])
    with pytest.raises(RewardFunctionError, match=r"'quitter' failed on sample 's/0'.*called sys.exit\(3\)"):
        task.score(samples, ["1"])


def test_reward_function_returning_nan_is_an_error():
    samples = [Sample("x", "p", "1")]
    task = Task("t", samples, [], verifier=lambda s, c: 0.0,
                rewards=[WeightedReward("nan", lambda prompts, completions, **k: [float("nan")])])
    with pytest.raises(RewardFunctionError, match="returned nan for sample 'x'"):
        task.score(samples, ["1"])
