"""Run under torchrun by tests/test_data_parallel.py: one update of every method as 2 FSDP2 ranks
(gloo) against the same update in one process, and the same with the groups' placement permuted.
Writes JSON results from rank 0 to the path given as the first argument."""
import json
import sys

import torch

from forkrl.config import build_config
from forkrl.cpu import bf16_matmul_speedup
from forkrl.models import load_policy
from forkrl.train.forward import PolicyForward
from forkrl.train.learner import Learner
from forkrl.train.parallel import DataParallel
from forkrl.types import RolloutBatch, Trajectory

METHODS = {  # recipe sections under test; every one float32, several micro-batches per rank
    "grpo_ppo_clip": {},
    "gspo": {"algo": {"loss": "gspo"}},
    "clip_cov": {"algo": {"loss": "clip_cov", "loss_params": {"scope": "batch"}}},
    "kl_cov": {"algo": {"loss": "kl_cov"}},
    "forking_tokens": {"algo": {"token_selector": "forking_tokens"}},
    # DAPO's update: clip-higher, token-mean over the whole batch
    "dapo": {"algo": {"loss_params": {"clip_low": 0.2, "clip_high": 0.28, "clip_c": 10.0}}},
    # two updates per batch: a global shuffle into mini-batches, old log-probs recomputed (collective)
    "two_mini_batches": {"train": {"mini_batches": 2}},
    "grpo_kl": {"algo": {"kl_coef": 0.05}},
    # every prompt starts with one 40-token header: one process runs it once per mini-batch
    # (forward.Header; with two mini-batches, in the old log-probs' pass too), the ranks in every micro-batch
    "shared_header": {},
    "shared_header_two_mini_batches": {"train": {"mini_batches": 2}},
}
HEADER_TOKENS = 40


def trajectories(header: int = 0) -> list[Trajectory]:
    """5 groups x 4 samples with uneven prompt and response lengths, random tokens and rewards; with
    `header`, every prompt starts with the same that many tokens."""
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(5, 900, (header,), generator=torch.Generator().manual_seed(8)).tolist()
    out = []
    for grp in range(5):
        prompt = shared + torch.randint(5, 900, (3 + 2 * grp,), generator=g).tolist()
        for k in range(4):
            n = 2 + (grp * 5 + k * 3) % 11
            out.append(Trajectory(prompt_ids=prompt, tokens=torch.randint(5, 900, (n,), generator=g).tolist(),
                                  logprobs=(-3 * torch.rand(n, generator=g)).tolist(),
                                  entropies=(2 * torch.rand(n, generator=g)).tolist(), loss_mask=[1] * n,
                                  group=f"g{grp}", reward=float(torch.rand(1, generator=g) > 0.4)))
    return out


def config(sections: dict):
    data = {"model": {"name": "tiny-random"}, "rollout": {"max_new_tokens": 16},
            "train": {"lr": 1e-2, "micro_batch_size": 3, "bf16_autocast": False}, "log": {"entropy_probe_tokens": 24}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return build_config(data)


INITIAL = {}


def learner(cfg, dp=None):
    """A learner on a fresh copy of the same random-initialised model. Plain SGD: the update is
    the (clipped) gradient itself, so parameters compare at float32 precision. (Adam's first step, g / (|g| + eps),
    turns rounding noise in near-zero gradients into lr-sized moves, whatever sums them: a micro-batch
    split does the same in one process.)"""
    import copy
    if not INITIAL:
        INITIAL["model"], INITIAL["tokenizer"] = load_policy("tiny-random", seed=0)
    model, tok = copy.deepcopy(INITIAL["model"]), INITIAL["tokenizer"]
    ref = copy.deepcopy(INITIAL["model"]).eval() if cfg.algo.kl_coef > 0 else None
    policy = PolicyForward(model, chunk=cfg.train.logprob_chunk)
    if dp is not None:
        dp.shard(policy, model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return Learner(model, opt, sched, cfg, ref_model=ref, pad_id=tok.pad_token_id, max_new_tokens=16, forward=policy,
                   dp=dp), policy


def numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/") and isinstance(v, float)}


def main(out_path: str) -> None:
    dp = DataParallel.from_env("cpu")
    placements = {"groups 0 | 1-4": [[0], [1, 2, 3, 4]], "groups 1-4 | 0": [[1, 2, 3, 4], [0]],
                  "groups 0,2 | 1,3,4": [[0, 2], [1, 3, 4]]}
    # the learner's bf16 autocast decision: every rank must read the same timing (the smallest)
    results = {"bf16_speedup_per_rank": dp.gather(bf16_matmul_speedup(32, 48, rows=16, repeats=1))}
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(METHODS)
    for name, sections in METHODS.items():
        if name not in only:
            continue
        cfg = config(sections)
        trajs = trajectories(HEADER_TOKENS if name.startswith("shared_header") else 0)
        single, _ = learner(cfg)  # one process: no collectives
        ref_metrics, _ = single.learn(RolloutBatch(trajs, trajs, {}, 0), 1)
        ref_params = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
        for where, split in placements.items():
            mine = [t for t in trajs if int(t.group[1:]) in split[dp.rank]]
            sharded, policy = learner(cfg, dp)
            metrics, _ = sharded.learn(RolloutBatch(mine, mine, {}, 0), 1)
            full = {k.removeprefix("model."): v for k, v in dp.full_state_dict(policy).items()}
            diff = max(float((full[k] - v).abs().max()) for k, v in ref_params.items())
            initial = INITIAL["model"].state_dict()
            moved = max(float((v - initial[k]).abs().max()) for k, v in ref_params.items())
            results[f"{name} / {where}"] = {"max_param_diff": diff, "update_size": moved,
                                            "metrics": numbers(metrics), "reference_metrics": numbers(ref_metrics),
                                            "tokens_per_rank": dp.gather(sum(len(t.tokens) for t in mine))}
    if dp.is_main:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dp.close()


if __name__ == "__main__":
    main(sys.argv[1])
