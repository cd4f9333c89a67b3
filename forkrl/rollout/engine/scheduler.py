"""Scheduler: which sequence runs in which slot of the runner's key/value cache.

Continuous batching: a sequence that finishes frees its slot, and the next waiting sequence is
admitted into it at once, so a long tail never idles the batch. When nothing waits, the sequences in
the last slots move into the holes (`compact`), so a decode step reads slots 0..n-1, a contiguous
view of the cache. The scheduler only decides; the engine moves the states and the logits.
"""
from __future__ import annotations

from collections import deque

from forkrl.rollout.engine.sequence import Sequence


class Scheduler:
    def __init__(self, seqs: list[Sequence], n_slots: int):
        self.waiting: deque[Sequence] = deque(seqs)
        self.slots: list[Sequence | None] = []    # slots[j]: the sequence in slot j (None: a hole)
        self.n_slots = n_slots

    @property
    def running(self) -> list[Sequence]:
        return [q for q in self.slots if q is not None]

    def admit(self) -> list[tuple[Sequence, int]]:
        """Waiting sequences placed into free slots (holes first), as (sequence, slot)."""
        free = [j for j, q in enumerate(self.slots) if q is None] + list(range(len(self.slots), self.n_slots))
        placed = [(self.waiting.popleft(), j) for j in free[:len(self.waiting)]]
        if placed:
            width = max(len(self.slots), max(j for _, j in placed) + 1)
            self.slots += [None] * (width - len(self.slots))
            for q, j in placed:
                self.slots[j] = q
        return placed

    def compact(self) -> list[tuple[int, int]]:
        """When nothing waits: move the last sequences into the holes; the (from, to) slot moves, in order."""
        moves = []
        if self.waiting:
            return moves
        while self.slots and self.slots[-1] is None:
            self.slots.pop()
        for hole in range(len(self.slots)):
            if hole >= len(self.slots):
                break
            if self.slots[hole] is None:
                moves.append((len(self.slots) - 1, hole))
                self.slots[hole] = self.slots.pop()
                while self.slots and self.slots[-1] is None:
                    self.slots.pop()
        return moves

    def retire(self, slot: int) -> None:
        self.slots[slot] = None
        if all(q is None for q in self.slots):   # every row finished: the next admission starts from slot 0
            self.slots = []

    def abort(self) -> None:
        """Stop now: every unfinished sequence, running or waiting, ends with finish "abort"."""
        for q in self.running:
            q.finish = q.finish or "abort"
        for q in self.waiting:
            q.finish = "abort"
        self.waiting.clear()

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running
