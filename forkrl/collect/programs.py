"""Program-writing tasks judged by running the program (algorithms.md §22): the completion is a Python
program, run in the sandbox (forkrl.envs.sandbox, never in this process); it is correct when the last
number it prints is the sample's answer.

    task: {source: programs, train_path: data/programs/train.jsonl, eval_path: ...,
           reward_terms: [{name: milestones}]}

The `milestones` reward term gives partial credit for progress: the program is instrumented before it runs
(forkrl.envs.instrument: marker prints with a fresh nonce after the statements that load data,
compute and print), and a program that does not get the answer right earns `credit` for each marker
its output shows; a correct one earns `full`. The credit values are UNVERIFIED in the paper (§22);
ours are 0.1 per milestone (4 milestones: at most 0.4) and 1.0.

This module sits with the collector because it joins a task (forkrl.tasks) and the sandbox
(forkrl.envs), which do not import each other.
"""
from __future__ import annotations

import functools
import math
import re

from forkrl.envs.instrument import instrument, read_milestones
from forkrl.envs.sandbox import PythonSandbox, SandboxLimits
from forkrl.registry import register_reward_term, register_task_source
from forkrl.tasks.answers import last_number
from forkrl.tasks.task import Task, file_task
from forkrl.types import ToolCall

_FENCED = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)
_TAGGED = re.compile(r"<python>(.*?)</python>", re.DOTALL)


def extract_program(completion: str) -> str:
    """The first ```python fenced block, else the first <python> block, else the whole completion."""
    m = _FENCED.search(completion) or _TAGGED.search(completion)
    return (m.group(1) if m else completion).strip("\n")


@functools.lru_cache(maxsize=4)
def program_sandbox(isolation: str = "auto", timeout_s: float = 5.0) -> PythonSandbox:
    """One sandbox per setting, shared by the verifier and the reward (a pool of worker threads)."""
    return PythonSandbox(SandboxLimits(timeout_s=timeout_s, cpu_s=max(1, math.ceil(timeout_s))), isolation=isolation)


def output_is_correct(output: str, answer: str) -> bool:
    got, want = last_number(output), last_number(str(answer))
    if got is None or want is None:
        return False
    try:
        return abs(float(got) - float(want)) <= 1e-6 * max(1.0, abs(float(want)))
    except ValueError:
        return False


@register_task_source("programs")
def programs_task(cfg, seed: int = 0, **common) -> Task:
    """Prompts and answers from files, as `source: file`; the verifier runs the completion's program in
    the sandbox (`task.dataset_config`: isolation (auto), timeout_s (5))."""
    options = dict(cfg.dataset_config or {})
    sandbox = program_sandbox(options.get("isolation", "auto"), float(options.get("timeout_s", 5.0)))
    task = file_task(cfg.train_path, eval_path=cfg.eval_path, prompt_field=cfg.prompt_field,
                     answer_field=cfg.answer_field, eval_size=cfg.eval_size, extractor="raw", **common)

    def verifier(sample, completion: str) -> float:
        result = sandbox.run(extract_program(completion))
        return float(output_is_correct(result.text, sample.answer))
    task.verifier = verifier
    return task


def milestone_rewards(completions: list[str], answers: list[str], sandbox: PythonSandbox, *, credit: float = 0.1,
                      full: float = 1.0) -> tuple[list[float], list[list[str]], list[float]]:
    """Per completion: `full` when its program prints the answer, else `credit` x the milestones its
    instrumented run reached (0 for a program that does not parse); the milestones; the seconds the
    run took. Runs the programs concurrently."""
    prepared = [instrument(extract_program(c)) for c in completions]
    runnable = [i for i, (code, _) in enumerate(prepared) if code is not None]
    results = dict(zip(runnable, sandbox.run_many([prepared[i][0] for i in runnable])))
    rewards, reached, seconds = [], [], []
    for i, ((code, nonce), answer) in enumerate(zip(prepared, answers)):
        if code is None:
            rewards.append(0.0)
            reached.append([])
            seconds.append(0.0)
            continue
        marks, output = read_milestones(results[i].text, nonce)
        reached.append(marks)
        seconds.append(results[i].seconds)
        rewards.append(full if output_is_correct(output, answer) else credit * len(marks))
    return rewards, reached, seconds


def _milestones_need_programs(cfg, **_) -> str | None:
    return None if cfg.task.source == "programs" else "needs task.source: programs (the completions are programs to run)"


@register_reward_term("milestones", check=_milestones_need_programs)
def milestones(trajs, ctx, *, credit: float = 0.1, full: float = 1.0, isolation: str = "auto",
               timeout_s: float = 5.0) -> dict:
    """Partial credit for a program's verified progress, in place of the task's reward (algorithms.md
    §22; see `milestone_rewards`). The run is the trajectory's action: it is recorded as a `program`
    tool call with the seconds it took, which duration-aware updates (algo.duration_weight) read.
    Logged per trajectory: reward/milestones (the credit) and reward/milestones_reached (how many)."""
    rewards, reached, seconds = milestone_rewards([t.text for t in trajs], [str(t.sample.answer) for t in trajs],
                                                  program_sandbox(isolation, timeout_s), credit=credit, full=full)
    for t, r, marks, s in zip(trajs, rewards, reached, seconds):
        t.rewards.update({"milestones": r, "milestones_reached": float(len(marks))})
        t.reward = r
        t.correct = 1.0 if r == full else 0.0
        end = len(t.tokens)
        t.tool_calls.append(ToolCall("program", (end, end), ok=bool(marks), seconds=s))
    return {}
