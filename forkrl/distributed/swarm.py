"""SAPO swarm sharing (Gensyn, arXiv 2509.08721; algorithms.md §13.7 and §24).

Every worker is a whole trainer with its own policy copy, seed and prompt stream; no weights are
shared. Each round, in two phases the driver runs through Ray:

1. every peer samples and scores its own groups (`Trainer.sample_step`) and publishes
   `swarm.shared_groups` of them (decoded rollouts with their question and answer) to the object store;
2. every peer draws `swarm.external_groups` groups uniformly from the other peers' payloads — only
   questions it does not hold itself, and only complete groups of `rollout.samples_per_prompt`, as
   rl-swarm's "transplanted trees" — re-scores them with its own reward functions, and makes one
   update on local + external groups, the external ones treated as on-policy (the paper's choice;
   `algo.rollout_correction` can weight them instead).

The paper's best split was 4 local / 4 external rollouts per question; rl-swarm's public swarm uses
whole groups (2 local questions + 2 transplanted). Here sharing is by group.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from pathlib import Path

from forkrl.config import RunConfig
from forkrl.distributed import require_ray
from forkrl.metrics import make_sinks
from forkrl.train.trainer import Trainer


def _groups(trajs) -> list[list]:
    by_group: dict[str, list] = {}
    for t in trajs:
        by_group.setdefault(t.group, []).append(t)
    return list(by_group.values())


class SwarmPeer:
    def __init__(self, cfg: dict, peer: int):
        rc = RunConfig.model_validate(cfg)
        rc.seed = rc.seed + 1000 * peer          # its own prompt order and samples
        rc.output_dir = str(Path(rc.output_dir) / f"peer{peer}")
        rc.log.progress = False
        import torch
        torch.set_num_threads(max(1, int(rc.distributed.worker_cpus)))
        self.cfg, self.peer = rc, peer
        self.trainer = Trainer(rc)
        Path(rc.output_dir).mkdir(parents=True, exist_ok=True)
        self.sinks = make_sinks(Path(rc.output_dir), rc, None)
        self.local = None
        self.summary: dict = {}

    def start(self) -> dict:
        if self.cfg.eval.at_start:
            self.summary["before"] = self.trainer.evaluate()
            for s in self.sinks:
                s.write(0, self.summary["before"])
        return self.summary.get("before", {})

    def sample(self) -> list[list]:
        """Phase 1: this round's own groups, scored; returns the ones it shares."""
        t0 = time.perf_counter()
        batch = self.trainer.sample_step(self.trainer.step_idx + 1)
        self.local = (batch, t0)
        n = self.cfg.rollout.samples_per_prompt
        complete = [g for g in _groups(batch.trajectories) if len(g) == n]
        k = self.cfg.distributed.swarm.shared_groups
        return complete if k is None else complete[:k]

    def learn(self, *payloads: list[list]) -> dict:
        """Phase 2: draw external groups from the other peers' payloads, re-score them, one update."""
        batch, t0 = self.local
        step = self.trainer.step_idx + 1
        held = {t.sample.id for t in batch.trajectories if t.sample is not None}
        n = self.cfg.rollout.samples_per_prompt
        eligible = [g for peer, payload in enumerate(payloads) if peer != self.peer for g in payload
                    if len(g) == n and g[0].sample is not None and g[0].sample.id not in held]
        rng = random.Random(self.trainer._seed(step, 4242))
        picked = rng.sample(eligible, min(self.cfg.distributed.swarm.external_groups, len(eligible)))
        external = [copy.copy(t) for g in picked for t in g]
        for t in external:
            t.group = f"swarm/{t.group}"
        if external:
            self.trainer.score(external)  # this peer's own verifier decides their reward
        batch.trajectories = batch.trajectories + external
        metrics = self.trainer.learn_step(batch, t0)
        metrics.update({"swarm/external_groups": float(len(picked)), "swarm/eligible_groups": float(len(eligible)),
                        "swarm/external_accuracy": (sum(t.correct for t in external) / len(external)
                                                    if external else math.nan),
                        "swarm/external_questions": [t.sample.id for t in external[::n]],
                        "swarm/local_questions": sorted(held)})
        for s in self.sinks:
            s.write(self.trainer.step_idx, {k: v for k, v in metrics.items() if isinstance(v, float)})
        return metrics

    def finish(self) -> dict:
        self.summary["after"] = self.trainer.evaluate()
        for s in self.sinks:
            s.write(self.trainer.step_idx, self.summary["after"])
            s.close()
        self.trainer.save()
        return self.summary


class SwarmRun:
    def __init__(self, cfg: RunConfig):
        ray = self.ray = require_ray()
        d = cfg.distributed
        self.cfg = cfg
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            if d.address is None:
                ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(d.workers * d.worker_cpus)),
                         include_dashboard=False)
            else:
                ray.init(address=d.address)
        peer_cls = ray.remote(SwarmPeer)
        self.peers = [peer_cls.options(num_cpus=d.worker_cpus, num_gpus=d.worker_gpus).remote(cfg.model_dump(), i)
                      for i in range(d.workers)]

    def train(self) -> dict:
        ray = self.ray
        try:
            before = ray.get([p.start.remote() for p in self.peers])
            history: list[list[dict]] = []
            for _ in range(self.cfg.train.steps):
                payloads = [p.sample.remote() for p in self.peers]
                history.append(ray.get([p.learn.remote(*payloads) for p in self.peers]))
            after = ray.get([p.finish.remote() for p in self.peers])
        finally:
            for p in self.peers:
                ray.kill(p)
            if self.owns_ray:
                ray.shutdown()
        return {"peers": [{"before": b, "after": a.get("after", {}),
                           "history": [round_[i] for round_ in history]}
                          for i, (b, a) in enumerate(zip(before, after))]}
