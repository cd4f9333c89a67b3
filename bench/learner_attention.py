"""The learner's attention over packed rows: dense (one masked SDPA per row) against spans (every
shared prefix once, each sequence over just the keys it sees; forkrl/train/attention.py).

    python bench/learner_attention.py [--threads 1] [--repeats 2] [--shapes short long tree]

One forward + backward of `PolicyForward` (gradient checkpointing on, float32, chunked projection) on
SmolLM2-135M's shapes with random weights, alternating dense and spans `--repeats` times per batch:
  short: 8 prompts of 60 tokens x 8 responses of 24 (the quickstart's shape)
  long:  2 prompts of 450 tokens x 8 responses of 190 (the long tree task's shape)
  tree:  the long shape as LATR-like trees, branch k leaving branch k-1 after 20k tokens
Prints JSON: seconds per call (median), tokens each layout runs, and spans/dense ratios.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def batches(shapes: list[str]):
    from forkrl.train.batch import pack
    from forkrl.types import Trajectory
    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(10, 49000, (n,), generator=g).tolist()

    def traj(p, t, group, parent=None, at=None):
        return Trajectory(prompt_ids=p, tokens=t, logprobs=[-1.0] * len(t), entropies=[1.0] * len(t),
                          loss_mask=[1] * len(t), group=group, parent=parent, branch_at=at)
    out = {}
    if "short" in shapes:
        out["short"] = [traj(p, toks(24), f"g{i}") for i in range(8) for p in [toks(60)] for _ in range(8)]
    if "long" in shapes:
        out["long"] = [traj(p, toks(190), f"g{i}") for i in range(2) for p in [toks(450)] for _ in range(8)]
    if "tree" in shapes:
        tree = []
        for i in range(2):
            p, members = toks(450), []
            members.append(traj(p, toks(190), f"t{i}"))
            for k in range(1, 8):
                at = 20 * k
                members.append(traj(p, members[k - 1].tokens[:at] + toks(190 - at), f"t{i}", k - 1, at))
            tree += members
        out["tree"] = tree
    return {name: pack(t, 0) for name, t in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["short", "long", "tree"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from forkrl.train.forward import PolicyForward, pack_rows
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                         max_position_embeddings=8192)).float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "model": "SmolLM2-135M shapes, random weights"}
    for name, batch in batches(args.shapes).items():
        times = {"dense": [], "spans": []}
        for _ in range(args.repeats):
            for attention in ("dense", "spans"):
                forward = PolicyForward(model, attention=attention, chunk=256)
                model.zero_grad()
                t0 = time.perf_counter()
                logp, entropy = forward(batch)
                (logp.sum() + entropy.sum()).backward()
                times[attention].append(time.perf_counter() - t0)
        dense, spans = statistics.median(times["dense"]), statistics.median(times["spans"])
        result[name] = {"dense_s": round(dense, 2), "spans_s": round(spans, 2), "ratio": round(spans / dense, 3),
                        "dense_tokens_run": pack_rows(batch).run, "spans_tokens_run": pack_rows(batch, flat=True).run}
        print(json.dumps({name: result[name]}), flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
