"""The learner's memory mechanisms: packed rows, gradient checkpointing and the activation estimate
behind `train.micro_batch_tokens: auto` (measured as the bytes autograd saves for backward)."""
import copy

import pytest
import torch

from forkrl.rollout import GenerationRequest, SamplingParams, TorchEngine, Trajectory
from forkrl.train.learner import (
    activation_bytes_per_token,
    pack,
    pack_rows,
    response_logprobs,
)


def _batch(model, tok, lengths=(40,), n=4):
    engine = TorchEngine(model, tok)
    engine.eos_ids = [-1]
    reqs = [GenerationRequest(tok(f"question number {i} is here")["input_ids"], SamplingParams(max_tokens=m, n=n))
            for i, m in enumerate(lengths)]
    outs = engine.generate(reqs, seed=0)
    trajs = [Trajectory.from_completion(r.prompt_ids, c, group=str(i)) for i, (r, o) in enumerate(zip(reqs, outs))
             for c in o]
    return pack(trajs, tok.pad_token_id)


def saved_bytes(model, batch, autocast=False) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (parameters excluded)."""
    seen: dict[int, int] = {}

    def keep(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        response_logprobs(model, batch, autocast=autocast, chunk=10**6)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


def test_packed_rows_put_short_responses_of_a_prompt_together(tiny):
    model, tok = tiny
    batch = _batch(model, tok, lengths=(4, 30), n=4)   # a short group and a long one
    packed = pack_rows(batch)
    # the four 4-token responses share one row behind their prompt; the long ones need a row each
    assert packed.ids.shape[0] == 1 + 4
    unpadded = float(batch.loss_mask.sum() + batch.prompt_mask.sum(-1)[batch.prompt_index].sum())
    assert packed.padding < 1 - unpadded / (len(batch) * packed.ids.shape[1])


def test_gradient_checkpointing_changes_memory_not_gradients(tiny):
    model, tok = tiny
    m = copy.deepcopy(model).train()
    batch = _batch(m, tok)
    grads, saved = [], []
    for ckpt in (False, True):
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.zero_grad()
        lp, ent = response_logprobs(m, batch)
        (lp.sum() + 0.1 * ent.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
        saved.append(saved_bytes(m, batch))
    assert ((grads[0] - grads[1]).norm() / grads[0].norm()) < 1e-5
    assert saved[1] < saved[0] / 3, saved


def test_auto_micro_batch_follows_the_memory_budget(tiny, tmp_path):
    from forkrl.train import Trainer
    from tests.test_trainer import _cfg
    for gb in (0.01, 0.05):
        cfg = _cfg(tmp_path, train={"steps": 1, "activation_memory_gb": gb})
        learner = Trainer(cfg).learner
        assert learner.micro_tokens == int(gb * 2**30 / activation_bytes_per_token(learner.model))
    cfg = _cfg(tmp_path, train={"steps": 1, "micro_batch_tokens": 300})
    assert Trainer(cfg).learner.micro_tokens == 300


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_activation_estimate_is_within_1_5x_of_what_autograd_saves(checkpointing, autocast):
    from forkrl.models import load_policy
    model, tok = load_policy("smollm2-135m")
    model.train()
    batch = _batch(model, tok, lengths=(40, 40))
    tokens = int(batch.loss_mask.sum() + batch.prompt_mask.sum())   # what the flat packing runs
    saved = saved_bytes(model, batch, autocast)
    if checkpointing:
        # the forward keeps each layer's input; backward then holds one layer's full set while it is
        # recomputed, which no forward-time hook sees: a layer's share of the uncheckpointed bytes
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        saved = saved_bytes(model, batch, autocast) + saved / model.config.num_hidden_layers
    ratio = activation_bytes_per_token(model, checkpointing, autocast) * tokens / saved
    assert 1 / 1.5 < ratio < 1.5, ratio


def _padded_reference(model, batch):
    """Log-probs and entropies of every response token from a plain padded batch: each sequence
    (prompt + response) right-padded, a 2-D attention mask and explicit position ids, full logits."""
    B, L = batch.resp_ids.shape
    seqs = []
    for b in range(B):
        p = batch.prompt_index[b]
        prompt = batch.prompt_ids[p][batch.prompt_mask[p] > 0]
        n = int(batch.resp_mask[b].sum())
        seqs.append(torch.cat([prompt, batch.resp_ids[b, :n]]))
    T = max(len(s) for s in seqs)
    ids = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = s, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    logp_all = torch.log_softmax(logits, -1)
    logp, ent = torch.zeros((B, L)), torch.zeros((B, L))
    for b, s in enumerate(seqs):
        n = int(batch.resp_mask[b].sum())
        start = len(s) - n
        rows = logp_all[b, start - 1:start - 1 + n]  # the state before each response token
        logp[b, :n] = rows.gather(-1, batch.resp_ids[b, :n].unsqueeze(-1)).squeeze(-1)
        ent[b, :n] = -(rows.exp() * rows).sum(-1)
    return logp * batch.loss_mask, ent * batch.loss_mask


def test_packed_rows_compute_what_a_padded_batch_computes(tiny):
    """Responses packed behind their prompt, several to a row, with per-sequence positions: log-probs
    and entropies within 1e-5 (float32) of a padded batch, with prompts and responses of uneven length."""
    model, tok = tiny
    batch = _batch(model, tok, lengths=(3, 7, 25), n=3)
    packed = pack_rows(batch)
    assert packed.ids.shape[0] < len(batch)  # sequences really share rows
    with torch.no_grad():
        logp, ent = response_logprobs(model, batch)
    ref_logp, ref_ent = _padded_reference(model, batch)
    assert torch.allclose(logp, ref_logp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)


def test_a_packed_token_cannot_see_another_sequence(tiny):
    """Changing one response changes nothing in the responses packed beside it in the same row."""
    model, tok = tiny
    batch = _batch(model, tok, lengths=(3, 20), n=4)
    assert pack_rows(batch).ids.shape[0] == 1 + 4  # the four short responses share one row
    with torch.no_grad():
        before, _ = response_logprobs(model, batch)
    changed = copy.deepcopy(batch)
    changed.resp_ids[1] = (changed.resp_ids[1] + 17) % 1000  # another sequence's tokens
    with torch.no_grad():
        after, _ = response_logprobs(model, changed)
    others = [0, 2, 3]
    assert torch.equal(before[others], after[others])
    assert not torch.equal(before[1], after[1])


def test_the_trainers_gradient_checkpointing_is_on_in_the_learner(tmp_path):
    """`train.gradient_checkpointing` must reach the learner's forward: transformers recomputes layers
    only in training mode, and a loaded model is in eval mode (the option was silently off). Dropout
    stays off, so the forward is the sampled policy's."""
    from forkrl.train import Trainer
    from tests.test_trainer import _cfg
    saved = {}
    for ckpt in (False, True):
        (tmp_path / str(ckpt)).mkdir()
        trainer = Trainer(_cfg(tmp_path / str(ckpt), train={"steps": 1, "gradient_checkpointing": ckpt}))
        model = trainer.model
        batch = _batch(model, trainer.tokenizer)
        saved[ckpt] = saved_bytes(model, batch)
        if ckpt:
            assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
            with torch.no_grad():
                twice = [response_logprobs(model, batch)[0] for _ in range(2)]
            assert torch.equal(twice[0], twice[1])   # no dropout in training mode
    assert saved[True] < saved[False] / 3, saved
