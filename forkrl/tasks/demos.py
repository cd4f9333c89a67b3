"""Synthetic tool-use demonstrations for a cold-start SFT, written by rule-based solvers.

    python -m forkrl.tasks.demos configs/sft_tools.yaml runs/demos/chain_sum_tools.jsonl [--n 300]

For every training prompt of the recipe's task: the system prompt and the user turn as the task
renders them, then the episode a good agent would produce with forkrl's tag protocol — the tool call,
the tool's result (a `tool` message, masked in SFT) and the final answer.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from forkrl.arithmetic import eval_arithmetic

_EXPR = re.compile(r"(-?\d+(?:\s*[-+*/]\s*\(?-?\d+\)?)+)\s*=?\s*\??\s*$")


def arithmetic_episode(question: str, answer: str | None) -> list[dict]:
    """<python>print(EXPR)</python>, its output, then the result."""
    m = _EXPR.search(question.strip())
    if m is None:
        raise ValueError(f"no arithmetic expression at the end of {question!r}")
    expr = " ".join(m.group(1).split())
    value = eval_arithmetic(expr)
    if value is None:
        raise ValueError(f"cannot evaluate {expr!r}")
    result = str(int(value)) if value == int(value) else str(value)
    if answer is not None and str(answer).strip() != result:
        raise ValueError(f"solver gave {result} for {question!r}, the task says {answer}")
    return [{"role": "assistant", "content": f"<python>print({expr})</python>"},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": result}]


SOLVERS = {"chain_sum": arithmetic_episode, "basic_arithmetic": arithmetic_episode}


def demonstrations(task, dataset: str, n: int | None = None) -> list[dict]:
    """{"messages": [...]} rows for the task's training samples (all of them, or the first n)."""
    if dataset not in SOLVERS:
        raise ValueError(f"no rule-based solver for {dataset!r}; available: {sorted(SOLVERS)}")
    solve = SOLVERS[dataset]
    rows = []
    for s in task.train[:n]:
        head = task.messages(s)
        rows.append({"messages": head + solve(s.prompt, s.answer)})
    return rows


def main(argv: list[str] | None = None) -> None:
    from forkrl.config import load_config
    from forkrl.tasks import build_task

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=None, help="at most this many (default: every training prompt)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    task = build_task(cfg.task, seed=cfg.seed)
    rows = demonstrations(task, cfg.task.dataset, args.n)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps({"demonstrations": len(rows), "out": str(out)}))


if __name__ == "__main__":
    main()
