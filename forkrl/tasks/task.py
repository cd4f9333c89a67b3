"""Tasks: prompt sources with verifiable rewards.

A `Task` holds train and held-out `Sample`s, turns a sample into chat-formatted prompt tokens, and
scores completions with one or more weighted reward functions, called as TRL calls them (by keyword:
`prompts`, `completions`, `completion_ids` and every column of the data rows) or as verl calls its
`compute_score` (forkrl.tasks.reward_calls).

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

from forkrl.errors import DataError, RewardFunctionError
from forkrl.io import read_rows
from forkrl.registry import register_reward, register_task_source
from forkrl.tasks.answers import answers_match, extract_answer
from forkrl.tasks.reward_calls import (
    call_trl,
    call_verl,
    call_with_deadline,
    check_signature,
    reward_style,
)
from forkrl.types import Sample

log = logging.getLogger(__name__)
RewardFn = Callable[..., list[float]]


@dataclass
class WeightedReward:
    """A reward function, its weight in the total and its calling convention (forkrl.tasks.reward_calls:
    trl | verl | builtin; auto: recognised from the signature)."""
    name: str
    fn: RewardFn
    weight: float = 1.0
    style: str = "auto"

    def __post_init__(self):
        self.style = reward_style(self.fn, self.style)


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` ready for the assistant's reply: the chat template, or the contents one
    per line for a tokenizer without one."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return tokenizer("\n".join(m["content"] for m in messages) + "\n", add_special_tokens=True)["input_ids"]


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
        self._warned_no_reward = False  # "every reward returned None" is logged once
        self.reward_timeout_s: float | None = None  # a deadline on each reward call (task.reward_timeout_s)
        self.train = train
        self.eval = eval
        self.verifier = verifier
        self.system_prompt = system_prompt
        self.prompt_template = prompt_template
        self.rewards = rewards if rewards is not None else [WeightedReward("correct", self.correct_reward,
                                                                           style="builtin")]
        if not train:
            raise ValueError(f"task {name!r} has no training samples")

    @classmethod
    def from_dataset(cls, dataset, **kwargs) -> Task:
        """A Task from a `datasets.Dataset` in TRL's or verl's format (see `task_from_dataset`)."""
        return task_from_dataset(dataset, **kwargs)

    def answer_of(self, completion: str) -> str | None:
        """The final answer a completion gives (majority voting compares these); tasks built from an
        extractor replace it."""
        return completion.strip() or None

    # -- prompts -----------------------------------------------------------------------------
    def messages(self, sample: Sample) -> list[dict[str, str]]:
        if sample.messages is not None:  # a conversational prompt is used as given
            has_system = any(m.get("role") == "system" for m in sample.messages)
            system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt and not has_system else []
            return system + [dict(m) for m in sample.messages]
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for shot in self.few_shot:
            msgs += [{"role": "user", "content": shot["user"]}, {"role": "assistant", "content": shot["assistant"]}]
        return msgs + [{"role": "user", "content": self.prompt_template.format(prompt=sample.prompt)}]

    def prompt_ids(self, sample: Sample, tokenizer) -> list[int]:
        return chat_prompt_ids(tokenizer, self.messages(sample))

    def check_prompt_lengths(self, tokenizer, max_prompt_tokens: int, why: str) -> None:
        """Raise a DataError naming the first row whose prompt is longer than `max_prompt_tokens` (the
        model's context less the tokens it may generate, `why`). Only rows that could be too long are
        tokenized: a byte-level tokenizer gives at most one token per UTF-8 byte of a prompt, on top of
        what the template, system prompt and few-shot turns add (measured once, on an empty prompt)."""
        base = None
        for sample in [*self.train, *self.eval]:
            size = sum(len(str(m.get("content", "")).encode()) for m in sample.messages or []) + len(sample.prompt.encode())
            if base is None:
                base = len(self.prompt_ids(Sample(id="", prompt=""), tokenizer))
            if size + base <= max_prompt_tokens:
                continue
            n = len(self.prompt_ids(sample, tokenizer))
            if n > max_prompt_tokens:
                raise DataError(f"{sample.id}: the prompt is {n} tokens, more than the {max_prompt_tokens} that fit "
                                f"({why}); shorten or drop the row")

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

    def column_names(self) -> set[str]:
        """The keyword arguments a TRL-style reward function may ask for besides prompts/completions."""
        names = {"answer", "sample", "sample_id"}
        for s in self.train[:1000] + self.eval[:1000]:
            names.update(s.columns)
        return names

    def check_rewards(self) -> None:
        """Each reward function's signature against what it will be called with (before weights load)."""
        columns = self.column_names()
        for r in self.rewards:
            if r.style != "builtin":
                check_signature(r.name, r.fn, r.style, columns)

    def score(self, samples: list[Sample], completions: list[str], completion_ids: list[list[int]] | None = None
              ) -> tuple[dict[str, list[float]], list[float], list[float]]:
        """Returns (reward per function, weighted total, correctness in {0, 1}) per completion.

        A reward function's `None` (NaN in the per-function values) leaves that function out of the
        sample's weighted sum, as in TRL; a sample no function applies to gets 0 and a warning."""
        columns: dict[str, list[Any]] = {"answer": [s.answer for s in samples], "sample": samples,
                                         "sample_id": [s.id for s in samples]}
        for key in {k for s in samples for k in s.columns}:
            columns.setdefault(key, [s.columns.get(key) for s in samples])
        per_fn: dict[str, list[float]] = {}
        for r in self.rewards:
            per_fn[r.name] = self._call_reward(r, samples, completions, completion_ids, columns)
        total = []
        for i, s in enumerate(samples):
            applied = [r.weight * per_fn[r.name][i] for r in self.rewards if not math.isnan(per_fn[r.name][i])]
            if not applied and not self._warned_no_reward:
                self._warned_no_reward = True
                log.warning("every reward function returned None for sample %r: its reward is 0 (reported once)", s.id)
            total.append(float(sum(applied)))
        return per_fn, total, self.correct(samples, completions)

    def correct(self, samples: list[Sample], completions: list[str]) -> list[float]:
        """1.0 where the verifier scores a completion fully correct, else 0.0."""
        return [1.0 if self.verifier(s, c) >= 1.0 else 0.0 for s, c in zip(samples, completions)]

    @staticmethod
    def _invoke(r: WeightedReward, samples: list[Sample], completions: list[str],
                completion_ids: list[list[int]] | None, columns: dict[str, list]) -> list:
        if r.style == "verl":
            return call_verl(r.fn, [s.columns.get("data_source", "forkrl") for s in samples], completions,
                             [s.answer for s in samples], [s.columns.get("extra_info") for s in samples])
        conversational = r.style != "builtin" and any(s.messages is not None for s in samples)
        keywords = dict(columns)
        if conversational:  # TRL: message lists in, message lists out
            keywords["prompts"] = [s.messages if s.messages is not None else s.prompt for s in samples]
            keywords["completions"] = [[{"role": "assistant", "content": c}] if s.messages is not None else c
                                       for s, c in zip(samples, completions)]
        else:
            keywords["prompts"], keywords["completions"] = [s.prompt for s in samples], list(completions)
        if completion_ids is not None:
            keywords["completion_ids"] = completion_ids
        return call_trl(r.fn, keywords)

    def _call_reward(self, r: WeightedReward, samples, completions, completion_ids, columns) -> list[float]:
        def invoke(rows: slice):
            ids = completion_ids[rows] if completion_ids is not None else None
            call = lambda: self._invoke(r, samples[rows], completions[rows], ids,  # noqa: E731
                                        {k: v[rows] for k, v in columns.items()})
            try:
                return call_with_deadline(call, self.reward_timeout_s)
            except SystemExit as e:  # user code may not end the run: it becomes this sample's error
                raise RuntimeError(f"called sys.exit({e.code!r})") from e

        try:
            values = invoke(slice(None))
        except Exception as batch_error:
            # find the first sample that fails on its own, so the message can name it
            for i, s in enumerate(samples):
                try:
                    invoke(slice(i, i + 1))
                except Exception as e:
                    raise RewardFunctionError(
                        f"reward function {r.name!r} failed on sample {s.id!r} (prompt {s.prompt[:80]!r}, "
                        f"completion {completions[i][:80]!r}): {type(e).__name__}: {e}") from e
            raise RewardFunctionError(f"reward function {r.name!r} failed on a batch of {len(samples)}: "
                                      f"{type(batch_error).__name__}: {batch_error}") from batch_error
        if len(values) != len(completions):
            raise RewardFunctionError(f"reward function {r.name!r} returned {len(values)} values "
                                      f"for {len(completions)} completions")
        out = []
        for i, v in enumerate(values):
            if v is None:  # TRL's "does not apply to this sample"
                out.append(math.nan)
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                v = math.nan
            if not math.isfinite(v):
                raise RewardFunctionError(f"reward function {r.name!r} returned {values[i]!r} for sample "
                                          f"{samples[i].id!r} (prompt {samples[i].prompt[:80]!r}); return a "
                                          "finite number, or None where the reward does not apply")
            out.append(v)
        return out


# -- built-in rewards, by name (task.rewards[].name). `from_task`: the reward needs the task's
# verifier, so the registered function takes the Task and returns the reward function.
@register_reward("episode_reward")
def episode_reward(prompts: list[str], completions: list[str], episode_reward: list | None = None, **_) -> list[float]:
    """What an agent program returned for its episode (rollout.sampler: agent_program), as it is."""
    if episode_reward is None:
        raise ValueError("the episode_reward reward needs rollout.sampler: agent_program")
    return [float(r) for r in episode_reward]


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
    """Held-out samples whose prompt text appears neither in `train` nor earlier in the held-out set.
    None at all is an error (a run could not be scored); fewer than `size`, a warning."""
    seen = {_content_key(s.prompt) for s in train}
    out = []
    for s in candidates:
        key = _content_key(s.prompt)
        if key not in seen:
            seen.add(key)
            out.append(s)
            if len(out) == size:
                break
    if not out:
        distinct = len({_content_key(s.prompt) for s in train})
        raise DataError(f"task {task}: no held-out prompt is disjoint from the training prompts ({len(train)} "
                        f"training prompts, {distinct} distinct); lower task.train_size, make the task harder "
                        "(task.dataset_config) or give a held-out file (task.eval_path)")
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


@register_task_source("hf")
def _from_hf(cfg, seed: int = 0, **common) -> Task:
    train = load_hf_rows(cfg.dataset, cfg.split, cfg.load_kwargs)
    held_out = load_hf_rows(cfg.dataset, cfg.eval_split, cfg.load_kwargs) if cfg.eval_split else None
    return rows_task(f"hf/{Path(cfg.dataset).stem if Path(cfg.dataset).exists() else cfg.dataset}", train, held_out,
                     prompt_field=cfg.prompt_field, answer_field=cfg.answer_field, eval_size=cfg.eval_size,
                     extractor=cfg.extractor, **common)


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
        raise DataError(f"unknown reasoning-gym dataset {dataset!r}; available: {', '.join(known)}")
    try:
        train_ds = reasoning_gym.create_dataset(dataset, seed=seed, size=train_size, **config)
        eval_seed = seed + 1_000_003  # disjoint from the training seed by construction
        eval_ds = reasoning_gym.create_dataset(dataset, seed=eval_seed, size=max(eval_size * 20, 200), **config)
    except (TypeError, ValueError, AssertionError) as e:
        raise DataError(f"task.dataset_config for reasoning-gym {dataset!r}: {type(e).__name__}: {e}") from None

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


# answers of well-known formats, looked for in this order when answer_field is left at its default
DEFAULT_ANSWER_FIELDS = ("answer", "reward_model.ground_truth", "ground_truth", "solution")


def _dotted(row: dict, field: str):
    """row["a"]["b"] for "a.b"; KeyError when any part is missing."""
    node: Any = row
    for part in field.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(field)
        node = node[part]
    return node


def _plain(value):
    """numpy arrays (pandas' parquet lists) as Python lists, recursively."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _is_messages(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def samples_from_rows(rows, prompt_field: str = "prompt", answer_field: str | None = "answer") -> list[Sample]:
    """Samples from (where, row) pairs, `where` naming the file and line for errors. A prompt is a
    string or a list of chat messages (TRL's conversational format, verl's parquet); `answer_field`
    may be dotted (`reward_model.ground_truth`); at its default it tries DEFAULT_ANSWER_FIELDS."""
    samples = []
    for where, row in rows:
        row = _plain(row)
        prompt = row.get(prompt_field)
        messages = None
        if _is_messages(prompt):
            messages = prompt
            users = [m["content"] for m in prompt if m["role"] == "user"]
            prompt = users[-1] if users else prompt[-1]["content"]
        if not isinstance(prompt, str):
            raise DataError(f"{where}: row has no text or chat-message field {prompt_field!r} (fields: {sorted(row)})")
        candidates = DEFAULT_ANSWER_FIELDS if answer_field == "answer" else (answer_field,) if answer_field else ()
        answer = None
        for field in candidates:
            try:
                answer = _dotted(row, field)
            except KeyError:
                continue
            if answer is None:  # not the string "None", which a verifier could match
                raise DataError(f"{where}: the answer field {field!r} is null; give every row an answer, or set "
                                "task.answer_field: null for rewards that need none")
            break
        else:
            if answer_field and answer_field != "answer":
                raise DataError(f"{where}: row has no answer field {answer_field!r} (fields: {sorted(row)})")
        cols = {k: v for k, v in row.items() if k != prompt_field}
        samples.append(Sample(id=where, prompt=prompt, answer=None if answer is None else str(answer), columns=cols,
                              messages=messages))
    return samples


def load_hf_rows(dataset: str, split: str, options: dict | None = None) -> list[tuple[str, dict]]:
    """(where, row) pairs of a Hugging Face dataset: a hub name, a local json/jsonl/parquet/csv/arrow
    file, or a folder written by `Dataset.save_to_disk`; `datasets.load_dataset` underneath."""
    try:
        import datasets
    except ImportError:
        from forkrl.errors import missing_dependency
        raise missing_dependency("datasets", None, "task.source=hf") from None
    path = Path(dataset)
    kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        elif path.suffix in kinds:
            if not path.exists():
                raise DataError(f"data file not found: {path}")
            ds = datasets.load_dataset(kinds[path.suffix], data_files={split: str(path)}, split=split, **(options or {}))
        else:
            ds = datasets.load_dataset(dataset, split=split, **(options or {}))
    except DataError:
        raise
    except KeyError:
        raise DataError(f"dataset {dataset!r} has no split {split!r}") from None
    except Exception as e:  # the hub unreachable, a bad name or a malformed file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"cannot load dataset {dataset!r} (split {split!r}): {type(e).__name__}: {first}") from None
    label = path.name if path.exists() else f"{dataset}[{split}]"
    return [(f"{label}:{i + 1}", row) for i, row in enumerate(ds)]


def rows_task(name: str, train_rows, eval_rows=None, *, prompt_field: str = "prompt",
              answer_field: str | None = "answer", eval_size: int = 100, extractor: str = "auto",
              **task_kwargs) -> Task:
    """A task over data rows. Without `eval_rows`, a deterministic content hash holds out up to
    `eval_size` prompts (at most a fifth). Correctness compares the extracted answer with the row's
    answer (exact, numeric, then math-verify equivalence)."""
    train = samples_from_rows(train_rows, prompt_field, answer_field)
    if not train:
        raise DataError(f"task {name}: the training data has no rows")
    if eval_rows is not None:
        held_out = disjoint_eval(train, samples_from_rows(eval_rows, prompt_field, answer_field), eval_size, name)
    else:
        ranked = sorted(train, key=lambda s: _content_key(s.prompt))
        held_out = disjoint_eval([], ranked, max(min(eval_size, len(train) // 5), 1), name)
        held_keys = {_content_key(s.prompt) for s in held_out}
        train = [s for s in train if _content_key(s.prompt) not in held_keys]
        if not train:
            raise DataError(f"task {name}: too few distinct prompts to hold any out ({len(held_out)})")

    def verifier(sample: Sample, completion: str) -> float:
        if sample.answer is None:
            return 0.0
        return 1.0 if answers_match(extract_answer(completion, extractor), sample.answer) else 0.0

    task = Task(name, train, held_out, verifier=verifier, **task_kwargs)
    task.answer_of = lambda completion: extract_answer(completion, extractor)
    return task


def file_task(train_path: str, *, eval_path: str | None = None, prompt_field: str = "prompt",
              answer_field: str | None = "answer", eval_size: int = 100, extractor: str = "auto",
              **task_kwargs) -> Task:
    """Prompts from local jsonl/json/parquet files (see `rows_task`); a bad row names file and line."""
    def rows(path):
        return [(f"{Path(path).name}:{lineno}", row) for lineno, row in read_rows(path)]
    return rows_task(f"file/{Path(train_path).stem}", rows(train_path), rows(eval_path) if eval_path else None,
                     prompt_field=prompt_field, answer_field=answer_field, eval_size=eval_size, extractor=extractor,
                     **task_kwargs)


def task_from_dataset(dataset, *, eval_dataset=None, name: str | None = None, prompt_field: str = "prompt",
                      answer_field: str | None = "answer", eval_size: int = 100, extractor: str = "auto",
                      rewards: list[WeightedReward] | None = None, **task_kwargs) -> Task:
    """A Task from a `datasets.Dataset` (or any sequence of row dicts) in TRL's or verl's format.

        task = Task.from_dataset(load_dataset("json", data_files="train.jsonl", split="train"))
    """
    label = name or getattr(getattr(dataset, "info", None), "dataset_name", None) or "dataset"
    to_rows = (lambda ds: [(f"{label}:{i + 1}", row) for i, row in enumerate(ds)])
    task = rows_task(label, to_rows(dataset), to_rows(eval_dataset) if eval_dataset is not None else None,
                     prompt_field=prompt_field, answer_field=answer_field, eval_size=eval_size,
                     extractor=extractor, **task_kwargs)
    if rewards is not None:
        task.rewards = rewards
        task.check_rewards()
    return task

