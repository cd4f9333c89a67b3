"""Property tests (hypothesis) for every registered method: finite on random inputs with masked-out
rows and zero-variance groups, no policy gradient from zero advantages, selections inside the mask."""
import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forkrl.algos import (
    ADVANTAGES,
    LOSSES,
    SELECTORS,
    TOKEN_SELECTORS,
    BatchContext,
    per_turn_index,
)
from forkrl.algos.selection import max_variance_subset

# terms that act without an advantage, by design: KL-Cov's |log r| penalty (a KL-to-old surrogate),
# EPO's entropy bonus and smoothing penalty, and `nll`, the SFT objective, which is no policy gradient
REGULARISED = {"kl_cov", "epo", "nll"}
SETTINGS = settings(max_examples=25, deadline=None)


def _inputs(seed: int, rows: int, cols: int, zero_adv: bool = False):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rows, cols, generator=g) < 0.7).float()
    mask[0] = 0.0                                     # a fully masked-out row
    if cols > 2:
        mask[-1, cols // 2] = 0.0                     # an observation hole: two turns
    logp = -torch.rand(rows, cols, generator=g) * 5
    old = logp + torch.randn(rows, cols, generator=g) * 0.3
    entropy = torch.rand(rows, cols, generator=g) * 3
    if zero_adv:
        adv = torch.zeros(rows, cols)
    else:
        groups = torch.arange(rows) // 2
        rewards = torch.randint(0, 2, (rows,), generator=g).float()
        rewards[groups == 0] = 1.0                    # a zero-variance group
        adv, _ = ADVANTAGES["grpo"](rewards, groups, mask)
    return logp, old, adv, mask, entropy


def _loss(name, logp, old, adv, mask, entropy, progress=0.3):
    fn = LOSSES[name]
    turn = per_turn_index(mask)
    stats = {}
    prepare = LOSSES.hook(name, "prepare")
    if prepare is not None:
        # the learner's batch context holds the sampling entropies, which carry no gradient
        ctx = BatchContext(old_logp=old, adv=adv, mask=mask, entropy=entropy.detach(), turn=turn, progress=progress,
                           generator=torch.Generator().manual_seed(0))
        stats, _ = prepare(ctx)
    from forkrl.algos import call
    return call(fn, logp, old, adv, mask, params={},
                available={"entropy": entropy, "stats": stats, "turn": turn, "progress": progress, "agg": "token-mean"})


shapes = dict(seed=st.integers(0, 10_000), rows=st.integers(2, 6), cols=st.integers(1, 9))


@SETTINGS
@given(name=st.sampled_from(sorted(LOSSES)), **shapes)
def test_losses_and_gradients_are_finite(name, seed, rows, cols):
    logp, old, adv, mask, entropy = _inputs(seed, rows, cols)
    logp.requires_grad_(True)
    entropy.requires_grad_(True)
    loss, metrics = _loss(name, logp, old, adv, mask, entropy)
    assert math.isfinite(float(loss.detach()))
    assert all(math.isfinite(v) or v == math.inf for v in metrics.values()), metrics
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[mask == 0] == 0).all()          # masked tokens get no gradient


@SETTINGS
@given(name=st.sampled_from(sorted(LOSSES)), **shapes)
def test_zero_advantages_give_no_policy_gradient(name, seed, rows, cols):
    logp, old, adv, mask, entropy = _inputs(seed, rows, cols, zero_adv=True)
    logp.requires_grad_(True)
    loss, _ = _loss(name, logp, old, adv, mask, entropy)
    loss.backward()
    if name in REGULARISED:
        return
    assert float(loss.detach()) == 0.0
    assert (logp.grad == 0).all()


@SETTINGS
@given(name=st.sampled_from(sorted(TOKEN_SELECTORS)), progress=st.floats(0, 1), **shapes)
def test_token_selectors_stay_inside_the_mask(name, progress, seed, rows, cols):
    _, _, adv, mask, entropy = _inputs(seed, rows, cols)
    from forkrl.algos import call
    origin = torch.arange(rows * cols).view(rows, cols)
    origin[1:, :cols // 2] = origin[0, :cols // 2]   # a tree: the rows share their first half (branch_pruning)
    keep = call(TOKEN_SELECTORS[name], entropy, mask,
                available={"adv": adv, "progress": progress, "origin": origin, "step": 1}, params={})
    assert keep.dtype == torch.bool and keep.shape == mask.shape
    assert not (keep & (mask == 0)).any()
    if mask.any():
        assert keep.any()


@SETTINGS
@given(name=st.sampled_from(sorted(ADVANTAGES)), **shapes)
def test_advantages_are_finite_and_zero_off_the_mask(name, seed, rows, cols):
    _, _, _, mask, entropy = _inputs(seed, rows, cols)
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 2, (rows,), generator=g).float()
    groups = torch.arange(rows) // 2
    from forkrl.algos import call
    # token keys for the tree estimators: row r shares its first k_r tokens with row 0 (a branch)
    origin = torch.arange(rows * cols).view(rows, cols)
    for r in range(1, rows):
        k = int(torch.randint(0, cols + 1, (1,), generator=g))
        origin[r, :k] = origin[0, :k]
    from forkrl.algos.values import gae, outcome_token_rewards
    values = torch.randn(rows, cols, generator=g) * mask  # a critic's values and lambda-returns (gae)
    _, returns = gae(outcome_token_rewards(rewards, mask), values, mask)
    # one step per row, each its own episode (uis1)
    steps = torch.stack([torch.arange(rows), torch.zeros(rows, dtype=torch.long), torch.ones(rows, dtype=torch.long)], 1)
    available = {"entropy": entropy, "origin": origin, "values": values, "returns": returns, "steps": steps}
    adv, _ = call(ADVANTAGES[name], rewards, groups, mask, available=available, params={})
    assert torch.isfinite(adv).all() and (adv[mask == 0] == 0).all()
    # equal rewards in a group: no signal, except EMPG's future-clarity bonus (zeta f), which does not
    # come from the outcome, and GAE, whose baseline is the critic, not the group. (A group of one
    # keeps A = R by verl's convention, so one group here.)
    if name not in ("empg", "gae"):
        one_group = torch.zeros(rows, dtype=torch.long)
        flat, _ = call(ADVANTAGES[name], torch.ones(rows), one_group, mask, available=available, params={})
        assert (flat == 0).all()


@SETTINGS
@given(values=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=7), k=st.integers(1, 7))
def test_max_variance_subset_is_optimal(values, k):
    v = torch.tensor(values, dtype=torch.float64)
    k = min(k, len(values))

    def var(idx):
        x = [values[i] for i in idx]
        m = sum(x) / len(x)
        return sum((a - m) ** 2 for a in x) / len(x)

    best = max(var(c) for c in itertools.combinations(range(len(values)), k))
    got = max_variance_subset(v, k).tolist()
    assert len(set(got)) == k and var(got) >= best - 1e-9


@SETTINGS
@given(progress=st.floats(0, 1), seed=st.integers(0, 1000), rows=st.integers(1, 12))
def test_sample_selectors_keep_something_of_every_group(progress, seed, rows):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, generator=g)
    groups = torch.randint(0, 3, (rows,), generator=g)
    from forkrl.algos import call
    adapter = torch.arange(rows) % 2  # MARFT's two agents, one row each per episode
    for name in SELECTORS:
        keep = call(SELECTORS[name], values, groups, params={},
                    available={"progress": progress, "adapter": adapter, "step": seed % 7 + 1})
        assert keep.shape == (rows,) and keep.dtype == torch.bool
        if name == "agent_by_agent":  # by design it drops every other agent's rows, whatever their group
            assert torch.equal(keep, adapter == 0)  # steps 1-7 fall in the first agent's interval (1000)
            continue
        if name == "d3s_samples":
            for grp in torch.unique(groups):
                assert int(keep[groups == grp].sum()) >= min(2, int((groups == grp).sum()))
