"""A scripted continuous batch for sampler tests: `SlotEngine` wraps a scripted engine (its
`generate` decides every completion) and reveals the completions one token per step through a batch
of `slots` rows, recording how many rows each step used (`in_use`). `generate` drains the batch per
call, as a lockstep engine does; `stream` keeps it open, as TorchEngine's does."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from forkrl.types import Completion


@dataclass(eq=False)
class Row:
    request: int
    full: Completion
    ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    entropies: list = field(default_factory=list)
    top: list = field(default_factory=list)
    finish: str | None = None

    def reveal(self) -> None:
        k = len(self.ids)
        self.ids.append(self.full.token_ids[k])
        self.logprobs.append(self.full.logprobs[k])
        self.entropies.append(self.full.entropies[k])
        if self.full.top_logprobs is not None:
            self.top.append(self.full.top_logprobs[k])
        if len(self.ids) == len(self.full.token_ids):
            self.finish = self.full.finish

    def completion(self) -> Completion:
        if self.finish == self.full.finish:
            return self.full
        return Completion(list(self.ids), list(self.logprobs), list(self.entropies), "abort", "",
                          list(self.top) if self.full.top_logprobs is not None else None)


class SlotStream:
    def __init__(self, engine: SlotEngine):
        self.engine = engine
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self.rows: dict[int, list[Row]] = {}
        self.next_id = 0

    def add(self, request) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        (comps,) = self.engine.script.generate([request])
        self.rows[rid] = [Row(rid, c) for c in comps]
        for r in self.rows[rid]:
            if r.full.token_ids:
                self.waiting.append(r)
            else:
                r.finish = r.full.finish
        return rid

    def progress(self, rid: int):
        return self.rows[rid]

    def cancel(self, rid: int) -> None:
        for r in self.rows.get(rid, []):
            if r.finish is None:
                r.finish = "abort"
                if r in self.waiting:
                    self.waiting.remove(r)
                else:
                    self.running.remove(r)

    def step(self):
        while len(self.running) < self.engine.slots and self.waiting:
            self.running.append(self.waiting.popleft())
        if self.running:
            self.engine.in_use.append(len(self.running))
        for r in self.running:
            r.reveal()
        self.running = [r for r in self.running if r.finish is None]
        ready = [rid for rid, rows in self.rows.items() if all(r.finish is not None for r in rows)]
        return [(rid, [r.completion() for r in self.rows.pop(rid)]) for rid in ready]

    @property
    def done(self) -> bool:
        return not self.rows


class SlotEngine:
    """Lockstep: each `generate` call runs its requests through the slots until all finished."""

    def __init__(self, script, slots: int):
        self.script, self.slots, self.in_use = script, slots, []
        self.stats, self.eos_ids = script.stats, script.eos_ids
        self.tokenizer = getattr(script, "tokenizer", None)

    def generate(self, requests, seed=None):
        s = SlotStream(self)
        ids = [s.add(r) for r in requests]
        out = {}
        while not s.done:
            out.update(s.step())
        return [out[i] for i in ids]


class StreamingSlotEngine(SlotEngine):
    """Continuous: `stream` keeps the batch open to requests added between steps."""

    def stream(self, seed=None) -> SlotStream:
        return SlotStream(self)
