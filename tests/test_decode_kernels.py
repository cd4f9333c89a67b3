"""The compiled decode kernels (forkrl/rollout/engine/decode_kernels.cpp) compute what the PyTorch ops they
replace compute: the same decode logits, the same sampled tokens for the same generator state, the
same log-probs and entropies; and a machine that cannot build them falls back to those ops."""
import logging
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from forkrl.rollout.engine import kernels, sample_next
from forkrl.rollout.engine import sampling as engine_mod
from forkrl.rollout.engine.runner import DecoderRunner

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None or sys.platform != "linux",
                                    reason="the kernels are built and measured on Linux with a C++ compiler")


@pytest.fixture
def kernel():
    module = kernels.decode_kernel()
    if module is None:
        pytest.skip("compiled kernels unavailable here")
    return module


@needs_compiler
def test_kernels_build_where_a_compiler_exists():
    """On a machine with a compiler (CI's included) the fast path is really the compiled one."""
    assert kernels.decode_kernel() is not None


def _prefill_then_decode(runner, prompts, steps=6, feed=None):
    """Prefill prompts into slots 0..n-1, then decode `steps` tokens per row (contiguous slots: the
    compiled attention's case), feeding each row's argmax or, given `feed` [steps, rows], those
    tokens; returns the next-token logits after the prompt and after every decode step,
    [1 + steps, rows, vocab]."""
    n = len(prompts)
    runner.reserve(n, max(map(len, prompts)) + steps + 1)
    ids = torch.zeros((n, max(map(len, prompts))), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    logits = runner.forward(torch.arange(n), ids, torch.zeros(n, dtype=torch.long), lengths)
    out = [logits]
    for step in range(steps):
        nxt = logits.argmax(-1) if feed is None else feed[step]
        logits = runner.forward(torch.arange(n), nxt[:, None], lengths, torch.ones(n, dtype=torch.long))
        lengths = lengths + 1
        out.append(logits)
    return torch.stack(out)


def test_compiled_decode_step_matches_the_pytorch_ops_in_float32(tiny, kernel):
    model, tok = tiny
    prompts = [tok(p)["input_ids"] for p in ("Hello there, how are you?", "2 + 2 =", "Write one word, slowly.")]
    compiled = DecoderRunner(model, torch.float32)
    assert compiled.kernel is not None and compiled.cache_dtype == torch.float32
    reference = DecoderRunner(model, torch.float32, compiled=False)
    got, want = _prefill_then_decode(compiled, prompts), _prefill_then_decode(reference, prompts)
    # float32 rounding relative to the logits' scale (up to 39 here): summation orders differ, and
    # with them the compiler's vectorisation (measured: 8.9e-5 and 1.2e-4 in two builds)
    assert (got - want).abs().max() < 5e-6 * want.abs().max()
    # and against the Hugging Face forward of the same tokens: the first decode step fed the argmax
    # of the prompt's next-token logits
    with torch.no_grad():
        first = int(model(torch.tensor([prompts[1]])).logits[0, -1].argmax())
        full = model(torch.tensor([prompts[1] + [first]])).logits[0, -1]
    assert (full - got[1, 1]).abs().max() < 1e-4


@pytest.mark.slow
def test_bf16_cache_adds_little_to_the_bf16_weights_error(kernel):
    """Embedded model, bf16 weights: the compiled path (bf16 cache) and the PyTorch ops (float32
    cache) rescore the same 6 sampled completions token by token; against a float32 forward, the
    bf16 cache's log-prob and entropy errors stay those of bf16 weights (measured: 0.0302 vs 0.0285
    nats, mean)."""
    from forkrl.models import load_policy
    from forkrl.rollout import GenerationRequest, SamplingParams, TorchEngine
    model, tok = load_policy("smollm2-135m")
    questions = ["What is 3 + 4?", "Name a colour.", "Write a haiku about the sea.", "What is 12 times 3?",
                 "Explain why the sky is blue.", "List three fruits."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for q in questions]
    outs = TorchEngine(model, tok, dtype="bfloat16").generate(
        [GenerationRequest(p, SamplingParams(temperature=1.0, max_tokens=48)) for p in prompts], seed=0)
    errors = {}
    for compiled in (True, False):
        runner = DecoderRunner(model, torch.bfloat16, compiled=compiled)
        assert runner.cache_dtype == (torch.bfloat16 if compiled else torch.float32)
        lp_err, ent_err = [], []
        for p, (c,) in zip(prompts, outs):
            feed = torch.tensor(c.token_ids)[:-1, None]
            got = torch.log_softmax(_prefill_then_decode(runner, [p], len(feed), feed)[:, 0], -1)
            with torch.no_grad():
                full = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1].float()
            want = torch.log_softmax(full, -1)
            ids = torch.tensor(c.token_ids)[:, None]
            lp_err.append((got.gather(-1, ids) - want.gather(-1, ids)).abs().squeeze(-1))
            ent_err.append(((got.exp() * got).sum(-1) - (want.exp() * want).sum(-1)).abs())
        errors[compiled] = torch.cat(lp_err).mean(), torch.cat(ent_err).mean()
    for i in (0, 1):
        assert errors[True][i] < 0.05 and errors[True][i] < 1.25 * errors[False][i] + 0.005, errors


def test_decode_attention_refuses_a_position_outside_the_cache(kernel):
    cache = torch.zeros(2, 1, 8, 16)
    qkv, cs = torch.zeros(2, 4 * 16), torch.zeros(2, 16)
    with pytest.raises(RuntimeError, match="position 8 outside the cache"):
        kernel.decode_attention(qkv, None, cs, cs, torch.tensor([3, 8]), cache, cache.clone(), 2)


def test_add_rms_norm_and_silu_mul_match_pytorch(kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 48, generator=g)
    delta = torch.randn(5, 3, 48, generator=g)
    w = torch.randn(48, generator=g)
    want = F.rms_norm(x + delta, (48,), w, 1e-5)
    x_in = x.clone()
    got = kernel.add_rms_norm(x_in, delta, w, 1e-5, torch.float32)
    assert torch.allclose(x_in, x + delta) and torch.allclose(got, want, atol=1e-5)
    got_bf16 = kernel.add_rms_norm(x.clone(), None, w, 1e-5, torch.bfloat16)
    assert got_bf16.dtype == torch.bfloat16
    assert torch.allclose(got_bf16.float(), F.rms_norm(x, (48,), w, 1e-5), rtol=1e-2, atol=1e-2)
    gate_up = torch.randn(7, 2 * 40, generator=g) * 4
    assert torch.allclose(kernel.silu_mul(gate_up), F.silu(gate_up[:, :40]) * gate_up[:, 40:], atol=1e-5)


def test_compiled_sampler_draws_what_the_pytorch_sampler_draws(kernel, monkeypatch):
    """Same generator state: the same token in every row (the same uniform per row, the same
    inverse-CDF rule), over 300 rows of a 49k-token vocabulary (not a multiple of the 256-entry
    block) at several temperatures; log-probs and entropies within 1e-5 of float64 (the PyTorch
    sampler's float32 entropy is off by up to ~1e-4 here)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 49_153, generator=g) * 3
    logits[:, :7] = 15.0 + torch.randn(300, 7, generator=g)  # peaked rows, as a language model's are
    temperature = torch.tensor([0.5, 0.7, 1.0, 1.3]).repeat(75)
    top_p = torch.ones(300)
    got = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(7))
    monkeypatch.setattr(engine_mod, "decode_kernel", lambda: None)
    want = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(7))
    assert torch.equal(got[0], want[0])
    exact = torch.log_softmax(logits.double() / temperature.double()[:, None], -1)
    assert (got[1] - exact.gather(-1, got[0][:, None]).squeeze(-1)).abs().max() < 1e-5
    assert (got[2] - (-(exact.exp() * exact).sum(-1))).abs().max() < 1e-5
    assert (want[2] - got[2]).abs().max() < 5e-4


def test_compiled_sampler_takes_greedy_rows_beside_sampled_ones(kernel, monkeypatch):
    """Rows at temperature 0 (a tree's greedy chains) in the same batch as sampled rows: the argmax,
    with its log-prob and the entropy at T = 1 (within 1e-5 of float64), and the sampled rows draw
    what the PyTorch sampler draws from the same generator."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(120, 49_153, generator=g) * 3
    logits[:, :7] = 15.0 + torch.randn(120, 7, generator=g)
    temperature = torch.tensor([0.0, 0.7, 1.0, 0.0, 1.3, 0.0]).repeat(20)
    top_p = torch.ones(120)
    got = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(3))
    monkeypatch.setattr(engine_mod, "decode_kernel", lambda: None)
    want = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(3))
    greedy = temperature == 0
    assert torch.equal(got[0][greedy], logits[greedy].argmax(-1))
    assert torch.equal(got[0], want[0])
    t = torch.where(greedy, torch.ones_like(temperature), temperature).double()
    exact = torch.log_softmax(logits.double() / t[:, None], -1)
    assert (got[1] - exact.gather(-1, got[0][:, None]).squeeze(-1)).abs().max() < 1e-5
    assert (got[2] - (-(exact.exp() * exact).sum(-1))).abs().max() < 1e-5


def test_compiled_sampler_never_draws_a_masked_token(kernel):
    logits = torch.randn(64, 1000)
    logits[:, 300:] = float("-inf")
    tokens, logp, entropy = sample_next(logits, torch.ones(64), torch.ones(64), torch.Generator().manual_seed(0))
    assert (tokens < 300).all() and torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    ref = torch.log_softmax(logits[:, :300], -1)
    assert torch.allclose(entropy, -(ref.exp() * ref).sum(-1), atol=1e-4)


def test_a_machine_that_cannot_build_them_falls_back_to_pytorch(tiny, monkeypatch, caplog):
    import torch.utils.cpp_extension as ext

    def fail(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(ext, "load", fail)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_module", None)
    with caplog.at_level(logging.WARNING):
        assert kernels.decode_kernel() is None
    assert "could not be built" in caplog.text and "Ninja is required" in caplog.text
    model, tok = tiny
    runner = DecoderRunner(model, torch.float32)
    assert runner.kernel is None and runner.cache_dtype == torch.float32
    assert _prefill_then_decode(runner, [tok("2 + 2 =")["input_ids"]], steps=2).isfinite().all()


@needs_compiler
@pytest.mark.slow
def test_the_portable_build_computes_what_this_build_computes(kernel, tmp_path):
    """The kernels' inner loops have an AVX-512 version (built here, -march=native) and a portable
    one for other CPUs; build the portable one for AVX2 (x86-64-v3) and compare on random inputs."""
    import platform

    from torch.utils.cpp_extension import load
    if platform.machine() != "x86_64" or "avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("needs an x86-64 CPU with AVX2")
    portable = load("forkrl_decode_kernels_avx2", [str(kernels._SOURCE)], build_directory=str(tmp_path),
                    extra_cflags=["-O3", "-march=x86-64-v3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    g = torch.Generator().manual_seed(0)
    rows, heads, kv, d, cap = 5, 6, 2, 32, 40
    qkv = torch.randn(rows, (heads + 2 * kv) * d, generator=g)
    cos, sin = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
    pos = torch.tensor([0, 7, 39, 12, 3])
    for cache_dtype in (torch.float32, torch.bfloat16):
        K, V = (torch.randn(rows, kv, cap, d, generator=g).to(cache_dtype) for _ in range(2))
        caches = [(K.clone(), V.clone()) for _ in range(2)]
        outs = [m.decode_attention(qkv, None, cos, sin, pos, *c, heads) for m, c in zip((kernel, portable), caches)]
        assert torch.allclose(outs[0], outs[1], atol=1e-5)
        tol = 1e-5 if cache_dtype == torch.float32 else 1e-2  # the written row may round one bf16 step apart
        for i in (0, 1):
            assert torch.allclose(caches[0][i].float(), caches[1][i].float(), rtol=tol, atol=1e-5)
    logits = torch.randn(16, 3000, generator=g) * 4
    temperature, u = torch.full((16,), 0.8), torch.rand(16, generator=g, dtype=torch.float64)
    a, b = kernel.sample(logits, temperature, u), portable.sample(logits, temperature, u)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5) and torch.allclose(a[2], b[2], atol=1e-5)
    x, delta, w = torch.randn(4, 48, generator=g), torch.randn(4, 48, generator=g), torch.randn(48, generator=g)
    assert torch.allclose(kernel.add_rms_norm(x.clone(), delta, w, 1e-5, torch.float32),
                          portable.add_rms_norm(x.clone(), delta, w, 1e-5, torch.float32), atol=1e-5)
    gate_up = torch.randn(3, 64, generator=g)
    assert torch.allclose(kernel.silu_mul(gate_up), portable.silu_mul(gate_up), atol=1e-6)


def test_the_build_cache_is_keyed_by_the_whole_compile_command(monkeypatch, tmp_path):
    """Two environments on one machine keep two builds instead of rebuilding each other's."""
    import sys

    from forkrl.rollout.engine import kernels
    monkeypatch.setenv("FORKRL_CACHE", str(tmp_path))
    here = kernels._build_dir()
    assert kernels._build_dir() == here  # stable
    monkeypatch.setattr(sys, "prefix", "/other/venv")
    assert kernels._build_dir() != here
    monkeypatch.undo()
    monkeypatch.setenv("FORKRL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_CFLAGS", kernels._CFLAGS + ["-g"])
    assert kernels._build_dir() != here


def test_a_row_reads_its_shared_prefix_from_the_slot_named(tiny, kernel):
    """SharedKeys: row 1 reads its first keys from slot 0, which holds the same prompt's states, and
    gets the logits it gets from its own slot; spoil slot 0's copy and row 1's logits follow it (the
    keys really come from there), while row 0 (reading its own slot) and an unshared step do not."""
    from forkrl.rollout.engine.runner import SharedKeys
    model, tok = tiny
    prompt = tok("A prompt that two rows share, then each goes on alone.")["input_ids"]
    runner = DecoderRunner(model, torch.float32)
    P = len(prompt)
    runner.reserve(3, P + 4)
    ids = torch.tensor([prompt, prompt])
    runner.forward(torch.arange(2), ids, torch.zeros(2, dtype=torch.long), torch.tensor([P, P]))
    saved = runner.k.clone(), runner.v.clone()
    feed, starts = torch.tensor([5, 9]), torch.tensor([P, P])
    shared = SharedKeys(torch.tensor([[-1], [0]]), torch.tensor([[0], [P]]), torch.tensor([1, 0]))

    def step(keys):
        runner.k.copy_(saved[0])
        runner.v.copy_(saved[1])
        return runner.decode(feed, starts, keys)
    alone, together = step(None), step(shared)
    assert torch.equal(alone, together)
    saved[0][:, 0, :, :P] *= 0.5   # slot 0's prompt states, not slot 1's
    spoiled_alone, spoiled_shared = step(None), step(shared)
    assert not torch.allclose(spoiled_shared[1], alone[1], atol=1e-3)
    assert torch.equal(spoiled_alone[1], alone[1])
    assert torch.equal(spoiled_shared[0], spoiled_alone[0])
    with pytest.raises(RuntimeError, match="shared segments"):
        step(SharedKeys(torch.tensor([[-1], [0]]), torch.tensor([[0], [P + 1]]), torch.tensor([0, 1])))
