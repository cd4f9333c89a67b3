"""Prompt sources and verifiable rewards (see `build_task`)."""
import functools

from forkrl.io import load_function
from forkrl.registry import REWARDS, TASK_SOURCES
from forkrl.tasks.answers import answers_match, extract_answer
from forkrl.tasks.task import (
    RewardFunctionError,
    Sample,
    Task,
    WeightedReward,
    file_task,
    reasoning_gym_task,
)


def build_task(cfg, seed: int = 0) -> Task:
    """A Task from a `TaskConfig` through the registered source `cfg.source`; `seed` picks the
    procedural training samples. Rewards: registered built-ins by name, or `module:function`."""
    common = dict(system_prompt=cfg.system_prompt, prompt_template=cfg.prompt_template, few_shot=cfg.few_shot)
    task = TASK_SOURCES.get(cfg.source)(cfg, seed=seed, **common)
    rewards = []
    for r in cfg.rewards:
        if r.function:
            fn = load_function(r.function)
            name = r.name if r.name != "correct" else r.function.rsplit(":", 1)[-1]
        elif r.name in REWARDS:
            fn, name = REWARDS[r.name], r.name
            if REWARDS.hook(r.name, "from_task"):
                fn = fn(task)
        else:
            raise ValueError(f"task.rewards: unknown built-in reward {r.name!r}; built-ins: {REWARDS.names()}, "
                             "or give `function: module:function`")
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
