"""The sampling engine, in nano-vllm's nouns, one per file:

    sequence.py      Sequence: one completion being sampled, and what ends it
    scheduler.py     Scheduler: which sequence runs in which cache slot (continuous batching)
    sampling.py      sample_next: token, log-prob and exact entropy from one softmax pass
    runner.py        DecoderRunner: tensors in, logits out (Llama, Qwen2, Qwen3; CPU or CUDA)
    prefix_cache.py  PrefixCache: stored prefix states, looked up by token blocks
    kernels.py       the compiled CPU decode kernels (decode_kernels.cpp)
    torch_engine.py  TorchEngine: the engine loop over the four above (`rollout.engine: torch`)
    hf_engine.py     HFEngine: the Hugging Face forward, the reference (`rollout.engine: hf`)

Each engine declares the features it supports (`supports`, checked against a recipe's needs).
"""
from forkrl.rollout.engine.hf_engine import HFEngine
from forkrl.rollout.engine.runner import (
           DecoderRunner,
           resolve_dtype,
           unsupported_reason,
)
from forkrl.rollout.engine.sampling import adapt_temperature, sample_next
from forkrl.rollout.engine.sequence import Sequence, eos_and_pad_ids
from forkrl.rollout.engine.torch_engine import TorchEngine, build_local_engine
from forkrl.types import EngineStats

__all__ = ["DecoderRunner", "EngineStats", "HFEngine", "Sequence", "TorchEngine", "adapt_temperature",
           "build_local_engine", "eos_and_pad_ids", "resolve_dtype", "sample_next", "unsupported_reason"]
