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
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = _batch(model, tok, lengths=(40, 40))
    tokens = int(batch.loss_mask.sum() + batch.prompt_mask.sum())
    ratio = activation_bytes_per_token(model, checkpointing, autocast) * tokens / saved_bytes(model, batch, autocast)
    assert 1 / 1.5 < ratio < 1.5, ratio
