"""TorchEngine vs Hugging Face `generate` on the embedded model, in one run on one machine.

    python bench/rollout.py [--batch 32] [--new-tokens 64] [--dtype float32] [--threads N] [--repeats 3]

Two scenarios, each timed alternately (engine, generate, engine, ...) after a warm-up, median reported:
  fixed:  --batch distinct chat prompts, end-of-sequence disabled, exactly --new-tokens per sequence
          (both do the same work: this measures the decode loop itself)
  rl:     --batch/8 prompts x 8 samples at temperature 1 with end-of-sequence honoured, as in an RL step
          (generate uses num_return_sequences=8; the engine shares each prompt's prefill across its
          samples and drops finished rows)
Prints JSON with tokens/s for each and the ratio.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from forkrl.models import load_policy
    from forkrl.rollout import GenerationRequest, SamplingParams, TorchEngine

    model, tok = load_policy("smollm2-135m", dtype=args.dtype)
    model.eval()
    tok.padding_side = "left"
    questions = [f"What is {a} plus {b}? Explain step by step." for a, b in zip(range(3, 300, 3), range(7, 600, 5))]

    def chat(q):
        return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)

    engine = TorchEngine(model, tok, max_batch_size=args.batch)
    eos_ids = engine.eos_ids

    def scenario(name, prompts, n, honour_eos):
        params = SamplingParams(temperature=1.0, max_tokens=args.new_tokens, n=n)
        enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
        counts = {}

        def run_engine():
            engine.eos_ids = eos_ids if honour_eos else [-1]
            out = engine.generate([GenerationRequest(p, params) for p in prompts], seed=0)
            counts["engine"] = sum(len(c.token_ids) for o in out for c in o)

        def run_hf():
            extra = {} if honour_eos else {"min_new_tokens": args.new_tokens}
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                     max_new_tokens=args.new_tokens, num_return_sequences=n,
                                     pad_token_id=tok.pad_token_id, **extra)
            new = out[:, enc["input_ids"].shape[1]:]
            # tokens up to and including the first end-of-sequence token
            ended = torch.isin(new, torch.tensor(eos_ids)) if honour_eos else torch.zeros_like(new, dtype=torch.bool)
            first = torch.where(ended.any(-1), ended.int().argmax(-1) + 1, torch.full((len(new),), new.shape[1]))
            counts["hf"] = int(first.sum())

        run_engine(), run_hf()  # warm-up
        times = {"engine": [], "hf": []}
        for _ in range(args.repeats):
            for key, fn in (("engine", run_engine), ("hf", run_hf)):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {
            f"{name}/torch_engine_tokens_per_s": round(counts["engine"] / med["engine"], 1),
            f"{name}/hf_generate_tokens_per_s": round(counts["hf"] / med["hf"], 1),
            f"{name}/speedup": round((counts["engine"] / med["engine"]) / (counts["hf"] / med["hf"]), 3),
            f"{name}/mean_new_tokens": {"engine": counts["engine"] / (len(prompts) * n),
                                        "hf": counts["hf"] / (len(prompts) * n)},
        }

    result = {"bench": "rollout", "model": "smollm2-135m", "dtype": args.dtype, "batch": args.batch,
              "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                         f"{torch.backends.cpu.get_cpu_capability()}", "torch": torch.__version__}
    result.update(scenario("fixed", [chat(q) for q in questions[:args.batch]], 1, honour_eos=False))
    result.update(scenario("rl", [chat(q) for q in questions[:max(args.batch // 8, 1)]], 8, honour_eos=True))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
