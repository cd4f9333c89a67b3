"""The `Engine` contract every engine keeps (TorchEngine here; VLLMEngine where a GPU and vLLM are
present, skipped otherwise): what `generate` returns, seeds, stop strings, aborts, weight updates,
and per-token values against a float32 forward pass of the policy (exact for TorchEngine; within
bf16 tolerance for vLLM, whose entropies are top-k sums and so never above the exact value)."""
import copy
import importlib.util

import pytest
import torch

from forkrl.rollout import GenerationRequest, SamplingParams, TorchEngine

PROMPTS = ["Hello there, how are you?", "2 + 2 =", "Write one word."]
HAS_VLLM = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


@pytest.fixture(params=["torch", "vllm"])
def engine(request, tiny):
    model, tok = tiny
    model = copy.deepcopy(model)
    if request.param == "torch":
        return TorchEngine(model, tok, max_batch_size=4)
    if not HAS_VLLM:
        pytest.skip("VLLMEngine needs a CUDA GPU and vllm (pip install 'forkrl[gpu]')")
    from forkrl.rollout.vllm_engine import VLLMEngine
    return VLLMEngine(model.cuda(), tok, gpu_memory_utilization=0.3, dtype="float32", enforce_eager=True)


def _requests(tok, params):
    return [GenerationRequest(tok(p)["input_ids"], params) for p in PROMPTS]


def _reference(engine, prompt_ids, tokens, temperature):
    """float32 log-probs of `tokens` and entropies, from one forward of the engine's policy."""
    model = engine.model
    seq = torch.tensor([prompt_ids + tokens], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(seq).logits[0, len(prompt_ids) - 1:-1].float().cpu() / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_generate_returns_n_aligned_completions_per_request(engine, tiny):
    _, tok = tiny
    params = SamplingParams(temperature=1.0, max_tokens=10, n=3)
    before = engine.stats.decode_tokens
    outs = engine.generate(_requests(tok, params), seed=0)
    assert [len(o) for o in outs] == [3, 3, 3]
    total = 0
    for o in outs:
        for c in o:
            assert 0 < len(c.token_ids) <= 10
            assert len(c.logprobs) == len(c.entropies) == len(c.token_ids)
            assert c.finish in ("eos", "stop", "length")
            assert c.finish != "length" or len(c.token_ids) == 10
            assert c.finish != "eos" or c.token_ids[-1] in engine.eos_ids
            assert all(lp <= 1e-6 for lp in c.logprobs) and all(e >= -1e-6 for e in c.entropies)
            total += len(c.token_ids)
    assert engine.stats.decode_tokens - before == total


def test_same_seed_same_samples(engine, tiny):
    _, tok = tiny
    params = SamplingParams(temperature=1.0, max_tokens=8, n=2)
    ids = lambda out: [c.token_ids for o in out for c in o]
    a, b = (ids(engine.generate(_requests(tok, params), seed=5)) for _ in range(2))
    assert a == b


def test_logprobs_and_entropies_follow_the_policy(engine, tiny):
    _, tok = tiny
    exact = engine.stats.entropy_topk == 0
    tol = 2e-4 if isinstance(engine, TorchEngine) else 5e-2
    reqs = _requests(tok, SamplingParams(temperature=0.7, max_tokens=8, n=2))
    for r, o in zip(reqs, engine.generate(reqs, seed=1)):
        for c in o:
            lp, ent = _reference(engine, r.prompt_ids, c.token_ids, 0.7)
            assert c.logprobs == pytest.approx(lp.tolist(), abs=tol)
            if exact:
                assert c.entropies == pytest.approx(ent.tolist(), abs=tol)
            else:  # top-k sums leave out the tail: a lower bound
                assert all(e <= x + tol for e, x in zip(c.entropies, ent.tolist()))


def test_a_stop_string_ends_the_completion_and_stays_in_its_text(engine, tiny):
    _, tok = tiny
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    free = engine.generate(_requests(tok, greedy)[:1])[0][0]
    stop = tok.decode(free.token_ids[3:5])
    assert stop.strip(), "pick a prompt whose greedy tokens 3-4 decode to visible text"
    stopped = engine.generate([GenerationRequest(_requests(tok, greedy)[0].prompt_ids,
                                                 SamplingParams(temperature=0.0, max_tokens=12, stop=[stop]))])[0][0]
    assert stopped.finish == "stop"
    assert stop in stopped.text and len(stopped.token_ids) < len(free.token_ids) + (free.finish != "length")


def test_stop_when_aborts_the_unfinished(engine, tiny):
    _, tok = tiny
    reqs = [GenerationRequest(tok(p)["input_ids"], SamplingParams(temperature=1.0, max_tokens=m))
            for p, m in zip(PROMPTS, (2, 40, 40))]
    outs = engine.generate(reqs, seed=0, stop_when=lambda finished: finished[0] >= 1)
    assert outs[0][0].finish != "abort"
    assert any(o[0].finish == "abort" for o in outs[1:])
    assert all(len(o[0].logprobs) == len(o[0].token_ids) for o in outs)


def test_weights_updated_takes_the_new_weights(engine, tiny):
    _, tok = tiny
    greedy = _requests(tok, SamplingParams(temperature=0.0, max_tokens=6))
    before = [o[0].token_ids for o in engine.generate(greedy)]
    with torch.no_grad():
        head = engine.model.get_output_embeddings().weight
        head.copy_(torch.roll(head, shifts=1, dims=0))  # every token's logit moves to the next id
    engine.weights_updated()
    after = engine.generate(greedy)
    assert [o[0].token_ids for o in after] != before
    for r, o in zip(greedy, after):  # each greedy token is the updated policy's argmax (up to ties)
        model = engine.model
        seq = torch.tensor([r.prompt_ids + o[0].token_ids], device=next(model.parameters()).device)
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits[0, len(r.prompt_ids) - 1:-1].float().cpu(), -1)
        chosen = logp.gather(-1, torch.tensor(o[0].token_ids)[:, None]).squeeze(-1)
        assert (chosen >= logp.max(-1).values - 1e-3).all()
