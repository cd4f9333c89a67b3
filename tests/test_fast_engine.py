"""The engine's fast path (DecoderRunner, continuous batching, bf16 sampling weights) changes nothing it
should not: the same tokens, log-probs and entropies as the Hugging Face reference path, whatever
the slot count; weight updates reach the sampling weights; bf16 stays within bf16 tolerance."""
import copy
import itertools
import math

import pytest
import torch

from forkrl.rollout import GenerationRequest, HFEngine, SamplingParams, TorchEngine
from forkrl.rollout.engine import resolve_dtype
from forkrl.rollout.engine.runner import DecoderRunner

PROMPTS = ["Hello there, how are you?", "2 + 2 =", "Write one word.", "Count to five slowly, please, one by one"]


def _requests(tok, **params):
    lengths = [7, 3, 12, 9]
    return [GenerationRequest(tok(p)["input_ids"], SamplingParams(max_tokens=m, **params))
            for p, m in zip(PROMPTS, lengths)]


def _close(a, b, tol=2e-4):
    assert a.token_ids == b.token_ids
    assert a.finish == b.finish
    assert a.logprobs == pytest.approx(b.logprobs, abs=tol)
    assert a.entropies == pytest.approx(b.entropies, abs=tol)


@pytest.mark.parametrize("slots", [1, 3, 64])
def test_fast_path_matches_the_reference_path(tiny, slots):
    """Greedy and seeded sampling, n > 1, rows of different lengths; with fewer slots than rows the
    engine refills and compacts slots as rows finish, and every row still gets exactly its tokens."""
    model, tok = tiny
    reference = HFEngine(model, tok, prefix_cache_mb=0)
    fast = TorchEngine(model, tok, max_batch_size=slots, prefix_cache_mb=0)
    greedy = _requests(tok, temperature=0.0, n=2)
    for a, b in zip(fast.generate(greedy), reference.generate(greedy)):
        for x, y in zip(a, b):
            _close(x, y)
    assert fast.stats.decode_tokens == reference.stats.decode_tokens == 2 * (7 + 3 + 12 + 9)


def test_same_seed_same_samples_with_refills(tiny):
    """Same seed and batch composition: same samples, also when rows wait for slots."""
    model, tok = tiny
    reqs = _requests(tok, temperature=1.0, n=3)
    fast = TorchEngine(model, tok, max_batch_size=5, prefix_cache_mb=0)
    a, b = fast.generate(reqs, seed=5), fast.generate(reqs, seed=5)
    assert [c.token_ids for o in a for c in o] == [c.token_ids for o in b for c in o]
    assert [len(c.token_ids) for o in a for c in o] == [7] * 3 + [3] * 3 + [12] * 3 + [9] * 3
    c = fast.generate(reqs, seed=6)
    assert [x.token_ids for o in a for x in o] != [x.token_ids for o in c for x in o]


def test_stop_strings_eos_and_abort_on_the_fast_path(tiny):
    model, tok = tiny
    fast = TorchEngine(model, tok, max_batch_size=2)
    prompt = tok("2 + 2 =")["input_ids"]
    (base,), = fast.generate([GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=8))])
    stop = tok.decode(base.token_ids[2:4])
    assert stop.strip() and stop not in tok.decode(base.token_ids[:3])
    (stopped,), = fast.generate([GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=8, stop=[stop]))])
    assert stopped.finish == "stop" and stopped.token_ids == base.token_ids[:4]
    # stop_when: abort as soon as one completion of request 0 finished; 3 rows, 2 slots
    reqs = [GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=2)),
            GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=8)),
            GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=8))]
    out = fast.generate(reqs, stop_when=lambda finished: finished[0] >= 1)
    assert out[0][0].finish == "length" and len(out[0][0].token_ids) == 2
    assert out[1][0].finish == "abort" and out[1][0].token_ids == base.token_ids[:2]
    assert out[2][0].finish == "abort" and out[2][0].token_ids == []   # never admitted


def test_weight_updates_reach_the_sampling_weights(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    engine = TorchEngine(m, tok, prefix_cache_mb=0)
    reqs = _requests(tok, temperature=0.0)
    before = engine.generate(reqs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    engine.weights_updated()
    syncs = engine.stats.syncs
    after = engine.generate(reqs)
    assert engine.stats.syncs == syncs + 1 and engine.stats.sync_seconds > 0
    fresh = HFEngine(m, tok, prefix_cache_mb=0).generate(reqs)
    for x, y in zip(after, fresh):
        _close(x[0], y[0])
    assert [o[0].token_ids for o in after] != [o[0].token_ids for o in before]


def test_lora_adapters_are_merged_into_the_sampling_weights(tiny):
    from peft import LoraConfig, get_peft_model
    model, tok = tiny
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would hide a missing merge
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    fast = TorchEngine(peft_model, tok, prefix_cache_mb=0)
    assert fast.runner is not None
    reqs = _requests(tok, temperature=0.0)
    for a, b in zip(fast.generate(reqs), HFEngine(peft_model, tok).generate(reqs)):
        for x, y in zip(a, b):
            # W + s B A in one matmul rounds differently from W x + s B (A x); the tiny model's
            # logits are in the hundreds, so float32 rounding reaches ~1e-3 nats
            _close(x, y, tol=2e-3)


def test_auto_dtype_is_bf16_only_where_it_pays(tiny):
    model, _ = tiny
    assert resolve_dtype("auto", model) == torch.float32   # 2 layers x 64: all overhead, no bf16
    assert resolve_dtype(None, model) == torch.float32
    assert resolve_dtype("bfloat16", model) == torch.bfloat16
    with pytest.raises(ValueError, match="engine dtype must be one of"):
        resolve_dtype("int8", model)


def test_autocast_auto_follows_the_measured_bf16_speed_on_a_cpu(monkeypatch):
    """On a CPU with native bf16, "auto" autocast is on only where bf16 products of the model's own
    shapes measured at least BF16_MIN_SPEEDUP times float32's speed (some AVX-512 BF16 Xeons
    multiply faster in float32); without native bf16 nothing is measured."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import forkrl.cpu
    import forkrl.rollout.engine.runner as runner
    from forkrl.train.forward import BF16_MIN_SPEEDUP, resolve_autocast

    model = LlamaForCausalLM(LlamaConfig(vocab_size=20_000, hidden_size=256, intermediate_size=768,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
    assert sum(p.numel() for p in model.parameters()) >= 10_000_000   # big enough for bf16 to be considered
    asked = []

    def measured(speedup):
        def fake(k, n):
            asked.append((k, n))
            return speedup
        return fake

    monkeypatch.setattr(runner, "_cpu_has_bf16", lambda: True)
    monkeypatch.setattr(forkrl.cpu, "bf16_matmul_speedup", measured(0.6))     # an AVX-512 BF16 Xeon
    assert resolve_autocast("auto", model) is False
    assert resolve_dtype("auto", model) == torch.bfloat16                        # decoding keeps bf16
    monkeypatch.setattr(forkrl.cpu, "bf16_matmul_speedup", measured(BF16_MIN_SPEEDUP - 0.01))
    assert resolve_autocast("auto", model) is False
    monkeypatch.setattr(forkrl.cpu, "bf16_matmul_speedup", measured(4.2))     # an AVX-512 BF16 EPYC
    assert resolve_autocast("auto", model) is True
    assert asked == [(256, 768)] * 3                                             # the model's hidden x MLP
    assert resolve_autocast(False, model) is False and resolve_autocast(True, model) is True
    monkeypatch.setattr(runner, "_cpu_has_bf16", lambda: False)                 # AVX2: emulated bf16
    assert resolve_autocast("auto", model) is False and len(asked) == 3


def test_bf16_speed_is_measured_once_per_shape_and_leaves_the_random_state_alone():
    from forkrl.cpu import bf16_matmul_speedup
    bf16_matmul_speedup.cache_clear()   # a cached figure from earlier in the process would time nothing here
    state = torch.get_rng_state()
    first = bf16_matmul_speedup(64, 96, rows=32, repeats=1)
    assert torch.equal(torch.get_rng_state(), state)   # a run's draws do not depend on the timing
    assert math.isfinite(first) and first > 0
    assert bf16_matmul_speedup(64, 96, rows=32, repeats=1) == first   # cached: no second timing


def test_runner_prefill_and_decode_match_a_full_forward(tiny):
    """Ragged prefill after a cached start, then decode, on non-contiguous slots."""
    model, tok = tiny
    runner = DecoderRunner(model, torch.float32)
    runner.reserve(4, 32)
    a, b = tok(PROMPTS[0])["input_ids"], tok(PROMPTS[3])["input_ids"]
    runner.forward(torch.tensor([3]), torch.tensor([a[:2]]), torch.tensor([0]), torch.tensor([2]))
    ids = torch.zeros((2, len(b)), dtype=torch.long)
    ids[0, :len(a) - 2] = torch.tensor(a[2:])
    ids[1] = torch.tensor(b)
    logits = runner.forward(torch.tensor([3, 1]), ids, torch.tensor([2, 0]), torch.tensor([len(a) - 2, len(b)]))
    with torch.no_grad():
        ref = [model(torch.tensor([p])).logits[0, -1] for p in (a, b)]
    for got, want in zip(logits, ref):
        assert (got - want).abs().max() < 1e-4
    nxt = runner.forward(torch.tensor([3, 1]), torch.tensor([[5], [6]]), torch.tensor([len(a), len(b)]),
                         torch.tensor([1, 1]))
    with torch.no_grad():
        ref = [model(torch.tensor([p + [t]])).logits[0, -1] for p, t in ((a, 5), (b, 6))]
    for got, want in zip(nxt, ref):
        assert (got - want).abs().max() < 1e-4


@pytest.mark.slow
def test_bf16_engine_stays_within_bf16_tolerance_of_float32():
    """Embedded model: bf16 sampling weights vs a float32 forward of the same tokens. Log-probs and
    entropies agree to bf16 precision, and each greedy bf16 token is the float32 argmax or a near tie."""
    from forkrl.models import load_policy
    model, tok = load_policy("smollm2-135m")
    questions = ["What is 3 + 4?", "Name a colour.", "Write a haiku about the sea.", "What is 12 times 3?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for q in questions]
    engine = TorchEngine(model, tok, dtype="bfloat16")
    assert engine.runner.dtype == torch.bfloat16
    for temperature in (0.0, 1.0):
        outs = engine.generate([GenerationRequest(p, SamplingParams(temperature=temperature, max_tokens=24))
                                for p in prompts], seed=0)
        for p, (c,) in zip(prompts, outs):
            with torch.no_grad():
                logits = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1].float()
            logp = torch.log_softmax(logits, -1)
            ref_lp = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            ref_ent = -(logp.exp() * logp).sum(-1)
            lp_err = (torch.tensor(c.logprobs) - ref_lp).abs()
            ent_err = (torch.tensor(c.entropies) - ref_ent).abs()
            assert lp_err.mean() < 0.05 and lp_err.max() < 0.3, lp_err
            assert ent_err.mean() < 0.05 and ent_err.max() < 0.3, ent_err
            if temperature == 0.0:
                gap = logp.max(-1).values - ref_lp  # 0 where the bf16 token is the float32 argmax
                assert (gap < 0.1).all(), gap


def test_prompts_admitted_together_run_their_shared_prefix_once(tiny):
    """Distinct prompts with a common header (a system prompt): the header is prefilled once and
    copied; outputs equal the reference path's, which runs every prompt in full."""
    model, tok = tiny
    header = tok("You are a careful assistant. Answer with one number and nothing else, please.")["input_ids"]
    assert len(header) >= 16
    tails = [tok(f" Question {q}: what is {q} plus {q}?")["input_ids"] for q in (3, 4, 5)]
    reqs = [GenerationRequest(header + t, SamplingParams(temperature=0.0, max_tokens=5)) for t in tails]
    fast = TorchEngine(model, tok, prefix_cache_mb=0)
    outs = fast.generate(reqs)
    shared = len(header) + min(next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) for a, b in itertools.pairwise(tails))
    assert fast.stats.prefill_tokens == sum(len(r.prompt_ids) for r in reqs) - 2 * shared
    assert fast.stats.cached_tokens == 2 * shared
    for a, b in zip(outs, HFEngine(model, tok, prefix_cache_mb=0).generate(reqs)):
        _close(a[0], b[0])


def test_stream_admits_requests_between_steps_and_cancels_into_the_cache(tiny):
    """A request added while others run gets the tokens it gets alone (greedy), also when it is
    longer than the cache was sized for (the cache regrows and keeps the running rows); a cancelled
    request returns what it sampled, and with keep_kv its continuation prefills one token."""
    model, tok = tiny
    engine = TorchEngine(model, tok, max_batch_size=3, prefix_cache_mb=64)
    reqs = _requests(tok, temperature=0.0)
    alone = [engine.generate([r])[0][0] for r in reqs]
    long = GenerationRequest(reqs[2].prompt_ids, SamplingParams(temperature=0.0, max_tokens=40))
    (long_alone,), = engine.generate([long])
    engine.weights_updated()                       # nothing cached from the runs alone
    stream = engine.stream(seed=0)
    got, ids = {}, [stream.add(reqs[0]), stream.add(reqs[1])]
    for _ in range(2):
        got.update(stream.step())
    ids += [stream.add(reqs[2]), stream.add(reqs[3]), stream.add(long)]   # regrows the cache mid-run
    while not stream.done:
        got.update(stream.step())
    for rid, ref in zip(ids, [*alone, long_alone]):
        _close(got[rid][0], ref)
    # cancel after 20 tokens (a prefix cache entry needs 16); the continuation starts from its states
    chain = GenerationRequest(reqs[3].prompt_ids, SamplingParams(temperature=0.0, max_tokens=40), keep_kv=True)
    stream = engine.stream(seed=0)
    rid = stream.add(chain)
    while len(stream.progress(rid)[0].ids) < 20:
        assert stream.step() == []
    stream.cancel(rid)
    ((_, (part,)),) = stream.step()
    assert part.finish == "abort" and len(part.token_ids) == 20
    (ref,), = engine.generate([GenerationRequest(reqs[3].prompt_ids, SamplingParams(temperature=0.0, max_tokens=40))])
    assert part.token_ids == ref.token_ids[:20]
    before = engine.stats.prefill_tokens
    (rest,), = engine.generate([GenerationRequest(reqs[3].prompt_ids + part.token_ids,
                                                  SamplingParams(temperature=0.0, max_tokens=20))])
    assert engine.stats.prefill_tokens - before == 1
    assert part.token_ids + rest.token_ids == ref.token_ids


def test_a_fork_of_a_running_sequence_copies_its_states(tiny):
    """A request that continues part of a sequence still being sampled (a tree fork) takes the states
    from that sequence's slot and prefills only its own tokens; it samples what it samples alone."""
    model, tok = tiny
    engine = TorchEngine(model, tok, max_batch_size=4, prefix_cache_mb=0)
    prompt = _requests(tok)[0].prompt_ids
    stream = engine.stream(seed=0)
    parent = stream.add(GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=40)))
    while len(stream.progress(parent)[0].ids) < 20:
        stream.step()
    head = prompt + stream.progress(parent)[0].ids[:18]
    fork = GenerationRequest(head + [(head[-1] + 1) % 50], SamplingParams(temperature=0.0, max_tokens=6))
    before = engine.stats.prefill_tokens
    rid = stream.add(fork)
    got = {}
    while not stream.done:
        got.update(stream.step())
    assert engine.stats.prefill_tokens - before == 1
    _close(got[rid][0], engine.generate([fork])[0][0])


def test_rows_sharing_a_prefix_read_it_once_and_sample_the_same(tiny):
    """Samples of prompts with a long common header: decode steps read the header (and each prompt)
    from one slot for all the rows that share it (`stats.shared_keys`), and sample exactly what each
    row samples reading its own slot (same seed: same tokens, same log-probs)."""
    model, tok = tiny
    header = tok(" ".join(["You are a careful assistant who answers arithmetic with one number."] * 6))["input_ids"]
    assert len(header) >= TorchEngine.SHARE_AT_LEAST
    reqs = [GenerationRequest(header + tok(f" What is {q} plus {q}?")["input_ids"],
                              SamplingParams(temperature=1.0, max_tokens=12, n=3)) for q in (3, 4, 5)]
    shared = TorchEngine(model, tok, prefix_cache_mb=0)
    if not shared.runner.reads_shared_keys:
        pytest.skip("the compiled decode kernel is unavailable here")
    own = TorchEngine(model, tok, prefix_cache_mb=0)
    own.SHARE_AT_LEAST = 10**9
    for a, b in zip(shared.generate(reqs, seed=0), own.generate(reqs, seed=0)):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids and x.logprobs == y.logprobs
    assert own.stats.shared_keys == 0
    assert shared.stats.attended_keys == own.stats.attended_keys
    # 8 of the 9 rows read the header (72 of their ~85 keys) or more from another slot at every step
    assert shared.stats.shared_keys / shared.stats.attended_keys > 8 / 9 * 0.8


def test_rows_keep_sharing_after_the_row_they_read_from_finishes(tiny):
    """The first sample of a prompt finishes after 2 tokens while 3 others of the same prompt run on:
    one of them takes its place, so the other two still read the prompt from one slot (and nothing
    reads the finished row's slot, which the samples being unchanged shows)."""
    model, tok = tiny
    prompt = tok(" ".join(["Count the apples in the basket and answer with a number."] * 7))["input_ids"]
    assert len(prompt) >= TorchEngine.SHARE_AT_LEAST
    reqs = [GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=2)),
            GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=10, n=3))]
    shared = TorchEngine(model, tok, prefix_cache_mb=0)
    if not shared.runner.reads_shared_keys:
        pytest.skip("the compiled decode kernel is unavailable here")
    own = TorchEngine(model, tok, prefix_cache_mb=0)
    own.SHARE_AT_LEAST = 10**9
    got, want = shared.generate(reqs), own.generate(reqs)
    assert [c.token_ids for g in got for c in g] == [c.token_ids for g in want for c in g]
    assert [len(c.token_ids) for g in got for c in g] == [2, 10, 10, 10]
    # decode steps feed tokens 1..9 of the long rows: while the short row runs (step 1) its 3
    # followers read the prompt from it; after it finished (steps 2-9) 2 of them read it from the heir
    assert shared.stats.shared_keys == len(prompt) * (3 * 1 + 2 * 8)
