"""A mini-batch's header (the prompt tokens all its rows start with: a system prompt, few-shot
examples) runs once for all its micro-batches: its keys and values are read by each micro-batch and
their gradients go back through it once. Log-probs and every gradient equal those of running the
header inside each micro-batch (float32, within 1e-6), with and without gradient checkpointing."""
import copy

import pytest
import torch

import forkrl.train.learner as learner_module
from forkrl.config import build_config
from forkrl.models import load_policy
from forkrl.train.batch import common_header, micro_batches, pack
from forkrl.train.forward import PolicyForward, pack_flat
from forkrl.train.learner import Learner
from forkrl.types import RolloutBatch, Trajectory

VOCAB = 300


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).float()


def _trajectories(header: list[int], g: torch.Generator, vocab: int = VOCAB, groups: int = 3) -> list[Trajectory]:
    """`groups` prompts (the header + a few tokens of their own) x 2 samples; one sample is a branch of
    the other, so a tree prefix crosses the header too."""
    def toks(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()
    out = []
    for p in range(groups):
        prompt = header + toks(4 + p)
        a = toks(6 + p)
        b = a[:3] + toks(5)
        for tokens, parent, at in ((a, None, None), (b, 0, 3)):
            n = len(tokens)
            out.append(Trajectory(prompt_ids=prompt, tokens=tokens, logprobs=[-1.0] * n, entropies=[1.0] * n,
                                  loss_mask=[1] * n, group=f"g{p}", parent=parent, branch_at=at,
                                  reward=float(torch.rand(1, generator=g) > 0.5)))
    return out


def _update(model, batch, micros, adv, header_ids, *, send_back: bool = True):
    model.zero_grad()
    forward = PolicyForward(model, attention="spans")
    header = forward.run_header(header_ids) if header_ids else None
    logps = []
    for m in micros:
        sub = batch.select(m)
        logp, entropy = forward(sub, header=header)
        mask = sub.loss_mask
        tokens = batch.loss_mask.sum()   # token-mean over the whole batch, as the learner normalises
        ((-(logp * adv[m, :logp.shape[1]] * mask).sum() + 0.01 * (entropy * mask).sum()) / tokens).backward()
        logps.append(logp.detach())
    if header is not None and send_back:
        header.backward()
    return logps, {n: p.grad.clone() for n, p in model.named_parameters()}, forward.tokens_run


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_header_run_once_gives_the_micro_batches_the_same_logprobs_and_gradients(checkpointing):
    model = _model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    g = torch.Generator().manual_seed(0)
    header = torch.randint(10, VOCAB, (40,), generator=g).tolist()
    batch = pack(_trajectories(header, g), 0)
    ids = common_header(batch, torch.arange(len(batch)))
    assert ids == header
    micros = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])]
    adv = torch.randn(batch.loss_mask.shape, generator=g)
    once, each = _update(model, batch, micros, adv, ids), _update(model, batch, micros, adv, [])
    assert each[2] - once[2] == len(header) * (len(micros) - 1)   # the header ran once, not per micro-batch
    for got, want in zip(once[0], each[0]):
        assert (got - want).abs().max() < 1e-6
    for name, grad in once[1].items():
        assert (grad - each[1][name]).abs().max() < 1e-6, name
    # the header's share of the gradient arrives only through Header.backward
    kept = _update(model, batch, micros, adv, ids, send_back=False)
    assert (kept[1]["model.embed_tokens.weight"] - each[1]["model.embed_tokens.weight"]).abs().max() > 1e-5


def test_the_header_ends_before_the_shortest_prompt_does():
    def batch_of(*prompts):
        return pack([Trajectory(prompt_ids=list(p), tokens=[7], logprobs=[0.0], entropies=[0.0], loss_mask=[1],
                                group=str(i)) for i, p in enumerate(prompts)], 0)
    b = batch_of([1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 6, 7])
    assert common_header(b, torch.arange(3)) == [1, 2, 3]
    assert common_header(b, torch.tensor([0, 2])) == [1, 2, 3, 4]
    # one prompt: all of it but its last token, whose state the first response token's log-prob reads
    assert common_header(b, torch.tensor([1])) == [1, 2, 3]
    assert common_header(batch_of([1, 2], [3, 4]), torch.arange(2)) == []


def test_a_header_is_counted_free_by_micro_batches_and_checked_by_the_layout():
    g = torch.Generator().manual_seed(1)
    header = torch.randint(10, VOCAB, (40,), generator=g).tolist()
    batch = pack(_trajectories(header, g), 0)
    rows = torch.arange(len(batch))
    # a group's first row runs 50-54 tokens, its branch 5 more: 2 rows per 60 tokens; with the header
    # free a first row runs 10-14, and all 6 fit
    assert [len(m) for m in micro_batches(batch, rows, 16, 60, True)] == [2, 2, 2]
    assert [len(m) for m in micro_batches(batch, rows, 16, 60, True, len(header))] == [6]
    with pytest.raises(ValueError, match="does not continue the header"):
        pack_flat(batch, [h + 1 for h in header])
    with pytest.raises(ValueError, match="must end before every prompt does"):
        whole_prompt = batch.prompt_ids[0, -int(batch.prompt_mask[0].sum()):].tolist()
        pack_flat(batch.select(torch.tensor([0])), whole_prompt)


def test_the_learner_runs_a_shared_header_once_per_mini_batch(monkeypatch):
    """One update with the header run once equals the update with it run in every micro-batch (SGD:
    the update is the gradient), and the forwards run len(header) x (micro-batches - 1) fewer tokens
    (one update: no separate old log-probs pass)."""
    model0, tok = load_policy("tiny-random", seed=0)
    g = torch.Generator().manual_seed(2)
    header = torch.randint(10, len(tok), (48,), generator=g).tolist()
    trajs = _trajectories(header, g, vocab=len(tok))
    for t in trajs:
        t.logprobs = (-3 * torch.rand(len(t.tokens), generator=g)).tolist()
    cfg = build_config({"model": {"name": "tiny-random"}, "rollout": {"max_new_tokens": 16},
                        "train": {"lr": 1e-2, "micro_batch_size": 2, "bf16_autocast": False, "attention": "spans"}})

    def update(min_tokens):
        monkeypatch.setattr(learner_module, "HEADER_MIN_TOKENS", min_tokens)
        model = copy.deepcopy(model0)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        learner = Learner(model, opt, sched, cfg, pad_id=tok.pad_token_id, max_new_tokens=16)
        metrics, _ = learner.learn(RolloutBatch(copy.deepcopy(trajs), [], {}, 0), 1)
        return metrics, dict(model.named_parameters())

    once, each = update(32), update(10**9)
    assert each[0]["learner/forward_tokens"] - once[0]["learner/forward_tokens"] == len(header) * (3 - 1)
    assert abs(once[0]["loss"] - each[0]["loss"]) < 1e-6
    moved = 0.0
    for name, p in once[1].items():
        q = each[1][name]
        assert (p - q).abs().max() < 1e-6, name
        moved = max(moved, float((q - dict(model0.named_parameters())[name]).detach().abs().max()))
    assert moved > 1e-4   # the update did move the weights
