"""SAPO swarm sharing (Gensyn, arXiv 2509.08721; algorithms.md §13.7 and §24).

Every peer is a whole run with its own policy copy, seed, prompt stream and output folder
(`output_dir/peer<i>`); no weights are shared. Each peer runs the ordinary `Loop` (so it resumes,
checkpoints periodically, saves on Ctrl-C, stops on repeated non-finite updates and honours token
budgets), and its batch source is a `SwarmSource` around its own `Collector`. Each step:

1. the peer samples and scores its own groups and posts `swarm.shared_groups` complete ones (decoded
   rollouts with their question and answer) to the `SwarmBoard`, a Ray actor that hands every peer
   the round's posts once all peers have posted;
2. the peer draws `swarm.external_groups` groups uniformly from the other peers' posts — only
   questions it does not hold itself, and only complete groups of `rollout.samples_per_prompt`, as
   rl-swarm's "transplanted trees" — re-scores them with its own rewards and reward terms, and trains
   on local + external groups, the external ones treated as on-policy (the paper's choice;
   `algo.rollout_correction` can weight them instead).

The paper's best split was 4 local / 4 external rollouts per question; rl-swarm's public swarm uses
whole groups (2 local questions + 2 transplanted). Here sharing is by group.
"""
from __future__ import annotations

import asyncio
import copy
import math
import os
import random
from pathlib import Path

from forkrl.collect import derive_seed, groups_of
from forkrl.config import RunConfig
from forkrl.distributed import require_ray
from forkrl.train.trainer import Trainer
from forkrl.types import PolicyFeedback, RolloutBatch


class SwarmBoard:
    """Where peers post their shared groups each round; `exchange` returns every peer's post once all
    have posted (a barrier, on Ray's async actors)."""

    def __init__(self, peers: int, timeout_s: float = 3600.0):
        self.peers, self.timeout_s = peers, timeout_s
        self.posts: dict[int, dict[int, list]] = {}
        self.ready: dict[int, asyncio.Event] = {}

    async def exchange(self, round_: int, peer: int, payload: list) -> list[list]:
        posts = self.posts.setdefault(round_, {})
        ready = self.ready.setdefault(round_, asyncio.Event())
        posts[peer] = payload
        if len(posts) == self.peers:
            ready.set()
            for old in [r for r in self.posts if r < round_ - 1]:  # every peer has left those rounds
                del self.posts[old], self.ready[old]
        try:
            await asyncio.wait_for(ready.wait(), self.timeout_s)
        except TimeoutError:
            raise RuntimeError(f"swarm round {round_}: only peers {sorted(posts)} of {self.peers} posted "
                               f"within {self.timeout_s:.0f} s") from None
        return [posts[i] for i in range(self.peers)]


class SwarmSource:
    """A peer's batch source: its own collector's groups plus groups drawn from the other peers."""

    def __init__(self, collector, board, peer: int, cfg: RunConfig):
        self.collector, self.board, self.peer, self.cfg = collector, board, peer, cfg
        self.ray = require_ray()

    def next_batch(self, step: int) -> RolloutBatch:
        batch = self.collector.next_batch(step)
        n, sw = self.cfg.rollout.samples_per_prompt, self.cfg.distributed.swarm
        complete = [g for g in groups_of(batch.trajectories) if len(g) == n]
        shared = complete if sw.shared_groups is None else complete[:sw.shared_groups]
        payloads = self.ray.get(self.board.exchange.remote(step, self.peer, shared))
        held = {t.sample.id for t in batch.trajectories if t.sample is not None}
        eligible = [g for peer, payload in enumerate(payloads) if peer != self.peer for g in payload
                    if len(g) == n and g[0].sample is not None and g[0].sample.id not in held]
        rng = random.Random(derive_seed(self.cfg.seed, step, 4242))
        picked = rng.sample(eligible, min(sw.external_groups, len(eligible)))
        external = [copy.copy(t) for g in picked for t in g]
        for t in external:
            t.group = f"swarm/{t.group}"
        if external:
            self.collector.score(external, step)  # this peer's own verifier decides their reward
        batch.trajectories = batch.trajectories + external
        batch.metrics.update({
            "swarm/external_groups": float(len(picked)), "swarm/eligible_groups": float(len(eligible)),
            "swarm/external_accuracy": sum(t.correct for t in external) / len(external) if external else math.nan,
            "swarm/external_questions": [t.sample.id for t in external[::n]], "swarm/local_questions": sorted(held)})
        return batch

    def set_policy(self, version: int, feedback: PolicyFeedback) -> None:
        self.collector.set_policy(version, feedback)

    def state_dict(self) -> dict:
        return self.collector.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.collector.load_state_dict(state)


class SwarmPeer:
    """One peer: a `Trainer` whose source is a `SwarmSource`; its own seed and output folder."""

    def __init__(self, cfg: dict, peer: int, board):
        import torch
        rc = RunConfig.model_validate(cfg)
        rc.seed = rc.seed + 1000 * peer          # its own prompt order and samples
        rc.output_dir = str(Path(rc.output_dir) / f"peer{peer}")
        rc.log.progress = False
        torch.set_num_threads(max(1, int(rc.distributed.worker_cpus)))
        self.trainer = Trainer(rc, wrap_source=lambda collector: SwarmSource(collector, board, peer, rc))

    def train(self, resume: bool = False) -> dict:
        summary = self.trainer.train(resume=resume)
        summary["history"] = self.trainer.history
        return summary


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
        self.board = ray.remote(SwarmBoard).options(num_cpus=0).remote(d.workers)
        peer_cls = ray.remote(SwarmPeer)
        self.peers = [peer_cls.options(num_cpus=d.worker_cpus, num_gpus=d.worker_gpus).remote(
            cfg.model_dump(), i, self.board) for i in range(d.workers)]

    def train(self, resume: bool = False) -> dict:
        ray = self.ray
        try:
            summaries = ray.get([p.train.remote(resume) for p in self.peers])
        finally:
            for p in [*self.peers, self.board]:
                ray.kill(p)
            if self.owns_ray:
                ray.shutdown()
        return {"peers": [{"before": s.get("before", {}), "after": s.get("after", {}), "history": s["history"]}
                          for s in summaries]}
