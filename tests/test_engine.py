import copy
import math

import pytest
import torch

from forkrl.rollout import GenerationRequest, SamplingParams, TorchEngine, Trajectory
from forkrl.train.learner import pack, response_logprobs

PROMPTS = ["Hello there, how are you?", "2 + 2 =", "Write one word."]


def _requests(tok, params):
    return [GenerationRequest(tok(p)["input_ids"], params) for p in PROMPTS]


def test_same_seed_same_samples(tiny):
    model, tok = tiny
    engine = TorchEngine(model, tok, max_batch_size=4)
    params = SamplingParams(temperature=1.0, max_tokens=12, n=3)
    a = engine.generate(_requests(tok, params), seed=7)
    b = engine.generate(_requests(tok, params), seed=7)
    c = engine.generate(_requests(tok, params), seed=8)
    ids = lambda out: [comp.token_ids for per_req in out for comp in per_req]
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert [len(x) for x in a] == [3, 3, 3]


def test_logprobs_and_entropies_match_a_full_forward_pass(tiny):
    """The engine's per-token values (left-padded, KV-cached, rows dropped as they finish) equal
    the learner's (right-padded, one forward, chunked projection) and a plain full softmax."""
    model, tok = tiny
    engine = TorchEngine(model, tok, max_batch_size=8)
    params = SamplingParams(temperature=0.7, max_tokens=10, n=2)
    reqs = _requests(tok, params)
    outs = engine.generate(reqs, seed=1)
    trajs = [Trajectory.from_completion(r.prompt_ids, c, group=str(i)) for i, (r, o) in enumerate(zip(reqs, outs)) for c in o]
    batch = pack(trajs, tok.pad_token_id)
    with torch.no_grad():
        lp, ent = response_logprobs(model, batch, temperature=0.7, chunk=5)
        for b, t in enumerate(trajs):
            n = len(t.tokens)
            assert lp[b, :n].tolist() == pytest.approx(t.logprobs, abs=2e-4)
            assert ent[b, :n].tolist() == pytest.approx(t.entropies, abs=2e-4)
            # and a naive full forward of this one sequence
            seq = torch.tensor([t.prompt_ids + t.tokens])
            logits = model(seq).logits[0, len(t.prompt_ids) - 1:-1] / 0.7
            full = torch.log_softmax(logits, -1)
            assert full.gather(-1, torch.tensor(t.tokens)[:, None]).squeeze(-1).tolist() == pytest.approx(t.logprobs, abs=2e-4)


def test_chunked_logprobs_gradient_equals_unchunked(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    engine = TorchEngine(m, tok)
    reqs = _requests(tok, SamplingParams(max_tokens=6, n=2))
    outs = engine.generate(reqs, seed=3)
    trajs = [Trajectory.from_completion(r.prompt_ids, c, group="g") for r, o in zip(reqs, outs) for c in o]
    batch = pack(trajs, tok.pad_token_id)
    grads = []
    for chunk in (3, 10_000):
        m.zero_grad()
        lp, ent = response_logprobs(m, batch, chunk=chunk)
        (lp.sum() + 0.1 * ent.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    rel = (grads[0] - grads[1]).norm() / grads[1].norm()
    assert rel < 1e-5, rel


def test_greedy_finish_reasons_and_token_counts(tiny):
    model, tok = tiny
    engine = TorchEngine(model, tok)
    prompt = tok("2 + 2 =")["input_ids"]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    engine.stats.prefill_tokens = engine.stats.decode_tokens = 0
    base = engine.generate([GenerationRequest(prompt, greedy)])[0][0]
    assert base.finish == "length" and len(base.token_ids) == 8
    assert engine.stats.prefill_tokens == len(prompt) and engine.stats.decode_tokens == 8
    # greedy = argmax: top_p that keeps only the top token gives the same tokens
    tiny_p = engine.generate([GenerationRequest(prompt, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8))], seed=5)
    assert tiny_p[0][0].token_ids == base.token_ids
    # a stop string made of the text of tokens 3-4 stops right after token 4
    stop = tok.decode(base.token_ids[2:4])
    assert stop.strip() and stop not in tok.decode(base.token_ids[:3])
    stopped = engine.generate([GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=8, stop=[stop]))])[0][0]
    assert stopped.finish == "stop" and stopped.token_ids == base.token_ids[:4]
    # an end-of-sequence token ends the sequence and is not part of the text
    engine.eos_ids = [base.token_ids[2]]
    ended = engine.generate([GenerationRequest(prompt, greedy)])[0][0]
    assert ended.finish == "eos" and ended.token_ids == base.token_ids[:3]
    assert ended.text == tok.decode(base.token_ids[:2])


def test_rows_finishing_early_do_not_change_other_rows(tiny):
    """Dropping finished rows from the KV cache leaves the remaining rows' samples unchanged."""
    model, tok = tiny
    engine = TorchEngine(model, tok)
    p = tok("Tell me a story")["input_ids"]
    long_only = engine.generate([GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=12))])[0][0]
    mixed = engine.generate([GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=2)),
                             GenerationRequest(p[:3], SamplingParams(temperature=0.0, max_tokens=5)),
                             GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=12))])
    assert [len(o[0].token_ids) for o in mixed] == [2, 5, 12]
    assert mixed[2][0].token_ids == long_only.token_ids
    assert mixed[2][0].logprobs == pytest.approx(long_only.logprobs, abs=1e-4)


def test_shared_prompt_forward_gives_the_per_sequence_gradient(tiny):
    """Responses of one prompt share its forward pass; the gradient equals the sum of running
    every response with its own copy of the prompt."""
    model, tok = tiny
    m = copy.deepcopy(model)
    engine = TorchEngine(m, tok)
    reqs = _requests(tok, SamplingParams(max_tokens=6, n=3))
    outs = engine.generate(reqs, seed=4)
    trajs = [Trajectory.from_completion(r.prompt_ids, c, group=str(i)) for i, (r, o) in enumerate(zip(reqs, outs)) for c in o]
    batch = pack(trajs, tok.pad_token_id)
    assert batch.prompt_ids.shape[0] == 3 and len(batch) == 9

    def grad_of(batches):
        m.zero_grad()
        for b in batches:
            lp, ent = response_logprobs(m, b)
            (lp.sum() + 0.1 * ent.sum()).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    shared = grad_of([batch])
    separate = grad_of([batch.select(torch.tensor([i])) for i in range(len(batch))])
    rel = (shared - separate).norm() / separate.norm()
    assert rel < 1e-4, rel


def test_sampler_draws_from_the_tempered_distribution_and_respects_top_p():
    from forkrl.rollout import sample_next
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(40_000, 1)
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones(40_000)
    tokens, logp, ent = sample_next(logits, ones, ones, gen)
    freq = torch.bincount(tokens, minlength=4).double() / 40_000
    assert freq.tolist() == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.01)
    assert logp[0] == pytest.approx(torch.log(torch.tensor(0.5)).item(), abs=1e-5)
    assert ent[0] == pytest.approx(-(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.15 * math.log(0.15)
                                     + 0.05 * math.log(0.05)), abs=1e-5)
    # top-p 0.8 keeps {0.5, 0.3}: the mass before 0.15 already reaches 0.8
    tokens, logp, _ = sample_next(logits, ones, ones * 0.8, gen)
    freq = torch.bincount(tokens, minlength=4).double() / 40_000
    assert freq.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=0.01)
    # temperature 2 flattens: p ~ sqrt(p)
    tokens, _, _ = sample_next(logits, ones * 2, ones, gen)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    freq = torch.bincount(tokens, minlength=4).double() / 40_000
    assert freq.tolist() == pytest.approx((p / p.sum()).tolist(), abs=0.01)
