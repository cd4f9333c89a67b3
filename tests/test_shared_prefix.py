"""Tree branches train their shared prefix once: a branch is packed behind its parent with only its
own tokens, and reads the shared prefix's states from the parent's columns. Log-probs, entropies, the
loss and every gradient equal those of packing each branch in full (float32: within 1e-6, entropies
within 1e-6 of their size)."""
import copy

import pytest
import torch

from forkrl.train.batch import pack
from forkrl.train.forward import PolicyForward, pack_rows
from forkrl.types import Trajectory


def _tree(vocab: int) -> list[Trajectory]:
    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    prompt = toks(6)
    a = toks(14)
    b = a[:5] + toks(9)            # branches from a after 5 tokens
    c = b[:8] + toks(6)            # from b after 8: 5 of a's tokens, then 3 of b's own
    d = toks(11)                   # an independent root
    other_prompt, e = toks(4), toks(7)

    def traj(tokens, group, parent=None, branch_at=None, p=prompt):
        mask = [1] * len(tokens)
        return Trajectory(prompt_ids=p, tokens=tokens, logprobs=[-1.0] * len(tokens), entropies=[1.0] * len(tokens),
                          loss_mask=mask, group=group, parent=parent, branch_at=branch_at)
    trajs = [traj(a, "g"), traj(b, "g", 0, 5), traj(c, "g", 1, 8), traj(d, "g"), traj(e, "h", p=other_prompt)]
    trajs[0].loss_mask[3:5] = [0, 0]   # a tool observation inside the shared prefix
    return trajs


def _run(model, batch, adv):
    model.zero_grad()
    logp, entropy = PolicyForward(model)(batch)
    mask = batch.loss_mask.float()
    loss = -(logp * adv * mask).sum() / mask.sum() + 0.01 * (entropy * mask).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _model(vocab: int):
    """A small float32 Llama at the usual initialisation (log-probs near -log V, as a trained model's
    are in magnitude; the suite's `tiny` is initialised wide, where float32 rounding alone moves
    log-probs of -40 by more than 1e-6)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).float()


def test_shared_prefix_runs_once_with_the_same_loss_and_gradients(tiny):
    _, tok = tiny
    model = _model(len(tok))
    trajs = _tree(len(tok))
    batch = pack(trajs, tok.pad_token_id)
    per_leaf = copy.copy(batch)
    per_leaf.token_origin = None
    packed, full = pack_rows(batch), pack_rows(per_leaf)
    assert packed.shared == 5 + 8           # b reads 5 tokens from a; c reads 5 from a and 3 from b
    assert full.shared == 0
    assert packed.run <= full.run - 13       # the forward runs at least the 13 shared tokens fewer
    adv = torch.randn(batch.loss_mask.shape, generator=torch.Generator().manual_seed(1))
    got, want = _run(model, batch, adv), _run(model, per_leaf, adv)
    assert (got[0] - want[0]).abs().max() < 1e-6      # log-probs
    # entropies (about log V = 10.8, where one float32 step is 1e-6): within 1e-6 of their size
    assert ((got[1] - want[1]).abs() / want[1].abs().clamp(min=1)).max() < 1e-6
    assert abs(float(got[2] - want[2])) < 1e-6         # loss
    for name, grad in got[3].items():
        assert (grad - want[3][name]).abs().max() < 1e-6, name
    # the shared tokens' log-probs are the parent's, as sampling gave them
    assert torch.equal(got[0][1, :3], got[0][0, :3]) and torch.equal(got[0][2, :8], got[0][1, :8])  # (a: 3-4 observed)


def test_a_branch_without_its_parent_in_the_micro_batch_is_packed_in_full(tiny):
    _, tok = tiny
    batch = pack(_tree(len(tok)), tok.pad_token_id)
    alone = batch.select(torch.tensor([1, 3]))      # b without a
    assert pack_rows(alone).shared == 0


def _run_with(model, batch, adv, attention):
    model.zero_grad()
    logp, entropy = PolicyForward(model, attention=attention)(batch)
    mask = batch.loss_mask.float()
    loss = -(logp * adv * mask).sum() / mask.sum() + 0.01 * (entropy * mask).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_span_attention_equals_dense_attention_over_packed_rows(tiny):
    """Each prompt and each response attends over just the keys it sees (attention.py): the same
    log-probs, entropies, loss and gradients as dense attention under the rows' mask, for a tree packed
    into its parent's row, for branches packed in full, with grouped key/value heads, and with the
    layers recomputed in backward (gradient checkpointing)."""
    from forkrl.train.attention import SPAN_ATTENTION
    from forkrl.train.forward import ValueForward
    _, tok = tiny
    model = _model(len(tok))
    batch = pack(_tree(len(tok)), tok.pad_token_id)
    per_leaf = copy.copy(batch)
    per_leaf.token_origin = None
    adv = torch.randn(batch.loss_mask.shape, generator=torch.Generator().manual_seed(1))
    for b in (batch, per_leaf):
        want = _run_with(model, b, adv, "dense")
        got = _run_with(model, b, adv, "spans")
        assert model.config._attn_implementation == SPAN_ATTENTION
        assert (got[0] - want[0]).abs().max() < 1e-6
        assert ((got[1] - want[1]).abs() / want[1].abs().clamp(min=1)).max() < 1e-6
        assert abs(float(got[2] - want[2])) < 1e-6
        for name, grad in got[3].items():
            assert (grad - want[3][name]).abs().max() < 1e-6, name
    # a model in span mode still answers a dense forward (generation, other callers): SDPA as before
    assert (_run_with(model, batch, adv, "dense")[0] - want[0]).abs().max() < 1e-6
    model.gradient_checkpointing_enable()
    model.train()
    got = _run_with(model, batch, adv, "spans")
    model.gradient_checkpointing_disable()
    want = _run_with(model, batch, adv, "dense")
    for name, grad in got[3].items():
        assert (grad - want[3][name]).abs().max() < 1e-6, name
    values = [ValueForward(model, attention=a) for a in ("dense", "spans")]
    torch.manual_seed(2)
    values[0].head.reset_parameters()  # a trained head's scale, not the zeros it starts from
    values[1].head.load_state_dict(values[0].head.state_dict())
    dense, spans = values[0](batch), values[1](batch)
    assert dense.abs().max() > 0.1 and (dense - spans).abs().max() < 1e-6
    with pytest.raises(ValueError, match="auto, dense or spans"):
        PolicyForward(model, attention="flash")


def test_the_flat_layout_runs_every_distinct_prefix_once(tiny):
    """Sequences that share tokens without being declared branches (a few-shot header two prompts
    share, samples whose first tokens agree, a response repeated, one that is a prefix of another)
    run the shared tokens once in the flat layout, and every log-prob, entropy, the loss and every
    gradient equal those of running each sequence alone (dense rows, float32)."""
    _, tok = tiny
    model = _model(len(tok))
    g = torch.Generator().manual_seed(3)

    def toks(n):
        return torch.randint(10, len(tok), (n,), generator=g).tolist()

    header = toks(9)
    p1, p2 = header + toks(3), header + toks(4)
    r1 = toks(8)
    r2 = r1[:3] + toks(5)       # agrees with r1 on its first 3 tokens
    r3 = list(r1)               # r1 again
    r4 = r1[:5]                 # a prefix of r1
    r5 = toks(6)

    def traj(p, r, group):
        return Trajectory(prompt_ids=p, tokens=r, logprobs=[-1.0] * len(r), entropies=[1.0] * len(r),
                          loss_mask=[1] * len(r), group=group)
    batch = pack([traj(p1, r1, "a"), traj(p1, r2, "a"), traj(p1, r3, "a"), traj(p1, r4, "a"), traj(p2, r5, "b")],
                 tok.pad_token_id)
    flat = pack_rows(batch, flat=True)
    # run: p1 and r1 (12 + 8), r2's own 5, nothing for r3 and r4, p2's own 4 and r5's 6
    assert flat.run == 12 + 8 + 5 + 0 + 0 + 4 + 6
    assert flat.shared == 3 + 8 + 5       # response tokens read from another sequence's columns
    assert len(flat.spans) == 3          # p1 + r1; r2 after its 3 borrowed; p2 + r5 after the header
    adv = torch.randn(batch.loss_mask.shape, generator=torch.Generator().manual_seed(4))
    got, want = _run_with(model, batch, adv, "spans"), _run_with(model, batch, adv, "dense")
    assert (got[0] - want[0]).abs().max() < 1e-6
    assert ((got[1] - want[1]).abs() / want[1].abs().clamp(min=1)).max() < 1e-6
    assert abs(float(got[2] - want[2])) < 1e-6
    for name, grad in got[3].items():
        assert (grad - want[3][name]).abs().max() < 1e-6, name
    assert torch.equal(got[0][2], got[0][0]) and torch.equal(got[0][3, :5], got[0][0, :5])


def test_micro_batches_count_what_the_flat_layout_runs(tiny):
    """With shared prefixes, a row costs what it adds to the micro-batch's flat row: its prompt +
    response less the longest prefix it shares with a row already there."""
    from forkrl.train.batch import micro_batches
    _, tok = tiny
    header = list(range(10, 30))                        # 20 tokens two prompts share

    def traj(p, r, group):
        return Trajectory(prompt_ids=p, tokens=r, logprobs=[-1.0] * len(r), entropies=[1.0] * len(r),
                          loss_mask=[1] * len(r), group=group)
    rows = [traj(header + [40, 41], [50, 51, 52, 53], "a"),      # 22 + 4 = 26 new tokens
            traj(header + [40, 41], [50, 51, 60, 61], "a"),      # shares 24: 2 new
            traj(header + [42, 43, 44], [70, 71, 72], "b")]      # shares the 20-token header: 6 new
    batch = pack(rows, tok.pad_token_id)
    every = torch.arange(3)
    assert [m.tolist() for m in micro_batches(batch, every, 16, 34, shared_prefixes=True)] == [[0, 1, 2]]  # 26+2+6
    assert [m.tolist() for m in micro_batches(batch, every, 16, 33, shared_prefixes=True)] == [[0, 1], [2]]
    # the dense layout's count: a prompt once per micro-batch, every response in full
    assert [m.tolist() for m in micro_batches(batch, every, 16, 34)] == [[0, 1], [2]]   # 22+4+4, then 23+3
    assert pack_rows(batch, flat=True).run == 34


def test_a_rows_untrained_tail_is_not_run_and_changes_nothing(tiny):
    """`select` cuts each row after its last trained token (a pruned leaf, a token selector's tail):
    the forward runs fewer tokens, with the same loss and gradients as running every row whole."""
    _, tok = tiny
    model = _model(len(tok))
    batch = pack(_tree(len(tok)), tok.pad_token_id)
    train = batch.loss_mask.clone()
    train[2, 10:] = 0                  # c's own tail
    train[3, 4:] = 0                   # most of d
    train[1, :] = 0                    # b trains nothing
    batch.train_mask = train
    adv = torch.randn(batch.loss_mask.shape, generator=torch.Generator().manual_seed(1))
    every = torch.arange(len(batch))
    cut = batch.select(every)
    assert cut.resp_ids.shape[1] == batch.resp_ids.shape[1]   # a's last token trains
    assert cut.loss_mask[3, 4:].sum() == 0 and cut.loss_mask[1].sum() == 0 and cut.loss_mask[0].sum() == batch.loss_mask[0].sum()

    def run(b, flat):
        model.zero_grad()
        fwd = PolicyForward(model, attention="spans" if flat else "dense")
        logp, _ = fwd(b)
        L = logp.shape[1]
        m = train[:, :L]
        loss = -(logp * adv[:, :L] * m).sum() / m.sum()
        loss.backward()
        return fwd.tokens_run, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    for flat in (False, True):
        whole, short = run(batch, flat), run(cut, flat)
        assert short[0] < whole[0]                 # fewer tokens run
        assert abs(float(short[1] - whole[1])) < 1e-6
        for name, grad in short[2].items():
            assert (grad - whole[2][name]).abs().max() < 1e-6, name
