"""The collection stage (DESIGN.md "Collect"): everything between a data position and a scored,
gated `RolloutBatch`. A batch source is anything with `next_batch(step)`, `set_policy(version,
feedback)`, `state_dict()` and `load_state_dict()`: the `Collector`, the SFT `DemoCollector`, and the
Ray rollout client in forkrl.distributed."""
from forkrl.collect import gates, reward_terms  # noqa: F401  (registers the shipped gates and terms)
from forkrl.collect.collector import (
    CollectContext,
    Collector,
    LocalPositions,
    RankPositions,
    Refill,
    build_env,
    derive_seed,
    groups_of,
)
from forkrl.collect.demos import DemoCollector

__all__ = ["CollectContext", "Collector", "DemoCollector", "LocalPositions", "RankPositions", "Refill", "build_env",
           "derive_seed", "groups_of"]
