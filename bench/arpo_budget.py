"""What ARPO's budget rule alone lets it save: the expected tokens per final trajectory against
independent sampling, computed exactly for idealised trajectories (algorithms.md §2 b).

    python bench/arpo_budget.py [--M 8] [--N 4 2 1] [--calls 1 2 3 4 6] [--tau 0.5]
                                [--depths 0.3 0.6 0.9]

Idealised: every trajectory has the same length (1) and makes its tool calls at the same depths
(`--depths`, or k/(c+1) for c calls); a branch copies its parent up to the call and makes the
parent's remaining calls; ΔH = 0, so each active trajectory branches after each call with
probability τ, one branch at most (Z = 1), while the group has free slots. When a group's paths have
all ended with slots free, one fresh trajectory starts from the prompt and may branch in turn
(§2 b step 6). A branch born at depth d costs 1 - d; a root or fill-in costs 1; independent
sampling costs M. Real trajectories differ in length and in how often they call, and ARPO's
branches favour those that call tools, which run longer: on the long task `bench/tree.py` measured
0.85× at N = 4, where these trajectories with three calls at 30/60/90% give 0.77×.
On scripted answers of exactly this shape, ARPO's sampler spends what this computes
(`tests/test_arpo_budget.py`: 300 groups, within 0.01).
Prints JSON: the ratio per N and per number of calls (or for the given depths).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict


def expected_token_ratio(M: int, N: int, depths: list[float], tau: float = 0.5) -> float:
    """E[tokens of ARPO's M final trajectories] / M, for trajectories of length 1 calling the tool at
    `depths`. Exact: a distribution over (trajectories in the group, active ones), call by call, wave
    by wave (the N roots, then one fill-in at a time while slots are free; at most M waves)."""
    expected = float(N)                                   # the roots
    wave: dict[tuple[int, int], float] = {(N, N): 1.0}
    while wave:
        for d in depths:
            after: dict[tuple[int, int], float] = defaultdict(float)
            for (count, active), p in wave.items():
                for s in range(active + 1):               # s of the active ones draw a branch
                    added = min(s, M - count)
                    q = p * math.comb(active, s) * tau ** s * (1 - tau) ** (active - s)
                    expected += q * added * (1 - d)
                    after[(count + added, active + added)] += q
            wave = after
        ended: dict[tuple[int, int], float] = defaultdict(float)
        for (count, _), p in wave.items():
            if count < M:                                 # every path ended with slots free: a fill-in
                expected += p
                ended[(count + 1, 1)] += p
        wave = ended
    return expected / M


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, default=8)
    ap.add_argument("--N", type=int, nargs="+", default=[4, 2, 1])
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    ap.add_argument("--depths", type=float, nargs="+", default=None,
                    help="the tool calls' depths in (0, 1), instead of --calls spaced evenly")
    ap.add_argument("--tau", type=float, default=0.5)
    args = ap.parse_args()
    checks = [(all(1 <= n <= args.M for n in args.N), f"--N: each N must be between 1 and M = {args.M}, got {args.N}"),
              (all(0 <= d <= 1 for d in args.depths or []),
               f"--depths: a call's depth is a fraction of the answer, in [0, 1], got {args.depths}"),
              (0 <= args.tau <= 1, f"--tau: a branch probability, in [0, 1], got {args.tau}")]
    for ok, problem in checks:
        if not ok:
            sys.exit(f"arpo_budget.py: {problem}")   # one line, as forkrl's own errors
    cases = {"depths " + " ".join(map(str, args.depths)): args.depths} if args.depths else {
        f"{c} calls": [k / (c + 1) for k in range(1, c + 1)] for c in args.calls}
    print(json.dumps({"M": args.M, "tau": args.tau, "token_ratio": {
        f"N={n}": {name: round(expected_token_ratio(args.M, n, depths, args.tau), 3) for name, depths in cases.items()}
        for n in args.N}}, indent=1))


if __name__ == "__main__":
    main()
