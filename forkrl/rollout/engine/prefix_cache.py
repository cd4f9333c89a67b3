"""PrefixCache: key/value states of token prefixes the engine already ran, kept so that a request
starting with one of them prefills only the tokens after it.

What reuses it: the `n` samples of a prompt asked for again (evaluation after training, BroRL's large
N), a trajectory continued after a tool call, and a branch forked from the middle of a sequence (tree
samplers). A request matches the longest stored prefix; any stored sequence that begins with the
request's first tokens serves, however much longer it is.

Lookup walks the request in blocks of `block` tokens through a hash index (each block's key chains
the keys before it, as in vLLM's automatic prefix caching), then extends token by token inside the
matched entry, and finally compares the tokens themselves, so a hash collision cannot return wrong
states. Memory is bounded in bytes; the least recently used entries go first.

Stored states are only valid for the weights that computed them: the engine clears the cache when
the policy changes (`TorchEngine.weights_updated`).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class _Entry:
    tokens: list[int]
    kv: torch.Tensor                         # [layers, 2, heads, len, head_dim]
    keys: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PrefixCache:
    def __init__(self, max_bytes: int = 512 * 2**20, block: int = 16, candidates: int = 64):
        self.max_bytes = max_bytes
        self.block = block
        self.candidates = candidates     # entries compared token by token after the block walk
        self.entries: OrderedDict[int, _Entry] = OrderedDict()
        self.index: dict[int, list[int]] = {}   # chained block key -> ids of the entries holding it, newest last
        self.bytes = 0
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.entries)

    def _block_keys(self, tokens: list[int]) -> list[int]:
        keys, h = [], 0
        for b in range(len(tokens) // self.block):
            h = hash((h, tuple(tokens[b * self.block:(b + 1) * self.block])))
            keys.append(h)
        return keys

    def lookup(self, tokens: list[int], max_len: int | None = None) -> tuple[int, torch.Tensor | None]:
        """(length, states [layers, 2, heads, length, head_dim]) of the longest stored prefix of
        `tokens`, at most `max_len` long; (0, None) when nothing matches."""
        best, n = self.match(tokens, max_len)
        if best is None:
            return 0, None
        self.entries.move_to_end(best)
        return n, self.entries[best].kv[:, :, :, :n]

    def match(self, tokens: list[int], max_len: int | None = None) -> tuple[int | None, int]:
        """(entry id, matched length) of the entry sharing the longest prefix with `tokens`."""
        limit = len(tokens) if max_len is None else min(max_len, len(tokens))
        holders: list[int] = []
        depth = 0
        for key in self._block_keys(tokens[:limit]):
            found = self.index.get(key)
            if not found:
                break
            holders, depth = found, depth + 1
        # every holder shares the first `depth` blocks; the longest continuation past them wins
        base = depth * self.block
        best, best_n = None, 0
        for entry_id in holders[-self.candidates:]:
            entry = self.entries[entry_id]
            n, stop = base, min(limit, len(entry.tokens))
            while n < stop and entry.tokens[n] == tokens[n]:
                n += 1
            if n > best_n:
                best, best_n = entry_id, n
        # the block keys are hashes: check the whole match, so a collision cannot return wrong states
        if best is None or self.entries[best].tokens[:best_n] != tokens[:best_n]:
            return None, 0
        return best, best_n

    def insert(self, tokens: list[int], kv: torch.Tensor) -> bool:
        """Store the states of `tokens` (kv: [layers, 2, heads, len(tokens), head_dim]). Returns False
        when it is shorter than a block, already covered by a stored entry, or larger than the budget."""
        if len(tokens) < self.block or kv.shape[3] != len(tokens):
            return False
        best, n = self.match(tokens)
        if n == len(tokens):
            return False
        if best is not None and n == len(self.entries[best].tokens):
            self._evict(best)  # the new sequence extends this one (a turn after the last): keep the longer
        entry = _Entry(list(tokens), kv.contiguous())
        if entry.nbytes > self.max_bytes:
            return False
        while self.entries and self.bytes + entry.nbytes > self.max_bytes:
            self._evict()
        entry_id = self._next_id
        self._next_id += 1
        entry.keys = self._block_keys(entry.tokens)
        for key in entry.keys:
            self.index.setdefault(key, []).append(entry_id)
        self.entries[entry_id] = entry
        self.bytes += entry.nbytes
        return True

    def _evict(self, entry_id: int | None = None) -> None:
        """Remove one entry: the given one, or the least recently used."""
        if entry_id is None:
            entry_id, entry = self.entries.popitem(last=False)
        else:
            entry = self.entries.pop(entry_id)
        self.bytes -= entry.nbytes
        for key in entry.keys:
            holders = self.index[key]
            holders.remove(entry_id)
            if not holders:
                del self.index[key]

    def clear(self) -> None:
        self.entries.clear()
        self.index.clear()
        self.bytes = 0
