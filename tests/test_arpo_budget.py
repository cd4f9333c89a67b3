"""`bench/arpo_budget.py`: ARPO's expected token ratio under its budget rule, against hand-computed
cases (algorithms.md §2 b: N roots, a branch per active trajectory per call with probability τ while
slots are free, fill-ins one at a time that may branch in turn), and ARPO's sampler against it on
scripted answers of that shape."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("arpo_budget", Path(__file__).parents[1] / "bench/arpo_budget.py")
arpo_budget = importlib.util.module_from_spec(spec)
spec.loader.exec_module(arpo_budget)
ratio = arpo_budget.expected_token_ratio


def test_one_call_two_slots():
    # the root (1); at depth 0.5 a branch (0.5) w.p. 1/2, else a whole fill-in (1): (1 + 0.25 + 0.5) / 2
    assert ratio(2, 1, [0.5]) == pytest.approx(0.875)


def test_a_fill_in_branches_in_its_turn():
    # root 1; branch (1/2): +0.5, then one fill-in +1; no branch: fill-in +1, whose call branches (1/2)
    # +0.5 or a second fill-in +1. E = 1 + 0.5*1.5 + 0.5*(1 + 0.25 + 0.5) = 2.625 over 3
    assert ratio(3, 1, [0.5]) == pytest.approx(0.875)


def test_certain_branching_at_default_budget_saves_the_branches_prefixes():
    # τ = 1: each of the N = M/2 roots branches at its first call, depth d: (N + N(1 - d)) / M = 1 - d/2
    assert ratio(8, 4, [0.5], tau=1.0) == pytest.approx(0.75)
    assert ratio(8, 4, [0.3, 0.6, 0.9], tau=1.0) == pytest.approx(1 - 0.3 / 2)


def test_no_branching_samples_whole_trajectories():
    assert ratio(8, 4, [0.3, 0.6], tau=0.0) == pytest.approx(1.0)



@pytest.mark.parametrize("N", [4, 1])
def test_the_sampler_spends_what_its_rule_expects(N):
    """ARPO's sampler on a scripted engine whose answers fit the idealised model: three turns of 18
    tokens (two end in a tool call, at depths 1/3 and 2/3), equal entropies (ΔH = 0), τ = 0.5, N of
    M = 8, fill-ins one at a time. Over 300 groups (fixed seeds) its decoded tokens per final
    trajectory come to the computed expectation: 0.774 at N = 4 and 0.733 at N = 1, where a
    standard error is 0.0025 and 0.0035. (τ = 0.6 at N = 1 would give 0.703.)"""
    from tests.test_samplers import EntropyScript, _arpo

    turns = ["aaaa<echo>x</echo>", "bbbb<echo>y</echo>", "<answer>1</answer>"]
    assert {len(t) for t in turns} == {18}
    groups, decoded = 300, 0
    for seed in range(groups):
        engine = EntropyScript(turns, entropies=[1.0])
        (group,), _ = _arpo({"initial": N, "tau": 0.5, "entropy_weight": 0.2, "fill_ahead": 0}, engine, M=8, seed=seed)
        assert len(group) == 8
        decoded += engine.stats.decode_tokens
    measured = decoded / (groups * 8 * 3 * 18)
    assert measured == pytest.approx(ratio(8, N, [1 / 3, 2 / 3]), abs=0.01)
