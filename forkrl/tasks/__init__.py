"""Prompt sources and verifiable rewards (see `build_task`)."""
import functools

from forkrl.errors import RewardFunctionError, UserError
from forkrl.io import load_function
from forkrl.registry import REWARDS, TASK_SOURCES
from forkrl.tasks.answers import answers_match, extract_answer
from forkrl.tasks.task import (
    Sample,
    Task,
    WeightedReward,
    file_task,
    reasoning_gym_task,
    task_from_dataset,
)


def build_task(cfg, seed: int = 0) -> Task:
    """A Task from a `TaskConfig` through the registered source `cfg.source`; `seed` picks the
    procedural training samples. Rewards: registered built-ins by name, or `module:function`."""
    common = dict(system_prompt=cfg.system_prompt, prompt_template=cfg.prompt_template, few_shot=cfg.few_shot)
    task = TASK_SOURCES.get(cfg.source)(cfg, seed=seed, **common)
    rewards = []
    for i, r in enumerate(cfg.rewards):
        style = r.style
        if r.function:
            try:
                fn = load_function(r.function)
            except (ImportError, AttributeError, ValueError, SyntaxError, OSError) as e:
                raise UserError(f"task.rewards[{i}].function: {e}") from None
            name = r.name if r.name != "correct" else r.function.rsplit(":", 1)[-1]
        elif r.name in REWARDS:
            fn, name, style = REWARDS[r.name], r.name, "builtin"
            if REWARDS.hook(r.name, "from_task"):
                fn = fn(task)
        else:
            raise UserError(f"task.rewards[{i}]: unknown built-in reward {r.name!r}; built-ins: {REWARDS.names()}, "
                            "or give `function: module:function`")
        if r.params:
            fn = functools.partial(fn, **r.params)
        rewards.append(WeightedReward(name, fn, r.weight, style=style))
    task.rewards = rewards
    task.reward_timeout_s = cfg.reward_timeout_s
    task.check_rewards()
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
    "task_from_dataset",
]
