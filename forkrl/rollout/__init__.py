"""Generation: engines that sample tokens with log-probs and entropies, the samplers that decide where
the sampling budget goes, and the data objects they fill."""
from forkrl.rollout import april, arpo, etmr, latr  # noqa: F401  (registers the tree samplers)
from forkrl.rollout.engine import EngineStats, TorchEngine, sample_next
from forkrl.rollout.samplers import (
           SAMPLERS,
           RolloutBudget,
           SamplerContext,
           build_sampler,
           run_sampler,
)
from forkrl.rollout.types import (
           Completion,
           GenerationRequest,
           SamplingParams,
           ToolCall,
           Trajectory,
)

__all__ = [
           "SAMPLERS",
           "Completion",
           "EngineStats",
           "GenerationRequest",
           "RolloutBudget",
           "SamplerContext",
           "SamplingParams",
           "ToolCall",
           "TorchEngine",
           "Trajectory",
           "build_sampler",
           "run_sampler",
           "sample_next",
]
