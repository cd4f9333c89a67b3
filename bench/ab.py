"""A/B one benchmark between two revisions of forkrl, in one run on one machine: ratios, not absolute
figures (other processes skew those alike for both sides when the runs alternate).

    python bench/ab.py --before 5419cb4 [--after HEAD] [--rounds 2] -- bench/rollout.py --dtypes bfloat16

Each revision is checked out once into a git worktree under /tmp (the working tree itself, when
`--after` is omitted), and the script runs there with that tree first on PYTHONPATH, alternating
before, after, before, after, ... `--rounds` times. The last JSON object a run prints (or its line
starting with RESULT) is its result; numeric leaves are compared by their medians over the rounds.
Prints JSON: both sides' runs, and after/before per numeric leaf.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worktree(rev: str) -> Path:
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    path = Path("/tmp") / f"forkrl-ab-{sha[:10]}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    start = stdout.rfind("\n{")
    return json.loads(stdout[start + 1 if start >= 0 else stdout.index("{"):])


def leaves(obj, prefix: str = "") -> dict[str, float]:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(leaves(v, f"{prefix}{k}/"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(leaves(v, f"{prefix}{i}/"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip("/")] = float(obj)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", default=None, help="a revision (default: this working tree)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]: a path relative to the repository")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the benchmark after --, e.g. -- bench/rollout.py --dtypes bfloat16")
    trees = {"before": worktree(args.before), "after": worktree(args.after) if args.after else ROOT}
    runs: dict[str, list] = {"before": [], "after": []}
    for r in range(args.rounds):
        for side in ("before", "after"):
            tree = trees[side]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
            proc = subprocess.run([sys.executable, str(tree / command[0]), *command[1:]], cwd=tree, env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{side} (round {r + 1}) failed:\n{proc.stderr[-3000:]}")
            runs[side].append(last_json(proc.stdout))
            print(f"{side} round {r + 1} done", file=sys.stderr, flush=True)
    medians = {side: {} for side in runs}
    for side, results in runs.items():
        flat = [leaves(x) for x in results]
        for key in flat[0]:
            values = [f[key] for f in flat if key in f]
            medians[side][key] = statistics.median(values)
    ratios = {k: round(medians["after"][k] / v, 3) for k, v in medians["before"].items()
              if k in medians["after"] and v}
    print(json.dumps({"command": command, "before": args.before, "after": args.after or "working tree",
                      "rounds": args.rounds, "ratios_after_over_before": ratios, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
