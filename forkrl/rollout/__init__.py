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


def build_engine(rollout, model, tokenizer, seed: int = 0):
    """The engine a config's `rollout` section asks for: TorchEngine, or VLLMEngine on a GPU."""
    if rollout.engine == "vllm":
        from forkrl.rollout.vllm_engine import VLLMEngine
        v = rollout.vllm
        return VLLMEngine(model, tokenizer, gpu_memory_utilization=v.gpu_memory_utilization,
                          entropy_topk=v.entropy_topk, max_model_len=v.max_model_len, dtype=v.dtype,
                          enforce_eager=v.enforce_eager, seed=seed)
    return TorchEngine(model, tokenizer, max_batch_size=rollout.max_batch_size,
                       prefix_cache_mb=rollout.prefix_cache_mb, dtype=rollout.engine_dtype)


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
    "build_engine",
    "build_sampler",
    "run_sampler",
    "sample_next",
]
