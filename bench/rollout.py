"""TorchEngine vs Hugging Face `generate` on the embedded model, in one run on one machine, and both
against the machine's measured bf16 matmul bound.

    python bench/rollout.py [--dtypes bfloat16 float32] [--batches 32 128] [--new-tokens 64 256] [--threads N]

Every cell (dtype x batch x new tokens) samples `batch` distinct chat prompts at temperature 1 with
end-of-sequence disabled, so both systems produce exactly batch x new-tokens tokens (the same work).
Each cell runs a short warm-up of both, then alternates engine and generate (3 timed runs when a run
is at most 8k tokens, else 1) and reports the median. Same dtype on both sides: `generate` runs a model
loaded in that dtype, the engine keeps its sampling weights in that dtype.

The bound: a 2048^3 bf16 matmul's GFLOP/s divided by the FLOPs a decoded token costs in matmuls
(2 x the weights it multiplies: every linear layer and the output head), i.e. the tokens/s the
machine could decode if every step were one perfectly efficient matmul. Prints JSON.

Each cell also splits the engine's call: `engine_prefill_s` is a call for one new token (the
prefill and the first draw; median of 3), `engine_decode_step_ms` the rest of the median call per
further token.

The engine's compiled decode kernels (forkrl/rollout/engine/kernels.py) are built on first use (~20 s,
then cached; `kernel_build_or_load_s`); FORKRL_KERNELS=0 measures the engine without them.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def _timed(fn, *args) -> tuple[float, object]:
    """(seconds, result) of fn(*args)."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def matmul_weights(model) -> int:
    """Weights a decoded token multiplies: every nn.Linear (the tied output head included once)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--new-tokens", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from forkrl.models import load_policy
    from forkrl.rollout import GenerationRequest, SamplingParams, TorchEngine

    models = {dt: load_policy("smollm2-135m", dtype=dt) for dt in args.dtypes}
    tok = next(iter(models.values()))[1]
    tok.padding_side = "left"
    questions = [f"What is {a} plus {b}? Explain step by step." for a, b in zip(range(3, 900, 3), range(7, 1800, 5))]
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False) for q in questions]

    gflops = matmul_gflops(torch.bfloat16)
    model_f32 = models.get("float32", models[args.dtypes[0]])[0]
    flops_per_token = 2 * matmul_weights(model_f32)
    bound = gflops * 1e9 / flops_per_token
    result = {"bench": "rollout", "model": "smollm2-135m", "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, "
                         f"{torch.backends.cpu.get_cpu_capability()}",
              "torch": torch.__version__, "bf16_matmul_gflops": round(gflops, 1),
              "matmul_flops_per_token": flops_per_token, "bf16_bound_tokens_per_s": round(bound, 1), "cells": []}

    for dt in args.dtypes:
        model, _ = models[dt]
        model.eval()
        engine = TorchEngine(model, tok, max_batch_size=max(args.batches), prefix_cache_mb=0, dtype=dt)
        engine.eos_ids = [-1]  # end-of-sequence disabled: exactly new_tokens per sequence
        for batch in args.batches:
            prompts = chats[:batch]
            enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
            for new in args.new_tokens:
                def run_engine(n=new, prompts=prompts, engine=engine):
                    params = SamplingParams(temperature=1.0, max_tokens=n)
                    out = engine.generate([GenerationRequest(p, params) for p in prompts], seed=0)
                    return sum(len(c.token_ids) for o in out for c in o)

                def run_hf(n=new, enc=enc, model=model):
                    with torch.inference_mode():
                        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                             max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
                    return out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])

                run_engine(8), run_hf(8)  # warm-up
                repeats = 3 if batch * new <= 8192 else 1
                times = {"engine": [], "hf": []}
                counts = {}
                for _ in range(repeats):
                    for key, fn in (("engine", run_engine), ("hf", run_hf)):
                        seconds, counts[key] = _timed(fn)
                        times[key].append(seconds)
                assert counts["engine"] == counts["hf"] == batch * new, counts
                eng = counts["engine"] / statistics.median(times["engine"])
                hf = counts["hf"] / statistics.median(times["hf"])
                # the engine's call split: prefill (+ the first token) and the mean decode step after it
                first = statistics.median(_timed(run_engine, 1)[0] for _ in range(3))
                cell = {"dtype": dt, "batch": batch, "new_tokens": new, "repeats": repeats,
                        "torch_engine_tokens_per_s": round(eng, 1), "hf_generate_tokens_per_s": round(hf, 1),
                        "speedup": round(eng / hf, 2), "engine_share_of_bf16_bound": round(eng / bound, 3),
                        "engine_prefill_s": round(first, 3),
                        "engine_decode_step_ms": round((statistics.median(times["engine"]) - first) / (new - 1) * 1e3, 1)}
                result["cells"].append(cell)
                print(json.dumps(cell), flush=True)
        result[f"weight_sync_s/{dt}"] = round(engine.runner.sync() if engine.runner else 0.0, 3)
        result[f"compiled_kernels/{dt}"] = bool(engine.runner and engine.runner.kernel is not None)
    from forkrl.rollout.engine import kernels
    result["kernel_build_or_load_s"] = round(kernels.build_seconds, 2)  # ~20 s on a machine's first run
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
