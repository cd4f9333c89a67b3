"""`DemoCollector`: supervised fine-tuning batches behind the same interface as the `Collector`, so one
loop trains both (`forkrl sft`)."""
from __future__ import annotations

import math
import random

from forkrl.types import PolicyFeedback, RolloutBatch, Trajectory


class DemoCollector:
    """Batches of `sft.batch_size` demonstrations (`forkrl.tasks.conversations`): a seeded shuffle per
    epoch; with `sft.group_by_length`, windows of 8 batches are sorted by length before they are cut,
    so a batch holds similar lengths (less padding). Every demonstration trains with advantage 1
    (the `nll` loss)."""

    def __init__(self, demos: list, *, batch_size: int, seed: int = 0, group_by_length: bool = True):
        self.demos, self.batch_size, self.seed, self.group_by_length = demos, batch_size, seed, group_by_length
        self.batches = 0  # batches handed out so far

    def next_batch(self, step: int) -> RolloutBatch:
        n, size = len(self.demos), self.batch_size
        epoch, b = divmod(self.batches, math.ceil(n / size))
        order = list(range(n))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        if self.group_by_length:
            window = 8 * size
            order = [i for w in range(0, n, window)
                     for i in sorted(order[w:w + window], key=lambda i: len(self.demos[i].tokens))]
        self.batches += 1
        trajs = [Trajectory(prompt_ids=d.prompt_ids, tokens=d.tokens, logprobs=[0.0] * len(d.tokens),
                            entropies=[0.0] * len(d.tokens), loss_mask=d.loss_mask, group=d.source, advantage=1.0)
                 for d in (self.demos[i] for i in order[b * size:(b + 1) * size])]
        return RolloutBatch(trajs, [], {}, 0)

    def set_policy(self, version: int, feedback: PolicyFeedback) -> None:
        pass  # demonstrations do not depend on the policy

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]
