"""Pure tensor functions of RL post-training, each registered by name (imports only torch and the
ground floor's registry).

- advantages: rewards of a group -> per-token advantages
- entropy_losses: losses that restrict the tokens driving entropy collapse (Clip-Cov, KL-Cov)
- losses: log-probs, advantages, masks -> scalar loss and metrics; aggregation modes; KL estimators
- values: a learned critic's formulas (GAE, the clipped value loss, explained variance)
- marft: MARFT's action log-prob, action-level PPO and agent-by-agent selection
- selection: which samples train (DAPO dynamic sampling), which tokens train (forking tokens), and
  reward shaping (DAPO overlong)
"""
from forkrl.algos import (  # noqa: F401  (registers the methods)
    advantages,
    entropy_losses,
    losses,
    marft,
    selection,
    tree_advantages,
    values,
)
from forkrl.algos.losses import AGG_MODES, KL_ESTIMATORS, agg_loss, kl_penalty
from forkrl.algos.registry import (
    RESERVED,
    BatchContext,
    call,
    hyperparameters,
    per_turn_index,
)
from forkrl.registry import (
    ADVANTAGES,
    LOSSES,
    SELECTORS,
    TOKEN_SELECTORS,
    register_advantage,
    register_loss,
    register_selector,
    register_token_selector,
)

__all__ = [
                                   "ADVANTAGES",
                                   "AGG_MODES",
                                   "KL_ESTIMATORS",
                                   "LOSSES",
                                   "RESERVED",
                                   "SELECTORS",
                                   "TOKEN_SELECTORS",
                                   "BatchContext",
                                   "agg_loss",
                                   "call",
                                   "hyperparameters",
                                   "kl_penalty",
                                   "per_turn_index",
                                   "register_advantage",
                                   "register_loss",
                                   "register_selector",
                                   "register_token_selector",
]
