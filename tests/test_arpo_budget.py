"""`bench/arpo_budget.py`: ARPO's expected token ratio under its budget rule, against hand-computed
cases (algorithms.md §2 b: N roots, a branch per active trajectory per call with probability τ while
slots are free, fill-ins one at a time that may branch in turn)."""
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
