"""The learner with a mini-batch's header run once (`forward.Header`) and run in every micro-batch, on
the same collected batch, in one process, alternating.

    python bench/learner_header.py [--config configs/arpo.yaml --config configs/latr_long.yaml] [--rounds 2] [--set k=v]

Each recipe collects its first step's batch with its own sampler, then the learner updates on it
`--rounds` times per side: "once" (the default learner: the prompt tokens every row starts with run
once for all micro-batches when they are at least `HEADER_MIN_TOKENS` long) and "each" (the minimum
set past any prompt, so every micro-batch runs them). Every update starts from the same weights and
optimizer state, and the two sides must report the same entropy, loss and gradient norm
(relative 1e-5 in float32, where they differ only in the order of float sums; 1e-2 under bf16
autocast, whose rounding depends on the matmuls' shapes; a header whose gradient went missing
moves the norm far more). Prints JSON: per recipe the header length, forward tokens and median
seconds per side, and once / each.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

# the first update's figures both sides must share: the policy's entropy on the generated tokens
# (forward), the loss and the gradient norm (backward; 0 when every advantage is)
CHECKED = ("policy/entropy", "loss", "grad_norm")


def measure(config: str, rounds: int, overrides: list[str]) -> dict:
    import forkrl.train.learner as learner_module
    from forkrl.config import load_config
    from forkrl.train import Trainer
    from forkrl.train.batch import common_header, pack

    default = learner_module.HEADER_MIN_TOKENS
    cfg = load_config(config, ["log.progress=false", "log.tensorboard=false", "eval.every=0",
                               "output_dir=/tmp/forkrl-bench-learner-header", *overrides])
    trainer = Trainer(cfg)
    batch = trainer.loop.source.next_batch(1)
    packed = pack(batch.trajectories, 0)
    header = len(common_header(packed, torch.arange(len(packed))))
    learner = trainer.learner
    start_state = (copy.deepcopy(learner.model.state_dict()), copy.deepcopy(learner.optimizer.state_dict()),
                   copy.deepcopy(learner.scheduler.state_dict()))
    seconds: dict[str, list[float]] = {"once": [], "each": []}
    tokens, first = {}, {}
    try:
        for r in range(rounds):
            for side in ("once", "each") if r % 2 == 0 else ("each", "once"):
                learner.model.load_state_dict(start_state[0])
                learner.optimizer.load_state_dict(start_state[1])
                learner.scheduler.load_state_dict(start_state[2])
                learner_module.HEADER_MIN_TOKENS = default if side == "once" else 10**9
                start = time.perf_counter()
                metrics, _ = learner.learn(batch, 1)
                seconds[side].append(round(time.perf_counter() - start, 2))
                tokens[side] = metrics["learner/forward_tokens"]
                first.setdefault(side, {k: metrics[k] for k in CHECKED})
    finally:
        learner_module.HEADER_MIN_TOKENS = default
    # float32: the same sums in another order; bf16 autocast: the header's matmuls run at another
    # shape, so their bf16 rounding differs (a gradient norm 1e-3 apart on configs/arpo.yaml)
    tolerance = 1e-2 if learner.autocast else 1e-5
    for key in CHECKED:
        a, b = first["once"][key], first["each"][key]
        if abs(a - b) > tolerance * max(abs(b), 1e-6):
            raise SystemExit(f"{config}: {key} {a} with the header once against {b} with it in every micro-batch")
    med = {side: statistics.median(v) for side, v in seconds.items()}
    return {"config": config, "trajectories": len(batch.trajectories), "header_tokens": header,
            "forward_tokens": tokens, "seconds": seconds, "first_update": first, "median_seconds": med,
            "ratio_tokens": round(tokens["once"] / tokens["each"], 3),
            "ratio_seconds": round(med["once"] / med["each"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], help="config override for every recipe, key=value")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__,
              "runs": [measure(c, args.rounds, args.set) for c in args.config or ["configs/arpo.yaml", "configs/latr_long.yaml"]]}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
