"""Generation: engines that sample tokens with log-probs and entropies, the samplers that decide where
the sampling budget goes, and the data objects they fill."""
from forkrl.registry import ENGINES, SAMPLERS
from forkrl.rollout import (  # noqa: F401  (registers samplers and engines)
    april,
    arpo,
    branchgrpo,
    etmr,
    latr,
    marft,
    semi_online,
    vllm_engine,
)
from forkrl.rollout.engine import HFEngine, TorchEngine, build_local_engine, sample_next
from forkrl.rollout.samplers import (
    RolloutBudget,
    SamplerContext,
    build_sampler,
    run_sampler,
)
from forkrl.types import (
    Completion,
    Engine,
    EngineStats,
    GenerationRequest,
    SamplingParams,
    ToolCall,
    Trajectory,
)


def build_engine(rollout, model, tokenizer, seed: int = 0):
    """The registered engine a config's `rollout` section asks for (`rollout.engine`); refused, before
    anything loads, when the recipe needs a sampling feature the engine does not declare."""
    cls = ENGINES.get(rollout.engine)
    problems = rollout.unsupported_features(cls.supports)
    if problems:
        raise ValueError("; ".join(problems))
    return ENGINES.hook(rollout.engine, "build")(rollout, model, tokenizer, seed=seed)


__all__ = [
    "ENGINES",
    "SAMPLERS",
    "Completion",
    "Engine",
    "EngineStats",
    "GenerationRequest",
    "RolloutBudget",
    "SamplerContext",
    "SamplingParams",
    "ToolCall",
    "HFEngine",
    "TorchEngine",
    "build_local_engine",
    "Trajectory",
    "build_engine",
    "build_sampler",
    "run_sampler",
    "sample_next",
]
