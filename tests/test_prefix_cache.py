"""Prefix reuse: the cache's own rules, and the engine's outputs with reuse equal to those without."""
import pytest
import torch

from forkrl.rollout import GenerationRequest, SamplingParams, TorchEngine
from forkrl.rollout.engine.prefix_cache import PrefixCache


def _kv(n, fill=1.0):  # [layers=2, 2, heads=1, n, dim=4]
    return torch.full((2, 2, 1, n, 4), fill) + torch.arange(n).view(1, 1, 1, n, 1)


def test_longest_prefix_wins_and_extends_inside_an_entry():
    cache = PrefixCache(block=4)
    cache.insert(list(range(10)), _kv(10))
    cache.insert(list(range(6)) + [99, 98, 97, 96], _kv(10, 5.0))
    n, kv = cache.lookup(list(range(9)) + [42])         # matches 9 tokens of the first entry
    assert n == 9 and kv.shape == (2, 2, 1, 9, 4) and float(kv[0, 0, 0, 8, 0]) == 9.0
    n, kv = cache.lookup(list(range(6)) + [99, 98, 1, 1])  # the second entry: 6 shared + 2 own tokens
    assert n == 8 and float(kv[0, 0, 0, 0, 0]) == 5.0
    assert cache.lookup(list(range(9)), max_len=5)[0] == 5   # the caller keeps tokens to run
    assert cache.lookup([7, 7, 7, 7, 7])[0] == 0
    assert cache.lookup([0, 1, 2])[0] == 0                   # shorter than a block: no key to find it by


def test_covered_sequences_are_not_stored_twice_and_lru_evicts_by_bytes():
    per_token = _kv(1).numel() * 4
    cache = PrefixCache(max_bytes=20 * per_token, block=4)
    assert cache.insert(list(range(8)), _kv(8))
    assert not cache.insert(list(range(6)), _kv(6))          # inside the stored sequence
    assert cache.insert([1] * 8, _kv(8))
    cache.lookup(list(range(8)))                             # touch: now the most recently used
    assert cache.insert([2] * 8, _kv(8))                     # 24 tokens > 20: evicts [1]*8
    assert cache.lookup([1] * 8)[0] == 0 and cache.lookup(list(range(8)))[0] == 8
    assert cache.bytes == 16 * per_token and len(cache) == 2
    assert not cache.insert(list(range(100, 130)), _kv(30))  # larger than the whole budget
    cache.clear()
    assert cache.lookup(list(range(8)))[0] == 0 and cache.bytes == 0


def test_an_evicted_entry_does_not_hide_an_older_one_sharing_its_prefix():
    per_token = _kv(1).numel() * 4
    cache = PrefixCache(max_bytes=20 * per_token, block=4)
    cache.insert(list(range(8)), _kv(8))
    cache.insert(list(range(4)) + [9, 9, 9, 9], _kv(8))     # shares the first block, and now serves it
    cache.lookup(list(range(8)))                             # keep the first one fresh
    cache.insert([5] * 8, _kv(8))                            # 24 tokens > 20: evicts the second
    assert len(cache) == 2 and cache.lookup(list(range(4)) + [9, 9, 9, 9])[0] == 4
    assert cache.lookup(list(range(8)))[0] == 8


PROMPT = ("You are a careful assistant. Count the apples in the basket, then add three more and "
          "tell me the total number of apples.")


def _engines(tiny):
    model, tok = tiny
    return TorchEngine(model, tok), TorchEngine(model, tok, prefix_cache_mb=0), tok


def _same(a, b):
    assert a.token_ids == b.token_ids
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert a.entropies == pytest.approx(b.entropies, abs=1e-4)


def test_a_repeated_prompt_prefills_one_token_and_samples_the_same(tiny):
    cached, plain, tok = _engines(tiny)
    ids = tok(PROMPT)["input_ids"]
    params = SamplingParams(temperature=1.0, max_tokens=8, n=3)
    first = cached.generate([GenerationRequest(ids, params)], seed=3)
    assert cached.stats.prefill_tokens == len(ids) and cached.stats.cached_tokens == 0
    again = cached.generate([GenerationRequest(ids, params)], seed=3)
    assert cached.stats.prefill_tokens == len(ids) + 1 and cached.stats.cached_tokens == len(ids) - 1
    reference = plain.generate([GenerationRequest(ids, params)], seed=3)
    for a, b, c in zip(first[0], again[0], reference[0]):
        _same(a, c)
        _same(b, c)


def test_continuing_and_forking_a_kept_sequence_reuse_its_states(tiny):
    cached, plain, tok = _engines(tiny)
    ids = tok(PROMPT)["input_ids"]
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    (first,), = cached.generate([GenerationRequest(ids, greedy, keep_kv=True)])
    assert len(first.token_ids) == 12
    # a tool result appended after the completion: only the last sampled token and the result run
    observation = tok(" <result>7</result>")["input_ids"]
    turn2 = ids + first.token_ids + observation
    before = cached.stats.prefill_tokens
    (cont,), = cached.generate([GenerationRequest(turn2, greedy)])
    assert cached.stats.prefill_tokens - before == 1 + len(observation)
    (ref,), = plain.generate([GenerationRequest(turn2, greedy)])
    _same(cont, ref)
    # a fork into 4 branches at token 5 of the completion: one token prefilled, shared by all four
    fork = ids + first.token_ids[:5]
    sampled = SamplingParams(temperature=1.0, max_tokens=6, n=4)
    before = cached.stats.prefill_tokens
    branches = cached.generate([GenerationRequest(fork, sampled)], seed=11)[0]
    assert cached.stats.prefill_tokens - before == 1 and len(branches) == 4
    for a, b in zip(branches, plain.generate([GenerationRequest(fork, sampled)], seed=11)[0]):
        _same(a, b)


def test_a_one_token_remainder_rides_the_decode_step(tiny, monkeypatch):
    """A prompt with all but its last token cached runs no prefill forward: the token is fed with the
    next decode step, beside running rows, and the continuation equals a fresh prompt's."""
    cached, plain, tok = _engines(tiny)
    ids = tok(PROMPT)["input_ids"]
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    (first,), = cached.generate([GenerationRequest(ids, greedy, keep_kv=True)])
    other = tok("An unrelated question that shares nothing at all with it?")["input_ids"]
    fork = GenerationRequest(ids + first.token_ids[:4], greedy)
    stream = cached.stream(seed=0)
    running = stream.add(GenerationRequest(other, greedy))
    stream.step()                                  # `other` is prefilled and decoding
    prefills = []
    forward = cached.runner.forward
    monkeypatch.setattr(cached.runner, "forward", lambda *a: prefills.append(a[1].shape) or forward(*a))
    before = cached.stats.prefill_tokens
    forked = stream.add(fork)
    out = {}
    while not stream.done:
        out.update(stream.step())
    assert prefills == [] and cached.stats.prefill_tokens - before == 1
    (ref_fork,), (ref_other,) = plain.generate([fork]), plain.generate([GenerationRequest(other, greedy)])
    _same(out[forked][0], ref_fork[0])
    _same(out[running][0], ref_other[0])


def test_rows_with_different_cached_lengths_batch_together(tiny):
    cached, plain, tok = _engines(tiny)
    ids = tok(PROMPT)["input_ids"]
    greedy = SamplingParams(temperature=0.0, max_tokens=10)
    (first,), = cached.generate([GenerationRequest(ids, greedy, keep_kv=True)])
    requests = [GenerationRequest(ids + first.token_ids[:k] + tok(" then")["input_ids"], greedy) for k in (0, 3, 9)]
    requests.append(GenerationRequest(tok("An unrelated question that shares nothing at all with it?")["input_ids"],
                                      greedy))
    outs = cached.generate(requests)
    assert cached.stats.cached_tokens >= 3 * (len(ids) - 1)
    for (a,), (b,) in zip(outs, plain.generate(requests)):
        _same(a, b)


def test_weight_updates_clear_the_cache(tiny):
    cached, _, tok = _engines(tiny)
    ids = tok(PROMPT)["input_ids"]
    cached.generate([GenerationRequest(ids, SamplingParams(max_tokens=2))], seed=0)
    assert len(cached.prefix_cache) == 1
    cached.weights_updated()
    before = cached.stats.prefill_tokens
    cached.generate([GenerationRequest(ids, SamplingParams(max_tokens=2))], seed=0)
    assert cached.stats.prefill_tokens - before == len(ids)


def test_a_sequence_that_extends_a_stored_one_replaces_it():
    cache = PrefixCache(block=4)
    cache.insert(list(range(8)), _kv(8))
    assert cache.insert(list(range(12)), _kv(12))          # the next turn of the same episode
    assert len(cache) == 1 and cache.bytes == _kv(12).numel() * 4
    assert cache.lookup(list(range(8)) + [50])[0] == 8
