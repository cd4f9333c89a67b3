"""Generation: engines that sample tokens with log-probs and entropies, and the data objects they fill."""
from forkrl.rollout.engine import EngineStats, TorchEngine, sample_next
from forkrl.rollout.types import (
           Completion,
           GenerationRequest,
           SamplingParams,
           ToolCall,
           Trajectory,
)

__all__ = [
           "Completion",
           "EngineStats",
           "GenerationRequest",
           "SamplingParams",
           "ToolCall",
           "TorchEngine",
           "Trajectory",
           "sample_next",
]
