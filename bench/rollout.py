"""TorchEngine vs Hugging Face `generate` on the embedded model, in one run on one machine.

    python bench/rollout.py [--batch 32] [--new-tokens 64] [--dtype float32] [--threads N]

Both sample at temperature 1 from the same chat-formatted prompts with end-of-sequence disabled
(every sequence decodes exactly --new-tokens tokens, so both do the same work); prints JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from forkrl.models import load_policy
    from forkrl.rollout import GenerationRequest, SamplingParams, TorchEngine

    model, tok = load_policy("smollm2-135m", dtype=args.dtype)
    model.eval()
    questions = [f"What is {a} plus {b}? Explain step by step." for a, b in zip(range(3, 99, 3), range(7, 200, 5))]
    prompts = [tok.apply_chat_template([{"role": "user", "content": questions[i % len(questions)]}],
                                       add_generation_prompt=True, tokenize=True, return_dict=False)
               for i in range(args.batch)]

    engine = TorchEngine(model, tok, max_batch_size=args.batch)
    engine.eos_ids = [-1]  # no early stop: fixed work per sequence
    params = SamplingParams(temperature=1.0, max_tokens=args.new_tokens)

    def run_engine():
        return engine.generate([GenerationRequest(p, params) for p in prompts], seed=0)

    tok.padding_side = "left"
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt")

    def run_hf():
        with torch.inference_mode():
            return model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  pad_token_id=tok.pad_token_id)

    def timed(fn):
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    tokens = args.batch * args.new_tokens
    t_engine, t_hf = timed(run_engine), timed(run_hf)
    print(json.dumps({
        "bench": "rollout", "model": "smollm2-135m", "dtype": args.dtype, "batch": args.batch,
        "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
        "torch_engine_tokens_per_s": round(tokens / t_engine, 1),
        "hf_generate_tokens_per_s": round(tokens / t_hf, 1),
        "speedup": round(t_hf / t_engine, 3),
        "torch_engine_reports": "token ids, log-probs, full-distribution entropies",
    }, indent=1))


if __name__ == "__main__":
    main()
