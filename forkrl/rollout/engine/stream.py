"""Stream: requests enter an engine's continuous batch while it runs (nano-vllm's `add_request` /
`step`), so a sampler that reacts to finished work (a tool result, a fork, a pruned branch) keeps
the batch as full as independent sampling does.

    stream = open_stream(engine, seed)
    rid = stream.add(GenerationRequest(prompt_ids, params, keep_kv=True))
    while not stream.done:
        for rid, completions in stream.step():   # requests all of whose samples finished this step
            ...                                  # run a tool, fork, submit the next turn

`stream.progress(rid)` shows a running request's sequences as they grow (`Sequence.ids`, `logprobs`,
`entropies`, `top`: read them, do not change them; a tree sampler reads its greedy chains so), and `stream.cancel(rid)` ends one early; its finished part comes
back from the next `step()`, with finish "abort", and with `keep_kv` its states stay in the prefix
cache for whatever continues it.

An engine that has a continuous batch of its own offers `engine.stream(seed)` (TorchEngine). For
every other engine (HF, vLLM, scripted test engines) `LockstepStream` runs each step's new requests
to completion in one `generate` call: the same results, with the batch draining between steps.
"""
from __future__ import annotations

from forkrl.types import Completion, GenerationRequest


class LockstepStream:
    """The stream interface over a plain `generate(requests, seed)`: each `step()` generates every
    request added since the last one, in one call, and returns them all."""

    def __init__(self, engine, seed: int | None):
        self.engine, self.seed, self.calls = engine, seed, 0
        self.pending: dict[int, GenerationRequest] = {}
        self.next_id = 0

    def add(self, request: GenerationRequest) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.pending[rid] = request
        return rid

    def progress(self, rid: int) -> None:
        """A lockstep engine shows no partial work: a request's tokens arrive when `step` returns it."""
        return None

    def cancel(self, rid: int) -> None:
        self.pending.pop(rid, None)

    def step(self) -> list[tuple[int, list[Completion]]]:
        ready = []
        if self.pending:
            ids, requests = zip(*self.pending.items())
            self.pending.clear()
            seed = None if self.seed is None else (self.seed * 1_000_003 + self.calls) % 2 ** 62
            self.calls += 1
            ready += list(zip(ids, self.engine.generate(list(requests), seed=seed)))
        return ready

    @property
    def done(self) -> bool:
        return not self.pending


def open_stream(engine, seed: int | None):
    """The engine's own continuous stream where it has one, else `LockstepStream` over `generate`."""
    own = getattr(engine, "stream", None)
    return own(seed) if callable(own) else LockstepStream(engine, seed)
