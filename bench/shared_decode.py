"""Decode with and without shared-prefix reads (`TorchEngine._shared_keys`), in one process on one
machine: the same requests, the same seed, alternating.

    python bench/shared_decode.py [--config configs/latr_long.yaml] [--prompts 8] [--n 8] [--new-tokens 200] [--rounds 3]

The requests are the recipe's first prompts (latr_long: a 711-token few-shot header every prompt
shares, ~45 tokens of its own), `--n` samples each at temperature 1, up to `--new-tokens` (rows end at EOS, as in training, so links
to finished rows are re-linked). "shared": each decode step reads
a prefix several rows share from one slot; "own": every row reads its own copy (SHARE_AT_LEAST set
past any prompt). Both sample the same tokens (asserted). Prints JSON: median seconds per side, the
share of attended keys read from a shared slot, and shared / own.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/latr_long.yaml")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from forkrl.config import load_config
    from forkrl.train import Trainer
    from forkrl.types import GenerationRequest, SamplingParams

    cfg = load_config(args.config, ["log.progress=false", "log.tensorboard=false", "eval.every=0",
                                    "output_dir=/tmp/forkrl-bench-shared-decode", "train.checkpoint_every=0"])
    trainer = Trainer(cfg)
    engine, collector = trainer.engine, trainer.loop.source
    samples = collector.fresh_prompts(args.prompts)
    prompts = [collector.task.prompt_ids(s, trainer.tokenizer) for s in samples]
    requests = [GenerationRequest(p, SamplingParams(temperature=1.0, max_tokens=args.new_tokens, n=args.n))
                for p in prompts]

    def run(share: bool) -> tuple[float, list, float, int]:
        engine.SHARE_AT_LEAST = getattr(type(engine), "SHARE_AT_LEAST", 0) if share else 10**9
        engine.weights_updated()   # nothing from the other side's prefix cache
        keys = lambda: (getattr(engine.stats, "attended_keys", 0), getattr(engine.stats, "shared_keys", 0))  # noqa: E731  (older revisions, under bench/ab.py, count neither)
        (k0, s0) = keys()
        start = time.perf_counter()
        out = engine.generate(requests, seed=0)
        seconds = time.perf_counter() - start
        k1, s1 = keys()
        share_of_keys = (s1 - s0) / max(k1 - k0, 1)
        return seconds, [c.token_ids for group in out for c in group], share_of_keys, engine.stats.decode_tokens

    run(True)   # warm-up: kernels, cache allocation
    times: dict[str, list[float]] = {"shared": [], "own": []}
    tokens, share_of_keys = {}, 0.0
    for _ in range(args.rounds):
        for side in ("own", "shared"):
            seconds, toks, keys, _ = run(side == "shared")
            times[side].append(seconds)
            tokens[side] = toks
            if side == "shared":
                share_of_keys = keys
    assert tokens["shared"] == tokens["own"], "shared-prefix reads changed the samples"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "config": args.config, "prompt_tokens": [len(p) for p in prompts], "samples": args.prompts * args.n,
        "new_tokens_max": args.new_tokens, "decoded_tokens": sum(map(len, tokens["shared"])),
        "engine_dtype": str(engine.runner.dtype),
        "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 2) for k, v in med.items()},
        "shared_key_share": round(share_of_keys, 3),
        "shared_over_own": round(med["shared"] / med["own"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
