"""Flawed-positive detectors for FAPO (algorithms.md §13.5): does a correct answer rest on a wrong step?

A detector is any callable `(prompt, completion, answer) -> int`: the index of the earliest flawed
step of the completion, or -1 when it finds none. Two are here:

- `rule_based_flaws`: arithmetic claims `expr = value` that are false, and contradictory final
  answers (two different <answer> or \\boxed{} contents) — cheap, offline, no model.
- `GenerativeFlawDetector`: FAPO's generative reward model as an interface. Give it any
  `generate(list[str]) -> list[str]` (a served GenRM, a local model) and it builds the prompt with
  the problem, the reference answer and numbered steps, and parses the step index it answers.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from forkrl.arithmetic import eval_arithmetic

_STEP_SPLIT = re.compile(r"\n+|(?<=[.!?])\s+(?=[A-Z0-9])")
_NUMBER = r"-?\d+(?:\.\d+)?"
# an arithmetic claim: numbers joined by operators, "=", a number (e.g. "3 + 4 = 7", "12*3=36")
_CLAIM = re.compile(rf"((?:{_NUMBER}|[()])(?:\s*(?:[-+*/×x÷]|\*\*)\s*\(?\s*{_NUMBER}\s*\)?)+)\s*=\s*({_NUMBER})")
_ANSWER_BLOCKS = re.compile(r"<answer>(.*?)</answer>|\\boxed\{([^{}]*)\}", re.DOTALL)


def split_steps(completion: str) -> list[str]:
    """Non-empty lines, and sentences within a line: the unit a flaw index points at."""
    return [s.strip() for s in _STEP_SPLIT.split(completion) if s.strip()]


def rule_based_flaws(prompt: str, completion: str, answer: str | None = None) -> int:
    """Index (into `split_steps`) of the first step with a false arithmetic claim, or of the step that
    gives a final answer contradicting an earlier one; -1 when neither occurs."""
    steps = split_steps(completion)
    answers_seen: set[str] = set()
    for i, step in enumerate(steps):
        for m in _CLAIM.finditer(step):
            value = eval_arithmetic(m.group(1))
            if value is not None and abs(value - float(m.group(2))) > 1e-6 * max(1.0, abs(value)):
                return i
        for m in _ANSWER_BLOCKS.finditer(step):
            given = " ".join((m.group(1) or m.group(2) or "").split())
            if answers_seen and given not in answers_seen:
                return i
            answers_seen.add(given)
    return -1


FAPO_PROMPT = """You check a solution step by step.

Problem:
{problem}

Reference answer: {answer}

Solution steps:
{steps}

Find the earliest step that contains an error (a wrong calculation, an unjustified jump, or a guess).
Reply with its step number only, or -1 if every step is correct."""


class GenerativeFlawDetector:
    """FAPO's generative process reward model behind the detector interface (§13.5 b).

    `generate` maps prompts to replies (e.g. a vLLM/SGLang client for FAPO-GenRM-4B). The reply's last
    integer is the 0-based index of the first flawed step, -1 for none; a reply without an integer,
    or out of range, counts as -1 (no penalty without evidence).
    """

    def __init__(self, generate: Callable[[list[str]], list[str]], template: str = FAPO_PROMPT):
        self.generate = generate
        self.template = template

    def prompt(self, problem: str, completion: str, answer: str | None) -> str:
        steps = "\n".join(f"{i}. {s}" for i, s in enumerate(split_steps(completion)))
        return self.template.format(problem=problem, answer=answer, steps=steps)

    def batch(self, problems: list[str], completions: list[str], answers: list[str | None]) -> list[int]:
        replies = self.generate([self.prompt(p, c, a) for p, c, a in zip(problems, completions, answers)])
        out = []
        for reply, completion in zip(replies, completions):
            found = re.findall(r"-?\d+", reply or "")
            idx = int(found[-1]) if found else -1
            out.append(idx if 0 <= idx < len(split_steps(completion)) else -1)
        return out

    def __call__(self, problem: str, completion: str, answer: str | None = None) -> int:
        return self.batch([problem], [completion], [answer])[0]


def load_detector(spec: str) -> Callable[[str, str, str | None], int]:
    """"rule" or "module:callable" (a function, or a class/factory taking no arguments)."""
    if spec == "rule":
        return rule_based_flaws
    from forkrl.io import load_function
    fn = load_function(spec)
    return fn() if isinstance(fn, type) else fn
