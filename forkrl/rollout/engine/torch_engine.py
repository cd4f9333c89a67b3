"""TorchEngine: sampling in this process, on CPU or one CUDA GPU, through the fast runner
(`runner.DecoderRunner`: Llama, Qwen2, Qwen3). Per new token it reports the id, the log-prob and the
entropy of the full next-token distribution.

    while not scheduler.done:                               # TorchStream.step, one pass per call
        logits = self._admit_waiting(scheduler, logits)     # prefill new sequences into free slots
        tokens = self._sample(scheduler, logits, ...)       # one token per running sequence; retire the finished
        logits = self._decode(scheduler, tokens)            # one forward over the running slots

`generate` adds its requests to a `TorchStream` and steps it until every one finished; samplers that
react to finished work open the stream themselves (`forkrl.rollout.engine.stream`).

The runner keeps its own copy of the weights in the sampling dtype (bf16 by default where the CPU or
GPU has bf16 units), refreshed on the first `generate` after `weights_updated()`
(`stats.sync_seconds`). Models the runner does not support run on `HFEngine` (hf_engine.py), which
`build_local_engine` picks for them.

Prefix reuse: identical prompts admitted together share one prefill, and a `PrefixCache` keeps the
states of prompts (those that ran more than a block of new tokens) and, on request, of finished
sequences across calls, so a prompt that starts with a stored sequence prefills only its remaining
tokens. `stats.prefill_tokens` counts tokens run
through the model, `stats.cached_tokens` the prompt tokens served from the cache.

Same seed and same batch composition give the same samples.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import torch

from forkrl.cpu import tune_allocator
from forkrl.models.adapters import active_adapter, one_adapter
from forkrl.registry import register_engine
from forkrl.rollout.engine.prefix_cache import PrefixCache
from forkrl.rollout.engine.runner import (
    DecoderRunner,
    SharedKeys,
    resolve_dtype,
    unsupported_reason,
)
from forkrl.rollout.engine.sampling import (
    generator_for,
    record_top,
    sample_next,
    sampling_tensors,
)
from forkrl.rollout.engine.scheduler import Scheduler
from forkrl.rollout.engine.sequence import Sequence, eos_and_pad_ids, sequences_of
from forkrl.types import (
    ENGINE_FEATURES,
    Completion,
    EngineStats,
    GenerationRequest,
    shared_prefix,
)

log = logging.getLogger(__name__)


def build_local_engine(model, tokenizer, max_batch_size: int = 64, prefix_cache_mb: float = 512,
                       dtype: str | None = None, cuda_graphs: bool = True):
    """TorchEngine where the fast runner supports the model, else HFEngine (same outputs, slower)."""
    reason = unsupported_reason(model)
    if reason is None:
        return TorchEngine(model, tokenizer, max_batch_size=max_batch_size, prefix_cache_mb=prefix_cache_mb,
                           dtype=dtype, cuda_graphs=cuda_graphs)
    from forkrl.rollout.engine.hf_engine import HFEngine
    log.info("forkrl: the fast engine cannot run this model (%s); sampling with the Hugging Face forward", reason)
    return HFEngine(model, tokenizer, max_batch_size=max_batch_size, prefix_cache_mb=prefix_cache_mb)


def _build_torch(rollout, model, tokenizer, seed: int = 0):
    return build_local_engine(model, tokenizer, max_batch_size=rollout.max_batch_size,
                              prefix_cache_mb=rollout.prefix_cache_mb, dtype=rollout.engine_dtype,
                              cuda_graphs=rollout.cuda_graphs)


@register_engine("torch", build=_build_torch)
class TorchEngine:
    """Continuous batching over the runner's preallocated key/value cache (see the module docstring).

    dtype: the sampling weights' dtype (see `resolve_dtype`; default: the model's own). The learner
    keeps training its own (float32) weights; the engine copies them on the next call after
    `weights_updated()`. cuda_graphs: replay captured decode steps on CUDA (`DecoderRunner.decode`).
    """

    supports = ENGINE_FEATURES  # exact entropies, HAPO's per-token temperature, stop_when, prefix cache, top-k

    def __init__(self, model, tokenizer, max_batch_size: int = 64, prefix_cache_mb: float = 512,
                 dtype: str | None = None, cuda_graphs: bool = True):
        self.model = model
        if self.device.type == "cpu":
            tune_allocator()
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_ids, self.pad_id = eos_and_pad_ids(model, tokenizer)
        self.stats = EngineStats()
        self.dtype = resolve_dtype(dtype, model)
        # refuses, naming why, a model it cannot run
        self.runner = DecoderRunner(model, self.dtype, cuda_graphs=cuda_graphs)
        self.stats.sync_seconds += self.runner.last_sync_seconds
        self.stats.syncs += 1
        self._stale = False
        self._adapter: str | None = None  # the LoRA adapter the sampling weights hold (None: as the model is)

    def weights_updated(self) -> None:
        """The policy changed: stored prefix states no longer match it, and the sampling weights are
        refreshed on the next call."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self._stale = True

    def _sync(self, adapter: str | None) -> None:
        """Sampling weights for `adapter`, copied again when the policy changed or another adapter
        is asked for (whose stored prefix states then no longer apply)."""
        if adapter != self._adapter and self.prefix_cache is not None:
            self.prefix_cache.clear()
        if self._stale or adapter != self._adapter:
            with active_adapter(self.model, adapter):
                self.stats.sync_seconds += self.runner.sync()
            self.stats.syncs += 1
            self._stale, self._adapter = False, adapter

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stream(self, seed: int | None = None) -> TorchStream:
        """An open continuous batch: requests join while it runs (stream.py)."""
        return TorchStream(self, seed)

    def generate(self, requests: list[GenerationRequest], seed: int | None = None,
                 stop_when: Callable[[list[int]], bool] | None = None) -> list[list[Completion]]:
        """Sample `params.n` completions for each request; returns them per request, in order.

        stop_when(finished) is asked whenever completions finish, with the number of finished
        completions of each request so far; when it answers True, generation stops and every
        unfinished completion comes back as it is, with finish "abort" (APRIL's partial rollouts)."""
        n_seqs = sum(r.params.n for r in requests)
        stream = TorchStream(self, seed, slots=min(self.max_batch_size, n_seqs),
                             capacity=max((len(r.prompt_ids) + r.params.max_tokens for r in requests), default=1),
                             requests=requests)
        if stop_when is not None:
            finished = [0] * len(requests)

            def check(done: list[Sequence]) -> bool:
                for q in done:
                    finished[q.request] += 1
                return stop_when(finished)
            stream.stop_when = check
        ids = [stream.add(r) for r in requests]
        out: dict[int, list[Completion]] = {}
        while not stream.done:
            out.update(stream.step())
        return [out[i] for i in ids]

    # -- the engine loop (TorchStream.step runs it one step at a time) -----------------------------
    def _admit_waiting(self, scheduler: Scheduler, logits: torch.Tensor | None) -> torch.Tensor:
        """Prefill waiting sequences into free slots, then compact when nothing waits; the logits
        follow their sequences."""
        placed = scheduler.admit()
        if placed:
            new_at = {j for _, j in placed}
            running = [(j, q) for j, q in enumerate(scheduler.slots) if q is not None and j not in new_at]
            new_logits = self._admit([q for q, _ in placed], [j for _, j in placed], running)
            full = new_logits.new_empty((len(scheduler.slots), new_logits.shape[1]))
            if logits is not None:
                full[:len(logits)] = logits[:len(full)]
            full[[j for _, j in placed]] = new_logits
            logits = full
        for src, dst in scheduler.compact():
            self.runner.copy(src, dst, scheduler.slots[dst].length)
            logits[dst] = logits[src]
        return logits[:len(scheduler.slots)]

    def _sample(self, scheduler: Scheduler, logits: torch.Tensor, generator, eos: torch.Tensor, check
                ) -> torch.Tensor | None:
        """One token for every running sequence (slots 0..n-1, no holes after `_admit_waiting`);
        finished sequences leave their slots. Returns the sampled tokens, or None when generation
        ends here (all done, or `stop_when` said stop)."""
        rows = list(scheduler.slots)
        self.stats.steps += 1
        pending = [j for j, q in enumerate(rows) if q.pending]
        if pending:
            last = torch.tensor([rows[j].prompt[-1] for j in pending], device=self.device, dtype=torch.long)
            for j in pending:
                rows[j].pending = False
            if len(pending) == len(rows):   # nothing to sample: no draws taken, so a cached prompt samples as a fresh one
                return last
        temperature, top_p, hapo = sampling_tensors([q.params for q in rows], self.device)
        tok, logp, ent = sample_next(logits, temperature, top_p, generator, hapo)
        if pending:   # these rows have no logits yet: they feed their last prompt token instead
            tok[pending] = last.to(tok.dtype)
        self.stats.decode_tokens += len(rows) - len(pending)
        fed = set(pending)
        want_top = max(q.params.logprobs for q in rows)
        if want_top:
            keep = [j for j in range(len(rows)) if j not in fed]
            record_top([rows[j] for j in keep], logits[keep] if fed else logits,
                       temperature[keep] if fed else temperature, want_top)
        is_eos = torch.isin(tok, eos).tolist()
        done = [q for j, (q, t, lp, h, e) in enumerate(zip(rows, tok.tolist(), logp.tolist(), ent.tolist(), is_eos))
                if j not in fed and q.append(t, lp, h, e, self.tokenizer)]
        aborted = bool(done) and check is not None and check(done)
        if aborted:
            scheduler.abort()
        for j, q in enumerate(rows):
            if q.finish is not None:
                if q.keep_kv and len(q.ids) > 1 and self.prefix_cache is not None:
                    # the slot holds every token but the last sampled one, which was never fed
                    self._store_slot(j, q.prompt + q.ids[:-1])
                scheduler.retire(j)
        return None if aborted or scheduler.done else tok

    def _decode(self, scheduler: Scheduler, tokens: torch.Tensor) -> torch.Tensor | None:
        """One decode forward over slots 0..n-1, a contiguous view of the cache. Holes run a pad token
        at position 0 (their output is ignored; the next prefill into the slot overwrites it)."""
        slots = scheduler.slots
        if not slots:   # every row finished at once: the next admission starts afresh
            return None
        device = self.device
        feed = torch.where(torch.tensor([q is not None for q in slots], device=device), tokens[:len(slots)],
                           torch.full_like(tokens[:len(slots)], self.pad_id))
        starts = torch.tensor([q.length if q is not None else 0 for q in slots], device=device)
        logits = self.runner.decode(feed, starts, self._shared_keys(slots) if self.runner.reads_shared_keys else None)
        for q in slots:
            if q is not None:
                q.length += 1
        return logits

    # -- prefill with prefix reuse ---------------------------------------------------------------------
    def _admit(self, seqs: list[Sequence], slots: list[int], running: list[tuple[int, Sequence]] = ()
               ) -> torch.Tensor:
        """Prefill new sequences into free slots; returns their next-token logits [len(seqs), V].

        Reuse, in order: identical prompts run once and are copied to the other slots; each distinct
        prompt takes the longest prefix it shares with a stored sequence (the prefix cache) or with a
        running one (its slot: a fork of a sequence still being sampled); distinct prompts admitted
        together that share a prefix of at least one cache block (a system prompt, a few-shot header)
        run it once: in sorted order, each run of such prompts copies it from the run's first prompt,
        which is prefilled first. At least one token of every prompt runs: its state gives the
        next-token logits. When that is the only token left (a fork, a member continuing a chain, a
        cached prompt), it is fed with the next decode step (`Sequence.pending`; its logits row here
        is a placeholder) instead of a prefill forward, which costs about as much as a decode step."""
        runner = self.runner
        leader: dict[tuple[int, ...], int] = {}
        for k, q in enumerate(seqs):
            leader.setdefault(tuple(q.prompt), k)
        unique = sorted(set(leader.values()))
        start: dict[int, int] = {}
        for k in unique:
            prompt = seqs[k].prompt
            cached, kv = (0, None)
            if self.prefix_cache is not None:
                cached, kv = self.prefix_cache.lookup(prompt, max_len=len(prompt) - 1)
            src, n = self._running_prefix(prompt, running, least=max(16, cached + 1))
            if n > cached:
                runner.copy(src, slots[k], n)
                cached = n
            elif cached:
                runner.write(slots[k], kv)
            start[k] = cached
        donor: dict[int, tuple[int, int]] = {}   # follower -> (first prompt of its run, shared tokens)
        block = self.prefix_cache.block if self.prefix_cache is not None else 16
        ordered = sorted(unique, key=lambda k: seqs[k].prompt)
        root, run = None, 0
        for prev, k in itertools.pairwise(ordered):
            a, b = seqs[prev].prompt, seqs[k].prompt
            n = shared_prefix(a, b)
            if root is not None and min(run, n) >= block:
                run = min(run, n)
            elif prev not in donor:       # a donor must be prefilled before its followers
                root, run = prev, n
            else:
                root, run = None, 0
            shared = min(run, len(b) - 1)
            if root is not None and shared >= block and shared > start[k]:
                donor[k] = (root, shared)
            else:
                root, run = None, 0
        # one token left: it rides the next decode step (a donor's followers need its states now)
        sources = {src for src, _ in donor.values()}
        fold = {k for k in unique if start[k] == len(seqs[k].prompt) - 1 and k not in donor and k not in sources}
        logits = self._prefill_slots({k: start[k] for k in unique if k not in donor and k not in fold}, seqs, slots)
        for k, (src, shared) in donor.items():
            runner.copy(slots[src], slots[k], shared)
            start[k] = shared
        logits.update(self._prefill_slots({k: start[k] for k in donor}, seqs, slots))
        self.stats.cached_tokens += sum(start.values())
        self.stats.prefill_tokens += len(fold)
        for k in unique:
            # a prompt the cache or a live slot served all but a block of (a fork, a continuation) adds
            # too little to pay for copying its states out: every store copies the whole prompt
            if self.prefix_cache is not None and len(seqs[k].prompt) - start[k] > block:
                self._store_slot(slots[k], seqs[k].prompt)
        for k, q in enumerate(seqs):
            src = leader[tuple(q.prompt)]
            q.pending = src in fold
            q.length = len(q.prompt) - q.pending
            if src != k:
                runner.copy(slots[src], slots[k], q.length)
        self._link_shared(seqs, [q for _, q in running])
        if fold:   # a pending row's logits are never read
            blank = torch.zeros(runner.embed.shape[0], device=self.device)
            logits.update({k: blank for k in fold})
        return torch.stack([logits[leader[tuple(q.prompt)]] for q in seqs])

    # -- shared prefixes read once per decode step -------------------------------------------------------
    SHARE_AT_LEAST = 64   # shorter common prefixes are not worth a segment of their own
    MAX_SEGMENTS = 4      # links followed per row; past them the row's own slot serves (it holds the same states)

    def _link_shared(self, seqs: list[Sequence], running: list[Sequence]) -> None:
        """Point each new sequence at the live one (running, or admitted before it now) with which its
        prompt shares the longest prefix, when that is at least SHARE_AT_LEAST tokens: the samples of
        one prompt, prompts with a common header, a branch and its parent."""
        seen = list(running)
        for q in seqs:
            i, n = self._longest_prefix(q.prompt, seen, self.SHARE_AT_LEAST)
            q.shares, q.shares_len = (seen[i], min(n, q.length)) if i >= 0 else (None, 0)  # states it holds
            seen.append(q)

    def _shared_keys(self, slots: list[Sequence | None]) -> SharedKeys | None:
        """Per row, the slots its leading keys are read from, following `Sequence.shares` links, and an
        order that attends rows of one shared prefix back to back."""
        where = {id(q): j for j, q in enumerate(slots) if q is not None}
        self._relink(slots, where)
        rows: list[list[tuple[int, int]]] = []   # per row, (slot, keys up to) outermost first
        for q in slots:
            chain: list[tuple[int, int]] = []
            cur, limit = q, None
            while cur is not None and cur.shares is not None and len(chain) < self.MAX_SEGMENTS:
                limit = cur.shares_len if limit is None else min(limit, cur.shares_len)
                chain.append((where[id(cur.shares)], limit))
                cur = cur.shares
            chain.reverse()
            rows.append([seg for i, seg in enumerate(chain) if i == 0 or seg[1] > chain[i - 1][1]])
        shared = sum(r[-1][1] for r in rows if r)
        self.stats.attended_keys += sum(q.length + 1 for q in slots if q is not None)
        self.stats.shared_keys += shared
        if not shared:
            return None
        width = max(len(r) for r in rows)
        padded = [segs + [(-1, 0)] * (width - len(segs)) for segs in rows]  # one tensor call, not one per entry
        pairs = torch.tensor(padded, dtype=torch.long)
        # rows reading one prefix run back to back (the kernel splits the rows in contiguous runs per thread)
        order = sorted(range(len(rows)), key=lambda u: (rows[u][0][0] if rows[u] else u, u))
        return SharedKeys(pairs[..., 0].contiguous(), pairs[..., 1].contiguous(), torch.tensor(order, dtype=torch.long))

    @staticmethod
    def _relink(slots: list[Sequence | None], where: dict[int, int]) -> None:
        """Point every running row's link at a running row (or at none), so no link names a freed
        slot: the first row to find its link finished follows the finished one's own link and takes
        its place for the other rows linked to it, which share the smaller of the two prefixes with it."""
        heir: dict[int, tuple[Sequence, int]] = {}   # finished sequence -> (the row taking its place, shared)
        for q in slots:
            if q is None:
                continue
            nxt, n = q.shares, q.shares_len
            for _ in range(len(slots)):   # bounded: any path of links is valid, a loop is not useful
                if nxt is None or id(nxt) in where:
                    break
                if id(nxt) in heir:
                    other, m = heir[id(nxt)]
                    nxt, n = other, min(n, m)
                    break
                heir[id(nxt)] = (q, n)
                nxt, n = nxt.shares, min(n, nxt.shares_len)
            if nxt is not None and id(nxt) not in where:
                nxt, n = None, 0
            q.shares, q.shares_len = nxt, n

    @staticmethod
    def _running_prefix(prompt: list[int], running: list[tuple[int, Sequence]], least: int) -> tuple[int, int]:
        """(slot, length) of the running sequence whose fed tokens share the longest prefix with
        `prompt` (at most len(prompt) - 1, at least `least` tokens); (-1, 0) when none does."""
        i, n = TorchEngine._longest_prefix(prompt[:-1], [q for _, q in running], least)
        return (running[i][0], n) if i >= 0 else (-1, 0)

    @staticmethod
    def _longest_prefix(tokens: list[int], seqs: list[Sequence], least: int) -> tuple[int, int]:
        """(index, length) of the sequence among `seqs` whose fed tokens (the states in its slot) share
        the longest prefix with `tokens`, at least `least` long; (-1, 0) when none does."""
        best, best_n = -1, least - 1
        for i, q in enumerate(seqs):
            if q.length <= best_n:
                continue
            n = shared_prefix((q.prompt + q.ids)[:q.length], tokens)
            if n > best_n:
                best, best_n = i, n
        return (best, best_n) if best >= 0 else (-1, 0)

    def _prefill_slots(self, start: dict[int, int], seqs: list[Sequence], slots: list[int]) -> dict[int, torch.Tensor]:
        """Run prompts seqs[k] from token start[k] on (the slot holds the rest), in chunks of ~2k new
        tokens (the attention scores are [rows, heads, S, T]); next-token logits per k."""
        device = self.device
        logits: dict[int, torch.Tensor] = {}
        items = list(start.items())
        chunk: list[tuple[int, int]] = []
        budget = 0
        for n, (k, c) in enumerate(items):
            chunk.append((k, c))
            budget += len(seqs[k].prompt) - c
            if budget >= 2048 or n == len(items) - 1:
                rest = [seqs[k2].prompt[c2:] for k2, c2 in chunk]
                ids = torch.full((len(chunk), max(map(len, rest))), self.pad_id, dtype=torch.long)
                for r, toks in enumerate(rest):
                    ids[r, :len(toks)] = torch.tensor(toks)
                out = self.runner.forward(torch.tensor([slots[k2] for k2, _ in chunk], device=device), ids.to(device),
                                          torch.tensor([c2 for _, c2 in chunk], device=device),
                                          torch.tensor([len(t) for t in rest], device=device))
                self.stats.prefill_tokens += sum(map(len, rest))
                for r, (k2, _) in enumerate(chunk):
                    logits[k2] = out[r]
                chunk, budget = [], 0
        return logits

    def _store_slot(self, slot: int, tokens: list[int]) -> None:
        """Keep the states of a slot's first len(tokens) tokens in the prefix cache."""
        if len(tokens) < self.prefix_cache.block or self.prefix_cache.match(tokens)[1] == len(tokens):
            return  # too short to index, or already stored (or inside a longer stored sequence)
        self.prefix_cache.insert(tokens, self.runner.read(slot, len(tokens)))



class TorchStream:
    """TorchEngine's continuous batch, open to new requests between steps (stream.py): one
    Scheduler, one random stream and the pending logits live here across `step()` calls."""

    def __init__(self, engine: TorchEngine, seed: int | None, slots: int | None = None, capacity: int = 0,
                 requests=()):
        self.engine = engine
        self.scheduler = Scheduler([], slots or engine.max_batch_size)
        self.generator = generator_for(engine.device, seed, requests)
        self.eos = torch.tensor(engine.eos_ids, device=engine.device)
        self.logits: torch.Tensor | None = None
        self.seqs: dict[int, list[Sequence]] = {}     # requests not yet returned by step()
        self.stop_when: Callable[[list[Sequence]], bool] | None = None
        self.next_id = 0
        # one adapter per stream; the weights are synced for it (and refreshed after an update) here
        self.adapter = one_adapter(requests) if requests else None
        engine._sync(self.adapter)
        self.capacity = 0
        self._grow(capacity)

    def _grow(self, need: int) -> None:
        """Room for `need` tokens per slot; a longer request regrows the cache, keeping its contents."""
        if need > self.capacity:
            self.capacity = max(need, self.capacity and -(-need // 64) * 64)
            self.engine.runner.reserve(self.scheduler.n_slots, self.capacity, keep=bool(self.scheduler.slots))

    def add(self, request: GenerationRequest) -> int:
        if request.adapter != self.adapter:
            if self.seqs:
                raise ValueError(f"this stream samples with adapter {self.adapter!r} until its requests finish; "
                                 f"a request for {request.adapter!r} must wait")
            self.adapter = request.adapter
            self.engine._sync(self.adapter)
        rid, self.next_id = self.next_id, self.next_id + 1
        seqs = sequences_of([request])
        for q in seqs:
            q.request = rid
        self._grow(len(request.prompt_ids) + request.params.max_tokens)
        self.seqs[rid] = seqs
        self.scheduler.waiting.extend(seqs)
        return rid

    def progress(self, rid: int) -> list[Sequence]:
        return self.seqs[rid]

    def cancel(self, rid: int) -> None:
        """End a request now: its sequences come back from the next step with what they sampled,
        finish "abort"; with keep_kv the states of what a running one was fed stay in the prefix cache."""
        engine, scheduler = self.engine, self.scheduler
        for q in self.seqs.get(rid, []):
            if q.finish is not None:
                continue
            q.finish = "abort"
            if q in scheduler.waiting:
                scheduler.waiting.remove(q)
                continue
            j = scheduler.slots.index(q)
            if q.keep_kv and engine.prefix_cache is not None and q.length > len(q.prompt):
                engine._store_slot(j, (q.prompt + q.ids)[:q.length])
            scheduler.retire(j)

    @torch.inference_mode()
    def step(self) -> list[tuple[int, list[Completion]]]:
        """One step of the batch: admit waiting sequences, sample a token for every running one,
        decode. Returns the requests all of whose sequences have finished, with their completions."""
        engine, scheduler = self.engine, self.scheduler
        start = time.perf_counter()
        if not scheduler.done:
            self.logits = engine._admit_waiting(scheduler, self.logits)
            tokens = engine._sample(scheduler, self.logits, self.generator, self.eos, self.stop_when)
            self.logits = engine._decode(scheduler, tokens) if tokens is not None else None
        ready = [rid for rid, qs in self.seqs.items() if all(q.finish is not None for q in qs)]
        engine.stats.seconds += time.perf_counter() - start
        return [(rid, [q.completion(engine.tokenizer) for q in self.seqs.pop(rid)]) for rid in ready]

    @property
    def done(self) -> bool:
        return not self.seqs
