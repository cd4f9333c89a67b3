"""The train/inference mismatch gauge: train/logprob_mismatch = mean exp(|log p_sampling - log p_learner|)
over the trained tokens, near 1 when the engine has the learner's weights and above the bound when
it samples from stale ones."""
import copy
import logging

import pytest
import torch

from forkrl.algos.correction import logprob_mismatch
from forkrl.collect import Collector
from forkrl.models import load_policy
from forkrl.rollout import TorchEngine
from forkrl.tasks import build_task
from forkrl.train import Trainer
from tests.test_trainer import _cfg, _rows


def test_logprob_mismatch_by_hand():
    learner = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    sampling = torch.tensor([[-1.0, -2.0 + 1.0, -0.5], [0.0, 0.0, 0.0]])  # second row: not recorded
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    m = logprob_mismatch(learner, sampling, mask)
    # row 0: |0| -> 1, |1| -> e; the masked token and the unrecorded row are left out
    assert m["tokens"] == 2 and m["sum"] == pytest.approx(1 + 2.718281828)
    assert m["max"] == pytest.approx(2.718281828) and m["count_above_2"] == 1


def test_stale_engine_weights_raise_the_mismatch_and_a_fresh_sync_stays_near_1(tmp_path, caplog):
    fresh_cfg = _cfg(tmp_path, "fresh", train={"steps": 6, "lr": 3e-2})
    fresh = Trainer(fresh_cfg)
    fresh.train()
    fresh_mm = [r["train/logprob_mismatch"] for r in _rows(fresh_cfg)]
    assert all(abs(m - 1) < 0.01 for m in fresh_mm), fresh_mm
    assert fresh.greedy_agreement is not None and fresh.greedy_agreement >= 0.95

    # the same run, but the engine samples from a frozen copy of the initial weights
    stale_cfg = _cfg(tmp_path, "stale", train={"steps": 6, "lr": 3e-2})
    model, tok = load_policy("tiny-random", seed=0)
    task = build_task(stale_cfg.task, seed=stale_cfg.seed)
    source = Collector(stale_cfg, task=task, engine=TorchEngine(copy.deepcopy(model), tok), tokenizer=tok)
    with caplog.at_level(logging.WARNING, logger="forkrl"):
        Trainer(stale_cfg, model=model, tokenizer=tok, task=task, source=source).train()
    stale_mm = [r["train/logprob_mismatch"] for r in _rows(stale_cfg)]
    assert abs(stale_mm[0] - 1) < 0.01  # nothing trained yet: the same weights
    assert max(stale_mm[2:]) > 1.1, stale_mm
    assert "train/logprob_mismatch" in caplog.text and "> 1.10" in caplog.text
