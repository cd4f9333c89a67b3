"""Prompt sources and verifiable rewards (see `build_task`)."""
import functools

from forkrl.tasks.answers import answers_match, extract_answer
from forkrl.tasks.task import (
    BUILTIN_REWARDS,
    RewardFunctionError,
    Sample,
    Task,
    WeightedReward,
    file_task,
    load_function,
    reasoning_gym_task,
)


def build_task(cfg, seed: int = 0) -> Task:
    """A Task from a `TaskConfig`; `seed` picks the procedural training samples."""
    common = dict(system_prompt=cfg.system_prompt, prompt_template=cfg.prompt_template, few_shot=cfg.few_shot)
    if cfg.source == "reasoning_gym":
        task = reasoning_gym_task(cfg.dataset, config=cfg.dataset_config, seed=seed,
                                  train_size=cfg.train_size, eval_size=cfg.eval_size, extractor=cfg.extractor, **common)
    else:
        task = file_task(cfg.train_path, eval_path=cfg.eval_path, prompt_field=cfg.prompt_field,
                         answer_field=cfg.answer_field, eval_size=cfg.eval_size, extractor=cfg.extractor, **common)
    rewards = []
    for r in cfg.rewards:
        if r.function:
            fn = load_function(r.function)
            name = r.name if r.name != "correct" else r.function.rsplit(":", 1)[-1]
        elif r.name == "correct":
            fn, name = task.correct_reward, "correct"
        elif r.name == "tool_answer":
            fn, name = task.tool_answer_reward, "tool_answer"
        elif r.name == "majority_vote":
            fn, name = task.majority_vote_reward, "majority_vote"
        elif r.name in BUILTIN_REWARDS:
            fn, name = BUILTIN_REWARDS[r.name], r.name
        else:
            raise ValueError(f"task.rewards: unknown built-in reward {r.name!r}; built-ins: "
                             f"{['correct', 'tool_answer', 'majority_vote', *BUILTIN_REWARDS]}, or give `function: module:function`")
        if r.params:
            fn = functools.partial(fn, **r.params)
        rewards.append(WeightedReward(name, fn, r.weight))
    task.rewards = rewards
    return task


__all__ = [
    "RewardFunctionError",
    "Sample",
    "Task",
    "WeightedReward",
    "answers_match",
    "build_task",
    "extract_answer",
    "file_task",
    "load_function",
    "reasoning_gym_task",
]
