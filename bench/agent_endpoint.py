"""What the agent endpoint costs over calling the engine directly: decoded tokens per second for
`episodes` single-call episodes through HTTP (the real `openai` client, one per episode, all
concurrent) against one `engine.generate` call with the same prompts. End-of-sequence is disabled, so
both sides decode exactly `tokens` per sequence. Prints JSON.

    python bench/agent_endpoint.py [--model smollm2-135m] [--episodes 64] [--tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import openai
    import torch

    from forkrl.agents import EpisodeRecorder, PolicyEndpoint
    from forkrl.models import load_policy
    from forkrl.rollout import TorchEngine
    from forkrl.types import GenerationRequest, SamplingParams
    torch.set_num_threads(2)
    model, tok = load_policy(args.model)
    engine = TorchEngine(model, tok, max_batch_size=args.episodes)
    engine.eos_ids = [-1]  # exactly `tokens` per sequence on both sides
    questions = [f"What is {i} + {i % 7}? Explain briefly." for i in range(args.episodes)]
    params = SamplingParams(temperature=1.0, max_tokens=args.tokens)

    def direct() -> float:
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                           return_dict=False) for q in questions]
        engine.weights_updated()  # no prefix served from an earlier run
        start = time.perf_counter()
        outs = engine.generate([GenerationRequest(list(p), params) for p in prompts], seed=0)
        assert all(len(o[0].token_ids) == args.tokens for o in outs)
        return time.perf_counter() - start

    endpoint = PolicyEndpoint(engine, tok, EpisodeRecorder(tok), max_tokens=args.tokens, fixed_temperature=1.0).start()

    async def episodes() -> float:
        async def one(i):
            async with openai.AsyncOpenAI(base_url=endpoint.base_url(f"b{i}"), api_key=endpoint.api_key,
                                          max_retries=0, timeout=600) as client:
                r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": questions[i]}],
                                                         max_tokens=args.tokens)
                assert r.usage.completion_tokens == args.tokens
        engine.weights_updated()
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.episodes)))
        return time.perf_counter() - start

    direct()  # warm-up (kernels, allocator)
    asyncio.run(episodes())
    calls_before = endpoint.engine_calls
    d = [direct() for _ in range(args.repeats)]
    e = [asyncio.run(episodes()) for _ in range(args.repeats)]
    calls = (endpoint.engine_calls - calls_before) / args.repeats
    endpoint.stop()
    tokens = args.episodes * args.tokens
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
              "model": args.model, "episodes": args.episodes, "tokens_per_episode": args.tokens,
              "direct_tokens_per_s": round(tokens / statistics.median(d), 1),
              "endpoint_tokens_per_s": round(tokens / statistics.median(e), 1),
              "endpoint_engine_calls_per_run": calls,
              "endpoint_vs_direct": round(statistics.median(d) / statistics.median(e), 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
