"""HFEngine: the reference engine, the Hugging Face forward in fixed batches (prompts left-padded,
finished rows dropped from a `DynamicCache`). Any causal LM runs on it, on CPU or GPU, with the same
outputs as `TorchEngine` (the tests compare them token by token); it is slower, and it is what
`build_local_engine` picks for a model the fast runner does not support. `rollout.engine: hf` asks for it.

Identical prompts in a batch are prefilled once, and the prefix cache serves stored prefixes as in
`TorchEngine`.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from forkrl.models.adapters import active_adapter, one_adapter
from forkrl.models.loader import cache_kwarg
from forkrl.registry import register_engine
from forkrl.rollout.engine.prefix_cache import PrefixCache
from forkrl.rollout.engine.sampling import (
    generator_for,
    record_top,
    sample_next,
    sampling_tensors,
)
from forkrl.rollout.engine.sequence import Sequence, eos_and_pad_ids, sequences_of
from forkrl.types import ENGINE_FEATURES, Completion, EngineStats, GenerationRequest


def _build_hf(rollout, model, tokenizer, seed: int = 0):
    return HFEngine(model, tokenizer, max_batch_size=rollout.max_batch_size, prefix_cache_mb=rollout.prefix_cache_mb)


@register_engine("hf", build=_build_hf)
class HFEngine:
    supports = ENGINE_FEATURES

    def __init__(self, model, tokenizer, max_batch_size: int = 64, prefix_cache_mb: float = 512):
        self.model = model
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder, self.head = base.get_decoder(), base.get_output_embeddings()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_ids, self.pad_id = eos_and_pad_ids(model, tokenizer)
        self.stats = EngineStats()
        self._adapter: str | None = None  # the adapter whose states the prefix cache holds

    def weights_updated(self) -> None:
        """Stored prefix states no longer match the policy (the forward reads the live weights)."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, requests: list[GenerationRequest], seed: int | None = None,
                 stop_when: Callable[[list[int]], bool] | None = None) -> list[list[Completion]]:
        """As `TorchEngine.generate`."""
        start = time.perf_counter()
        seqs = sequences_of(requests)
        generator = generator_for(self.device, seed, requests)
        finished = [0] * len(requests)

        def check(done: list[Sequence]) -> bool:
            for q in done:
                finished[q.request] += 1
            return stop_when is not None and stop_when(finished)

        adapter = one_adapter(requests)
        if adapter != self._adapter and self.prefix_cache is not None:
            self.prefix_cache.clear()  # stored states belong to the adapter that computed them
        self._adapter = adapter
        was_training = self.model.training
        self.model.eval()
        try:
            with active_adapter(self.model, adapter):
                aborted = False
                for b in range(0, len(seqs), self.max_batch_size):
                    batch = seqs[b:b + self.max_batch_size]
                    if aborted:
                        for q in batch:
                            q.finish = "abort"
                        continue
                    aborted = self._run_batch(batch, generator, check)
        finally:
            self.model.train(was_training)
        out: list[list[Completion]] = [[] for _ in requests]
        for q in seqs:
            out[q.request].append(q.completion(self.tokenizer) if q.ids or q.finish != "abort"
                                  else Completion([], [], [], "abort"))
        self.stats.seconds += time.perf_counter() - start
        return out

    @torch.inference_mode()
    def _run_batch(self, seqs: list[Sequence], generator, check) -> bool:
        """Sample one fixed batch to the end; True when `check` stopped generation."""
        device = self.device
        # identical prompts (the n samples of a request) are prefilled once and share their KV rows
        unique: dict[tuple[int, ...], int] = {}
        row_prompt = torch.tensor([unique.setdefault(tuple(q.prompt), len(unique)) for q in seqs], device=device)
        cache, mask, positions, logits = self._prefill([list(p) for p in unique])
        temperature, top_p, hapo = sampling_tensors([q.params for q in seqs], device)
        eos = torch.tensor(self.eos_ids, device=device)
        kv = {cache_kwarg(self.decoder): cache}
        if len(unique) < len(seqs):
            cache.batch_select_indices(row_prompt)
        logits, mask, next_pos = logits[row_prompt], mask[row_prompt], positions[row_prompt, -1] + 1
        want_top = max(q.params.logprobs for q in seqs)
        alive = list(seqs)
        aborted = False
        while alive:
            tok, logp, ent = sample_next(logits, temperature, top_p, generator, hapo)
            self.stats.decode_tokens += len(alive)
            if want_top:
                record_top(alive, logits, temperature, want_top)
            is_eos = torch.isin(tok, eos).tolist()
            done = [q for q, t, lp, h, e in zip(alive, tok.tolist(), logp.tolist(), ent.tolist(), is_eos)
                    if q.append(t, lp, h, e, self.tokenizer)]
            if done and check(done):
                for q in alive:
                    q.finish = q.finish or "abort"
                aborted = True
            if self.prefix_cache is not None:
                for j, q in enumerate(alive):
                    if q.finish is not None and q.keep_kv and len(q.ids) > 1:
                        # the cache holds every token but the last sampled one, which was never fed
                        self._store(cache, j, mask[j], q.prompt + q.ids[:-1])
            keep = [j for j, q in enumerate(alive) if q.finish is None]
            if not keep:
                break
            if len(keep) < len(alive):
                idx = torch.tensor(keep, device=device)
                cache.batch_select_indices(idx)
                mask, next_pos, tok = mask[idx], next_pos[idx], tok[idx]
                temperature, top_p = temperature[idx], top_p[idx]
                hapo = hapo[idx] if hapo is not None else None
                alive = [alive[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            hidden = self.decoder(input_ids=tok.unsqueeze(-1), attention_mask=mask,
                                  position_ids=next_pos.unsqueeze(-1), **kv, use_cache=True).last_hidden_state[:, -1]
            logits = self._logits(hidden)
            next_pos = next_pos + 1
        return aborted

    def _prefill(self, prompts: list[list[int]]):
        """Run the distinct prompts, reusing stored prefixes. Returns the batch's KV cache, attention
        mask [U, C + S], positions [U, C + S] and the next-token logits [U, V].

        Row layout: [padding | cached prefix (c_u tokens)] as past states, then [padding | the rest
        of the prompt] as input, so rows with different cached lengths batch together; the masks
        and explicit positions keep every row's attention and rotary positions as if it ran alone.
        """
        device = self.device
        U = len(prompts)
        hits = [(0, None)] * U
        if self.prefix_cache is not None:
            # keep at least one token to run: its state gives the next-token logits
            hits = [self.prefix_cache.lookup(p, max_len=len(p) - 1) for p in prompts]
        cached = [c for c, _ in hits]
        C, S = max(cached), max(len(p) - c for p, c in zip(prompts, cached))
        ids = torch.full((U, S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((U, C + S), dtype=torch.long)
        for u, (p, c) in enumerate(zip(prompts, cached)):
            rest = p[c:]
            ids[u, S - len(rest):] = torch.tensor(rest)
            mask[u, C - c:C] = 1
            mask[u, C + S - len(rest):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if C > 0:
            kv0 = next(kv for _, kv in hits if kv is not None)
            layers, _, heads, _, dim = kv0.shape
            past = torch.zeros((layers, 2, U, heads, C, dim), dtype=kv0.dtype, device=device)
            for u, (c, kv) in enumerate(hits):
                if c:
                    past[:, :, u, :, C - c:] = kv
            cache = DynamicCache(ddp_cache_data=[(past[layer, 0], past[layer, 1]) for layer in range(layers)])
        else:
            cache = DynamicCache()
        hidden = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions[:, C:],
                              **{cache_kwarg(self.decoder): cache}, use_cache=True).last_hidden_state[:, -1]
        self.stats.prefill_tokens += int(mask[:, C:].sum())
        self.stats.cached_tokens += sum(cached)
        if self.prefix_cache is not None:
            for u, p in enumerate(prompts):
                self._store(cache, u, mask[u], p)
        return cache, mask, positions, self._logits(hidden)

    def _store(self, cache, row: int, row_mask: torch.Tensor, tokens: list[int]) -> None:
        """Copy one batch row's states (its unmasked positions) into the prefix cache."""
        where = row_mask.nonzero().flatten()
        if len(where) != len(tokens) or len(tokens) < self.prefix_cache.block:
            return
        if self.prefix_cache.match(tokens)[1] == len(tokens):
            return  # already stored (or inside a longer stored sequence)
        kv = torch.stack([torch.stack([layer.keys[row][:, where], layer.values[row][:, where]])
                          for layer in cache.layers])
        self.prefix_cache.insert(tokens, kv)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary projection of [B, D] states. For a plain linear head, W @ h^T runs ~1.7x faster
        than F.linear(h, W) on CPU for a 49k x 576 weight at batch 32-128 (measured with MKL)."""
        head = self.head
        if type(head) is torch.nn.Linear:
            logits = torch.mm(head.weight, hidden.t()).t()
            return logits if head.bias is None else logits + head.bias
        return head(hidden)

