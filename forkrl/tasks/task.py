"""Tasks: prompt sources with verifiable rewards.

A `Task` holds train and held-out `Sample`s, turns a sample into chat-formatted prompt tokens, and
scores completions with one or more weighted reward functions. Reward functions follow TRL's
signature `fn(prompts, completions, **columns) -> list[float]`, where `columns` holds `answer` and
every other field of the samples, one list entry per completion.

Held-out prompts are disjoint from training prompts by content, not only by seed: procedural tasks
repeat problems, so evaluation drops every prompt whose text also occurs in the training set.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forkrl.io import read_rows
from forkrl.registry import register_reward, register_task_source
from forkrl.tasks.answers import answers_match, extract_answer
from forkrl.types import Sample

log = logging.getLogger(__name__)
RewardFn = Callable[..., list[float]]


class RewardFunctionError(RuntimeError):
    pass


@dataclass
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float = 1.0


class Task:
    """Train/held-out samples, prompt formatting and scoring.

    `verifier(sample, completion) -> float in [0, 1]` defines correctness (accuracy and pass@k count
    a completion correct when it scores 1); reward functions define the training signal.
    """

    def __init__(self, name: str, train: list[Sample], eval: list[Sample], *,
                 verifier: Callable[[Sample, str], float], system_prompt: str | None = None,
                 prompt_template: str = "{prompt}", rewards: list[WeightedReward] | None = None,
                 few_shot: list[dict[str, str]] | None = None):
        self.name = name
        self.few_shot = list(few_shot or [])  # [{user, assistant}] turns shown before every prompt
        self.train = train
        self.eval = eval
        self.verifier = verifier
        self.system_prompt = system_prompt
        self.prompt_template = prompt_template
        self.rewards = rewards if rewards is not None else [WeightedReward("correct", self.correct_reward)]
        if not train:
            raise ValueError(f"task {name!r} has no training samples")

    def answer_of(self, completion: str) -> str | None:
        """The final answer a completion gives (majority voting compares these); tasks built from an
        extractor replace it."""
        return completion.strip() or None

    # -- prompts -----------------------------------------------------------------------------
    def messages(self, sample: Sample) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for shot in self.few_shot:
            msgs += [{"role": "user", "content": shot["user"]}, {"role": "assistant", "content": shot["assistant"]}]
        return msgs + [{"role": "user", "content": self.prompt_template.format(prompt=sample.prompt)}]

    def prompt_ids(self, sample: Sample, tokenizer) -> list[int]:
        msgs = self.messages(sample)
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            return list(ids)
        return tokenizer("\n".join(m["content"] for m in msgs) + "\n", add_special_tokens=True)["input_ids"]

    # -- scoring -----------------------------------------------------------------------------
    def correct_reward(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        """Built-in reward: the task's verifier score (1 = correct)."""
        samples = columns["sample"]
        return [float(self.verifier(s, c)) for s, c in zip(samples, completions)]

    def majority_vote_reward(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        """TTRL's label-free reward (algorithms.md §11): among the completions of the same prompt in
        this batch, the most common extracted answer is the pseudo-label; a completion scores 1 when
        its answer is that label, else 0 (no answer: 0). Ties go to the answer seen first."""
        from collections import Counter
        answers = [self.answer_of(c) for c in completions]
        keys = [s.id for s in columns["sample"]]
        label: dict = {}
        for key in dict.fromkeys(keys):
            votes = Counter(a for a, k in zip(answers, keys) if k == key and a is not None)
            label[key] = votes.most_common(1)[0][0] if votes else None
        return [float(a is not None and a == label[k]) for a, k in zip(answers, keys)]

    def tool_answer_reward(self, prompts: list[str], completions: list[str], *, format_penalty: float = -1.0,
                           tool_bonus: float = 0.1, tool_tags: tuple[str, ...] = ("python", "search", "calculator"),
                           answer_tag: str = "answer", **columns) -> list[float]:
        """ARPO's reward scheme (algorithms.md §2), as a built-in reward:
            format_penalty (-1) unless the completion has exactly one <answer>...</answer> block and no
                           tool block left open;
            else the verifier's score, plus tool_bonus (0.1) when the score is positive and the policy
                           closed at least one tool block (<python>...</python>, ...).
        ARPO's own format check also wants <think> pairs and \\boxed{} answers; ours checks what forkrl's
        protocol requires."""
        out = []
        for s, c in zip(columns["sample"], completions):
            n_answers = len(re.findall(rf"<{answer_tag}>.*?</{answer_tag}>", c, re.DOTALL))
            unclosed = any(c.count(f"<{t}>") != c.count(f"</{t}>") for t in tool_tags)
            if n_answers != 1 or unclosed:
                out.append(format_penalty)
                continue
            score = float(self.verifier(s, c))
            used = any(f"</{t}>" in c for t in tool_tags)
            out.append(score + (tool_bonus if score > 0 and used else 0.0))
        return out

    def score(self, samples: list[Sample], completions: list[str], completion_ids: list[list[int]] | None = None
              ) -> tuple[dict[str, list[float]], list[float], list[float]]:
        """Returns (reward per function, weighted total, correctness in {0, 1}) per completion.
        Reward functions also receive `completion_ids` (as in TRL) when the caller has them."""
        prompts = [s.prompt for s in samples]
        columns: dict[str, list[Any]] = {"answer": [s.answer for s in samples], "sample": samples,
                                         "sample_id": [s.id for s in samples]}
        if completion_ids is not None:
            columns["completion_ids"] = completion_ids
        for key in {k for s in samples for k in s.columns}:
            columns.setdefault(key, [s.columns.get(key) for s in samples])
        per_fn: dict[str, list[float]] = {}
        for r in self.rewards:
            per_fn[r.name] = self._call_reward(r, prompts, completions, columns, samples)
        total = [sum(r.weight * per_fn[r.name][i] for r in self.rewards) for i in range(len(samples))]
        return per_fn, total, self.correct(samples, completions)

    def correct(self, samples: list[Sample], completions: list[str]) -> list[float]:
        """1.0 where the verifier scores a completion fully correct, else 0.0."""
        return [1.0 if self.verifier(s, c) >= 1.0 else 0.0 for s, c in zip(samples, completions)]

    @staticmethod
    def _call_reward(r: WeightedReward, prompts, completions, columns, samples) -> list[float]:
        try:
            values = r.fn(prompts, completions, **columns)
        except Exception as batch_error:
            # find the first sample that fails on its own, so the message can name it
            for i, s in enumerate(samples):
                try:
                    r.fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
                except Exception as e:
                    raise RewardFunctionError(
                        f"reward function {r.name!r} failed on sample {s.id!r} (prompt {s.prompt[:80]!r}, "
                        f"completion {completions[i][:80]!r}): {type(e).__name__}: {e}") from e
            raise RewardFunctionError(f"reward function {r.name!r} failed on a batch of {len(samples)}: "
                                      f"{type(batch_error).__name__}: {batch_error}") from batch_error
        values = list(values)
        if len(values) != len(completions):
            raise RewardFunctionError(f"reward function {r.name!r} returned {len(values)} values "
                                      f"for {len(completions)} completions")
        for i, v in enumerate(values):
            if v is None or not math.isfinite(float(v)):
                raise RewardFunctionError(f"reward function {r.name!r} returned {v!r} for sample "
                                          f"{samples[i].id!r} (prompt {samples[i].prompt[:80]!r})")
        return [float(v) for v in values]


# -- built-in rewards, by name (task.rewards[].name). `from_task`: the reward needs the task's
# verifier, so the registered function takes the Task and returns the reward function.
@register_reward("format")
def format_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1 when the completion puts its answer in <answer>...</answer> tags."""
    return [1.0 if extract_answer(c, "answer_tag") is not None else 0.0 for c in completions]


@register_reward("correct", from_task=True)
def _correct(task: Task) -> RewardFn:
    return task.correct_reward


@register_reward("tool_answer", from_task=True)
def _tool_answer(task: Task) -> RewardFn:
    return task.tool_answer_reward


@register_reward("majority_vote", from_task=True)
def _majority_vote(task: Task) -> RewardFn:
    return task.majority_vote_reward


def _content_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.split()).encode()).hexdigest()


def disjoint_eval(train: list[Sample], candidates: list[Sample], size: int, task: str) -> list[Sample]:
    """Held-out samples whose prompt text appears neither in `train` nor earlier in the held-out set."""
    seen = {_content_key(s.prompt) for s in train}
    out = []
    for s in candidates:
        key = _content_key(s.prompt)
        if key not in seen:
            seen.add(key)
            out.append(s)
            if len(out) == size:
                break
    if len(out) < size:
        log.warning("task %s: only %d held-out prompts are disjoint from the training prompts (asked for %d)",
                    task, len(out), size)
    return out


# -- sources: each registered one builds a Task from the `task` config section ----------------------
@register_task_source("reasoning_gym")
def _from_reasoning_gym(cfg, seed: int = 0, **common) -> Task:
    return reasoning_gym_task(cfg.dataset, config=cfg.dataset_config, seed=seed, train_size=cfg.train_size,
                              eval_size=cfg.eval_size, extractor=cfg.extractor, **common)


@register_task_source("file")
def _from_file(cfg, seed: int = 0, **common) -> Task:
    return file_task(cfg.train_path, eval_path=cfg.eval_path, prompt_field=cfg.prompt_field,
                     answer_field=cfg.answer_field, eval_size=cfg.eval_size, extractor=cfg.extractor, **common)


def reasoning_gym_task(dataset: str, *, config: dict | None = None, seed: int = 0, train_size: int = 1000,
                       eval_size: int = 100, extractor: str = "auto", **task_kwargs) -> Task:
    """Any reasoning-gym dataset by name; its own `score_answer` is the verifier.

    Training samples come from `seed`, held-out ones from a disjoint seed and are deduplicated
    against the training prompts by content.
    """
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("reasoning-gym tasks need the package reasoning-gym: pip install reasoning-gym") from e
    config = dict(config or {})
    known = sorted(reasoning_gym.factory.DATASETS)
    if dataset not in known:
        raise ValueError(f"unknown reasoning-gym dataset {dataset!r}; available: {', '.join(known)}")
    train_ds = reasoning_gym.create_dataset(dataset, seed=seed, size=train_size, **config)
    eval_seed = seed + 1_000_003  # disjoint from the training seed by construction
    eval_ds = reasoning_gym.create_dataset(dataset, seed=eval_seed, size=max(eval_size * 20, 200), **config)

    def to_samples(ds, split):
        return [Sample(id=f"{dataset}/{split}/{i}", prompt=e["question"], answer=str(e["answer"]),
                       columns={"entry": e}) for i, e in enumerate(ds)]

    train = to_samples(train_ds, "train")
    held_out = disjoint_eval(train, to_samples(eval_ds, "eval"), eval_size, dataset)

    def verifier(sample: Sample, completion: str) -> float:
        return float(train_ds.score_answer(extract_answer(completion, extractor), sample.columns["entry"]))

    task = Task(f"reasoning_gym/{dataset}", train, held_out, verifier=verifier, **task_kwargs)
    task.answer_of = lambda completion: extract_answer(completion, extractor)
    return task


def _file_samples(path: str, prompt_field: str, answer_field: str | None) -> list[Sample]:
    samples = []
    for lineno, row in read_rows(path):
        if prompt_field not in row or not isinstance(row[prompt_field], str):
            raise ValueError(f"{path}:{lineno}: row has no text field {prompt_field!r} (fields: {sorted(row)})")
        if answer_field and answer_field not in row:
            raise ValueError(f"{path}:{lineno}: row has no answer field {answer_field!r} (fields: {sorted(row)})")
        answer = None if not answer_field else str(row[answer_field])
        cols = {k: v for k, v in row.items() if k not in (prompt_field,)}
        samples.append(Sample(id=f"{Path(path).name}:{lineno}", prompt=row[prompt_field], answer=answer, columns=cols))
    return samples


def file_task(train_path: str, *, eval_path: str | None = None, prompt_field: str = "prompt",
              answer_field: str | None = "answer", eval_size: int = 100, extractor: str = "auto",
              **task_kwargs) -> Task:
    """Prompts from local jsonl/parquet files. Without `eval_path`, a deterministic content hash
    splits off up to `eval_size` held-out prompts. Correctness compares the extracted answer with
    `answer_field` (exact, numeric, then math-verify equivalence)."""
    train = _file_samples(train_path, prompt_field, answer_field)
    if eval_path:
        held_out = disjoint_eval(train, _file_samples(eval_path, prompt_field, answer_field), eval_size, train_path)
    else:
        ranked = sorted(train, key=lambda s: _content_key(s.prompt))
        held_out = disjoint_eval([], ranked, min(eval_size, len(train) // 5), train_path)
        held_keys = {_content_key(s.prompt) for s in held_out}
        train = [s for s in train if _content_key(s.prompt) not in held_keys]

    def verifier(sample: Sample, completion: str) -> float:
        if sample.answer is None:
            return 0.0
        return 1.0 if answers_match(extract_answer(completion, extractor), sample.answer) else 0.0

    task = Task(f"file/{Path(train_path).stem}", train, held_out, verifier=verifier, **task_kwargs)
    task.answer_of = lambda completion: extract_answer(completion, extractor)
    return task
