"""The fast runner computes the Hugging Face forward for each architecture it claims: Llama, Qwen2
(q/k/v biases) and Qwen3 (per-head q/k RMSNorm, head_dim not hidden/heads), on small random configs,
through a prefill of ragged prompts and decode steps, with and without the compiled CPU kernels; and
the engine built on it samples what the Hugging Face reference engine samples."""
import pytest
import torch

from forkrl.models.loader import random_model
from forkrl.rollout import (
    GenerationRequest,
    HFEngine,
    SamplingParams,
    TorchEngine,
    build_local_engine,
)
from forkrl.rollout.engine.runner import DecoderRunner

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)


def tiny_model(arch: str, **shape):
    model = random_model(arch, **{**COMMON, **shape}, **({"head_dim": 32} if arch == "qwen3" else {}))
    g = torch.Generator().manual_seed(0)
    if arch == "qwen3":
        with torch.no_grad():  # random norm weights, so a mistake in them cannot hide behind ones
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5, generator=g)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5, generator=g)
    with torch.no_grad():   # biases are zeros at init: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


class Tok:
    eos_token_id = 127
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


ARCHS = ["llama", "qwen2", "qwen3"]


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_runner_matches_the_hugging_face_forward(arch, compiled):
    model = tiny_model(arch)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if arch == "qwen3":
        assert model.model.layers[0].self_attn.q_norm is not None and model.config.head_dim == 32
    _runner_follows_the_forward(model, compiled)


@pytest.mark.parametrize("kv_heads", [7, 1])
def test_compiled_decode_takes_any_number_of_query_heads_per_kv_head(kv_heads):
    """7 query heads over 7 kv heads (one each) or over 1 (the kernel takes them in chunks of 4
    and 3), head_dim 16."""
    model = tiny_model("llama", hidden_size=112, num_attention_heads=7, num_key_value_heads=kv_heads)
    _runner_follows_the_forward(model, compiled=True)


def _runner_follows_the_forward(model, compiled: bool):
    """Prefill of ragged prompts, then 4 greedy decode steps: the runner's logits are the Hugging Face
    forward's of the same tokens."""
    runner = DecoderRunner(model, torch.float32, compiled=compiled)
    if compiled and runner.kernel is None:
        pytest.skip("compiled kernels unavailable here")
    prompts = [[5, 9, 17, 3, 22, 8, 1], [40, 2, 7], [11, 12, 13, 14, 15]]
    runner.reserve(len(prompts), 32)
    U, S = len(prompts), max(map(len, prompts))
    ids = torch.zeros((U, S), dtype=torch.long)
    for u, p in enumerate(prompts):
        ids[u, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    logits = runner.forward(torch.arange(U), ids, torch.zeros(U, dtype=torch.long), lengths)
    seqs = [list(p) for p in prompts]
    for step in range(4):
        with torch.no_grad():
            want = torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])
        assert (logits - want).abs().max() < 1e-4, step
        nxt = logits.argmax(-1)
        starts = torch.tensor([len(s) for s in seqs])
        for s, t in zip(seqs, nxt.tolist()):
            s.append(t)
        logits = runner.forward(torch.arange(U), nxt.view(U, 1), starts, torch.ones(U, dtype=torch.long))


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_samples_what_the_reference_engine_samples(arch):
    model = tiny_model(arch)
    tok = Tok()
    fast = build_local_engine(model, tok, max_batch_size=2, prefix_cache_mb=0)
    assert isinstance(fast, TorchEngine)
    # greedy: the two engines draw their uniforms in different row orders, so seeded samples differ
    reqs = [GenerationRequest([5, 9, 17, 3], SamplingParams(temperature=0.0, max_tokens=6, n=2)),
            GenerationRequest([40, 2], SamplingParams(temperature=0.0, max_tokens=5))]
    for a, b in zip(fast.generate(reqs), HFEngine(model, tok, prefix_cache_mb=0).generate(reqs)):
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)
            assert x.entropies == pytest.approx(y.entropies, abs=1e-4)


def test_an_unsupported_architecture_falls_back_to_the_reference_engine():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    engine = build_local_engine(model, Tok(), prefix_cache_mb=0)
    assert isinstance(engine, HFEngine)
    with pytest.raises(ValueError, match="model_type 'gpt2'.*rollout.engine=hf"):
        TorchEngine(model, Tok())


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_attention_and_the_captured_decode_step_compute_the_same_logits(arch):
    """What runs on CUDA, checked here on the CPU: attention through scaled_dot_product_attention over
    a cache in the weights' dtype, and the fixed-shape decode step a CUDA graph captures (the batch
    padded to a bucket with rows at the never-used last position, keys read up to a block boundary)."""
    model = tiny_model(arch)
    eager = DecoderRunner(model, torch.float32, compiled=False)
    sdpa = DecoderRunner(model, torch.float32, compiled=False)
    sdpa.sdpa = True
    prompts = [[5, 9, 17, 3, 22, 8, 1], [40, 2, 7], [11, 12, 13, 14, 15]]
    U, S = len(prompts), max(map(len, prompts))
    ids = torch.zeros((U, S), dtype=torch.long)
    for u, p in enumerate(prompts):
        ids[u, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    outs = []
    for runner in (eager, sdpa):
        runner.reserve(4, 40)   # a bucket of 4 rows: one padding row in slot 3
        outs.append(runner.forward(torch.arange(U), ids, torch.zeros(U, dtype=torch.long), lengths))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    nxt, starts = outs[0].argmax(-1), lengths.clone()
    want = eager.decode(nxt, starts)
    b, T, capacity = 4, 16, sdpa.k.shape[3]
    padded_ids = torch.cat([nxt, torch.zeros(b - U, dtype=torch.long)]).view(b, 1)
    padded_pos = torch.cat([starts, torch.full((b - U,), capacity - 1)])
    got = sdpa._forward(torch.arange(b), padded_ids, padded_pos, torch.ones(b, dtype=torch.long), True, T)[:U]
    assert (got - want).abs().max() < 1e-5
    assert DecoderRunner._buckets(6) == [1, 2, 4, 6]
