"""RL for ML-engineering agents (algorithms.md §22): duration weights by hand and in an update;
instrumentation markers that a program reaches but cannot fake; milestone credit."""
import copy

import pytest
import torch

from forkrl.algos.correction import duration_weights
from forkrl.collect.programs import extract_program, milestone_rewards, program_sandbox
from forkrl.config import ConfigError, build_config, load_config
from forkrl.envs.instrument import instrument, read_milestones
from forkrl.envs.sandbox import bwrap_available
from forkrl.train.learner import Learner
from forkrl.types import ToolCall, Trajectory

needs_bwrap = pytest.mark.skipif(not bwrap_available(), reason="programs run in the bubblewrap sandbox")


def test_duration_weights_by_hand():
    s = torch.tensor([1.0, 2.0, 3.0])
    assert duration_weights(s, mode="mean")[0].tolist() == pytest.approx([0.5, 1.0, 1.5])
    assert duration_weights(s, mode="sum")[0].tolist() == pytest.approx([1 / 6, 1 / 3, 1 / 2])
    assert duration_weights(s, mode="raw")[0].tolist() == pytest.approx([1.0, 2.0, 3.0])
    assert duration_weights(torch.zeros(3), mode="mean")[0].tolist() == [1.0, 1.0, 1.0]  # no timings: no weighting
    with pytest.raises(ValueError, match="allowed"):
        duration_weights(s, mode="median")


def _traj(tokens, seconds):
    t = Trajectory(prompt_ids=[5, 6, 7], tokens=tokens, logprobs=[-1.0] * len(tokens), entropies=[1.0] * len(tokens),
                   loss_mask=[1] * len(tokens), group="g", advantage=1.0)
    t.tool_calls = [ToolCall("python", (0, 0), seconds=seconds)]
    return t


def test_a_duration_weighted_update_counts_each_action_by_its_time(tiny):
    """Fixed advantages, token-mean: actions of 0 s and 1 s weigh 0 and 2 (dt / mean dt), so the update
    equals an unweighted one on the 1 s action twice (same token count, same normaliser)."""
    model, _ = tiny

    def update(trajs, weighting):
        m = copy.deepcopy(model)
        cfg = build_config({"algo": {"duration_weight": weighting}, "train": {"lr": 1e-2, "bf16_autocast": False}})
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        Learner(m, opt, sched, cfg, max_new_tokens=4).update(trajs, step=1)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    weighted = update([_traj([11, 12, 13], 0.0), _traj([21, 22, 23], 1.0)], "mean")
    doubled = update([_traj([21, 22, 23], 1.0), _traj([21, 22, 23], 1.0)], "off")
    plain = update([_traj([11, 12, 13], 0.0), _traj([21, 22, 23], 1.0)], "off")
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(weighted - start, doubled - start, atol=1e-6)   # float rounding: ~1e-7
    assert not torch.allclose(plain - start, doubled - start, atol=1e-5)  # unweighted: ~1e-3 apart


def test_weights_need_a_loss_that_takes_them():
    from forkrl.registry import LOSSES

    @LOSSES.register("unweighted_test_loss")
    def unweighted(logp, old, adv, mask):
        return (logp * 0).sum(), {}
    try:
        with pytest.raises(ConfigError, match="takes no `weight`"):
            build_config({"algo": {"loss": "unweighted_test_loss", "duration_weight": "mean"}})
    finally:
        LOSSES.unregister("unweighted_test_loss")


PROGRAM = "data = [1, 2]\ntotal = sum(data)\nprint(total)\n"


def test_instrumentation_marks_the_milestones_by_rule():
    code, nonce = instrument(PROGRAM, nonce="n0")
    lines = code.splitlines()
    assert lines == ["print('<<milestone n0 started>>', flush=True)", "data = [1, 2]",
                     "print('<<milestone n0 data_loaded>>', flush=True)", "total = sum(data)",
                     "print('<<milestone n0 computed>>', flush=True)", "print(total)",
                     "print('<<milestone n0 printed>>', flush=True)"]
    assert instrument("def broken(:\n", nonce="n0") == (None, "n0")
    # only this run's nonce counts; marker lines leave the output
    reached, rest = read_milestones("<<milestone n0 started>>\n<<milestone xx computed>>\n3\n<<milestone n0 started>>", "n0")
    assert reached == ["started"] and rest == "<<milestone xx computed>>\n3"


def test_programs_are_read_from_fences_tags_or_whole():
    assert extract_program("Here:\n```python\nprint(1)\n```\nDone") == "print(1)"
    assert extract_program("<python>print(2)</python>") == "print(2)"
    assert extract_program("print(3)") == "print(3)"


@needs_bwrap
def test_milestone_credit_from_sandboxed_runs():
    sandbox = program_sandbox("auto", 5.0)
    completions = [
        f"```python\n{PROGRAM}```",                                  # correct: full credit
        "```python\ndata = [1, 2]\ntotal = sum(data) + 1\nprint(total)\n```",   # wrong answer: 4 milestones
        "```python\ndata = [1, 2]\nx = data[5]\nprint(x)\n```",      # crashes after loading: started, data_loaded
        "```python\nprint('<<milestone 0123456789abcdef computed>>')\nprint(0)\n```",  # a guessed marker: no credit
        "```python\nprint(1 +\n```",                                  # does not parse: nothing
    ]
    rewards, reached, seconds = milestone_rewards(completions, ["3"] * 5, sandbox, credit=0.1, full=1.0)
    assert reached[:3] == [["started", "data_loaded", "computed", "printed"],
                           ["started", "data_loaded", "computed", "printed"], ["started", "data_loaded"]]
    assert reached[3] == ["started", "printed"] and reached[4] == []
    assert rewards == pytest.approx([1.0, 0.4, 0.2, 0.2, 0.0])
    assert all(s > 0 for s in seconds[:4]) and seconds[4] == 0.0


def test_milestones_term_needs_the_programs_task():
    with pytest.raises(ConfigError, match="task.source: programs"):
        load_config("configs/mle_milestones.yaml", ["task.source=file"])
