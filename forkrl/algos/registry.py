"""Name -> function registries for advantage estimators, policy losses and selectors.

Recipes pick methods by name; a method registers itself with a decorator next to its formula.
Unknown names fail with the list of registered ones.

Methods read what the learner has through reserved keyword arguments (`RESERVED`); a method
declares the ones it needs and receives only those. Everything else in its keyword-only signature
is a hyperparameter a recipe may set. A loss that needs statistics over the whole rollout batch
(not one micro-batch) names a hook in its decorator, `@register_loss(name, prepare=fn)` with
`fn(ctx: BatchContext, **params) -> (stats, state)`; the
learner calls it once per rollout batch and passes `stats` to every micro-batch call, [B, T]
tensors sliced to the micro-batch's rows.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from forkrl.registry import (
    LEARNER_ARGUMENTS as RESERVED,  # what the learner passes a method itself
)
from forkrl.registry import hyperparameters as _keyword_parameters


@dataclass
class BatchContext:
    """What `prepare` hooks see: the whole rollout batch before its first update.

    old_logp is the policy before the update (recomputed, or the sampling log-probs), entropy the
    sampling-time entropy, so batch-level statistics describe the policy the update starts from.
    """
    old_logp: Tensor
    adv: Tensor
    mask: Tensor
    entropy: Tensor
    turn: Tensor
    progress: float = 0.0
    state: dict = field(default_factory=dict)       # the method's state from earlier steps (checkpointed)
    generator: torch.Generator | None = None        # seeded per step, for random selections


def hyperparameters(fn: Callable) -> list[str]:
    """The keyword-only parameters of `fn` a recipe may set."""
    return _keyword_parameters(fn, RESERVED)


def call(fn: Callable, *args, available: dict[str, Any], params: dict[str, Any]):
    """Call `fn(*args, **params)` plus the reserved arguments in `available` that it declares."""
    accepted = inspect.signature(fn).parameters
    extra = {k: v for k, v in available.items() if k in accepted}
    return fn(*args, **extra, **params)


def per_turn_index(loss_mask: Tensor) -> Tensor:
    """[B, T] 1-based turn number of each generated token (a turn = a maximal run of loss_mask 1,
    i.e. the tokens between two tool observations), 0 on observation and padding tokens."""
    m = loss_mask > 0
    prev = torch.cat([torch.zeros_like(m[:, :1]), m[:, :-1]], dim=1)
    starts = m & ~prev
    return torch.where(m, starts.long().cumsum(-1), torch.zeros_like(starts, dtype=torch.long))
