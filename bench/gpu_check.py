"""The GPU check: forkrl's engine and learner on one CUDA GPU, on a random-initialised model, in one
prepared run that prints JSON.

    python bench/gpu_check.py                        # one CUDA GPU: the Qwen2-0.5B shape (~4 min on an H200)
    python bench/gpu_check.py --device cpu --tiny    # the same code paths on a tiny shape (the test suite runs it)

What it measures, in order:

  architectures  the fast runner against the Hugging Face forward, small random Llama, Qwen2 and Qwen3.
  samplers  every shipped sampler (independent, broad, latr, etmr, april, arpo, aepo) on the device.
  engine    decode tokens/s of forkrl's TorchEngine (bf16 sampling weights, exact entropies) at batch 64
            and 256, beside Hugging Face `generate` (sampling, the same model in bf16) and transformers'
            continuous-batching `generate_batch`; every side generates exactly `--new-tokens` per row
            (end-of-sequence off) from the same random prompts.
  learner   the GRPO learner's update (`Learner.update`: packing, advantages, forward, backward, AdamW)
            on synthetic groups of prompts and responses of mixed lengths, in packed micro-batches of
            `--micro-tokens` tokens: tokens/s, MFU and peak GPU memory.
  grpo      three full GRPO steps of `Trainer.step` (sampling, scoring, learning, weight sync) with the
            time split and `train/logprob_mismatch` (the engine's bf16 log-probs against the learner's).
  torchrun  `forkrl train --nproc 1` (one rank under torchrun) on the same random model, one step.

The model is the Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, tied
embeddings) with the embedded tokenizer's 49,152-token vocabulary, randomly initialised: nothing
is downloaded. MFU counts 6 x (decoder parameters) FLOPs per packed token, plus the causal
attention (6 x layers x hidden x visible keys) and the vocabulary projection for each response token
the loss reads, against `--peak-tflops` (989: the H100/H200 SXM bf16 dense figure).

The grpo part's reward is a stand-in (a hash of the completion text): the task reward of a random
model is always 0, every group would have zero advantage, and GRPO would learn from nothing.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def stand_in_reward(completions, **_) -> list[float]:
    """A reward with spread inside every group (see the module docstring): a hash of the text in [0, 1)."""
    return [int(hashlib.sha1(c.encode()).hexdigest()[:8], 16) / 2**32 for c in completions]


def random_model(shape: str, tokenizer, device: torch.device, seed: int = 0):
    from forkrl.models.loader import random_model as random_lm
    return random_lm("qwen2", seed=seed, device=device, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


# -- engine ------------------------------------------------------------------------------------------
def check_engine(model, tokenizer, device, batches, prompt_len: int, new_tokens: int, out: dict, flush) -> dict:
    """Fills `out` side by side, calling `flush` after each (a failure in one side keeps the figures of
    the others): forkrl's engine with eager decode steps and with replayed CUDA graphs, then
    Hugging Face `generate`, then `generate_batch` (at the first batch size only: it is slow)."""
    from transformers import GenerationConfig

    from forkrl.rollout import GenerationRequest, SamplingParams, TorchEngine
    eager = TorchEngine(model, tokenizer, max_batch_size=max(batches), prefix_cache_mb=0, dtype="auto",
                        cuda_graphs=False)
    eager.eos_ids = [-1]   # exactly new_tokens per row, as on the Hugging Face side
    hf_model = copy.deepcopy(model).to(eager.dtype).eval()
    hf_model.generation_config.eos_token_id = None
    rng = random.Random(0)
    vocab = len(tokenizer)
    out.update({"sampling_dtype": str(eager.dtype).removeprefix("torch."), "new_tokens": new_tokens,
                "prompt_tokens": prompt_len})
    prompts_of = {B: [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(B)] for B in batches}
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens)

    def run_forkrl(name, engine, B):
        reqs = [GenerationRequest(p, params) for p in prompts_of[B]]
        engine.max_batch_size = B
        engine.generate(reqs, seed=0)                                    # warm-up (and graph capture)
        outs, secs = timed(device, lambda: engine.generate(reqs, seed=1))
        n = sum(len(c.token_ids) for o in outs for c in o)
        out[f"batch_{B}"].update({f"{name}_tokens_per_s": round(n / secs, 1), f"{name}_s": round(secs, 3)})
        flush()

    graphs = TorchEngine(model, tokenizer, max_batch_size=max(batches), prefix_cache_mb=0, dtype="auto")
    graphs.eos_ids = [-1]
    out["cuda_graphs"] = graphs.runner.use_graphs
    for B in batches:
        out.setdefault(f"batch_{B}", {})
        run_forkrl("forkrl_no_cuda_graphs", eager, B)
        run_forkrl("forkrl", graphs, B)
        if B == batches[0]:   # replayed graphs and eager steps: the same greedy tokens and log-probs
            greedy = [GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=new_tokens)) for p in prompts_of[B]]
            a, b = graphs.generate(greedy), eager.generate(greedy)
            pairs = [(x, y) for o1, o2 in zip(a, b) for x, y in zip(o1, o2)]
            out["graph_vs_eager_greedy_token_agreement"] = round(
                sum(i == j for x, y in pairs for i, j in zip(x.token_ids, y.token_ids)) / sum(len(x.token_ids) for x, _ in pairs), 4)
            out["graph_vs_eager_first_token_logprob_max_abs_diff"] = round(
                max(abs(x.logprobs[0] - y.logprobs[0]) for x, y in pairs), 5)
            flush()
    del graphs, eager
    for B in batches:
        row = out[f"batch_{B}"]
        prompts = prompts_of[B]
        ids = torch.tensor(prompts, device=device)
        gen_kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
        with torch.inference_mode():
            hf_model.generate(ids[:8], attention_mask=torch.ones_like(ids[:8]), **{**gen_kw, "max_new_tokens": 4,
                                                                                 "min_new_tokens": 4})
            gen, secs = timed(device, lambda: hf_model.generate(ids, attention_mask=torch.ones_like(ids), **gen_kw))
        n_hf = (gen.shape[1] - prompt_len) * B
        row.update(hf_generate_tokens_per_s=round(n_hf / secs, 1), hf_generate_s=round(secs, 3))
        flush()
        if B != batches[0]:
            continue   # continuous batching in transformers is slow here (30 s at batch 64 on an H200): once
        try:
            cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
            cb = {}
            if device.type == "cpu":
                # sized to this batch: left to itself it sizes the cache to most of the host's free memory
                # and fills it (18 s of a 27-s tiny check on a 24-GB machine)
                from transformers import ContinuousBatchingConfig
                cb["continuous_batching_config"] = ContinuousBatchingConfig(
                    page_size=64, num_blocks=B * -(-(prompt_len + new_tokens) // 64) + 8, max_batch_tokens=256)
            # not under inference_mode: its worker thread updates tensors created here in place
            hf_model.generate_batch(inputs=prompts[:8], generation_config=cfg, **cb)
            res, secs = timed(device, lambda: hf_model.generate_batch(inputs=prompts, generation_config=cfg, **cb))
            n_cb = sum(len(r.generated_tokens) for r in res.values())
            if n_cb == 0:
                raise RuntimeError("generate_batch returned no tokens (its requests failed; see its log)")
            row.update(hf_generate_batch_tokens_per_s=round(n_cb / secs, 1), hf_generate_batch_s=round(secs, 3))
        except Exception as err:  # noqa: BLE001  (report what transformers' continuous batching said, go on)
            row["hf_generate_batch_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        flush()
    for B in batches:
        row = out[f"batch_{B}"]
        best = max(row["forkrl_tokens_per_s"], row["forkrl_no_cuda_graphs_tokens_per_s"])
        if out["cuda_graphs"]:
            row["cuda_graphs_speedup"] = round(row["forkrl_tokens_per_s"] / row["forkrl_no_cuda_graphs_tokens_per_s"], 2)
        row["forkrl_vs_hf_generate"] = round(best / row["hf_generate_tokens_per_s"], 2)
        if "hf_generate_batch_tokens_per_s" in row:
            row["forkrl_vs_hf_generate_batch"] = round(best / row["hf_generate_batch_tokens_per_s"], 2)
    return out


# -- architectures ---------------------------------------------------------------------------------
def check_architectures(device) -> dict:
    """The fast runner against the Hugging Face forward on small random Llama, Qwen2 and Qwen3 configs,
    on this device (float32): the largest log-prob difference over a ragged prefill and 4 greedy
    decode steps, eager and through `decode` (CUDA graphs where the device has them)."""
    from forkrl.models.loader import random_model as random_lm
    from forkrl.rollout.engine.runner import DecoderRunner
    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    kinds = {"llama": {}, "qwen2": {}, "qwen3": {"head_dim": 64}}
    out = {}
    for name, extra in kinds.items():
        model = random_lm(name, device=device, **common, **extra).eval()
        prompts = [[5, 9, 17, 3, 22, 8, 1], [40, 2, 7], [11, 12, 13, 14, 15]]
        worst = 0.0
        runner = DecoderRunner(model, torch.float32)
        U, S = len(prompts), max(map(len, prompts))
        ids = torch.zeros((U, S), dtype=torch.long, device=device)
        for u, p in enumerate(prompts):
            ids[u, :len(p)] = torch.tensor(p)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        runner.reserve(U, 64)
        logits = runner.forward(torch.arange(U, device=device), ids, torch.zeros(U, dtype=torch.long, device=device), lengths)
        seqs = [list(p) for p in prompts]
        for _ in range(4):
            with torch.no_grad():
                want = torch.stack([model(torch.tensor([q], device=device)).logits[0, -1] for q in seqs])
            worst = max(worst, float((torch.log_softmax(logits, -1) - torch.log_softmax(want.float(), -1)).abs().max()))
            nxt = logits.argmax(-1)
            starts = torch.tensor([len(q) for q in seqs], device=device)
            for q, t in zip(seqs, nxt.tolist()):
                q.append(t)
            logits = runner.decode(nxt, starts)
        out[name] = {"max_abs_logprob_diff": worst, "cuda_graphs": runner.use_graphs}
    out["ok"] = all(v["max_abs_logprob_diff"] < 1e-3 for v in out.values())
    return out


# -- samplers --------------------------------------------------------------------------------------
SAMPLERS_CHECKED = ("independent", "broad", "latr", "etmr", "april", "arpo", "aepo")


def check_samplers(model, tokenizer, device, new_tokens: int) -> dict:
    """Every shipped sampler but the agent ones, unchanged, on this device: 4 random prompts x 4
    trajectories each (ARPO and AEPO with the calculator tool; a random model calls no tool, so they
    run their episodes without branching). Reports each one's budget and whether every entropy is
    finite."""
    import math

    from forkrl.collect.collector import build_env
    from forkrl.config import load_config
    from forkrl.rollout import (
        SamplerContext,
        SamplingParams,
        TorchEngine,
        build_sampler,
        run_sampler,
    )
    engine = TorchEngine(model, tokenizer, max_batch_size=64, prefix_cache_mb=256, dtype="auto")
    cfg = load_config(str(ROOT / "configs/arpo.yaml"), ["env.tools=[calculator]"])
    env = build_env(cfg, model, tokenizer, seed_of_call=lambda: 0)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, len(tokenizer)) for _ in range(16)] for _ in range(4)]
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, n=4)
    out = {}
    for name in SAMPLERS_CHECKED:
        engine.weights_updated()
        ctx = SamplerContext(env=env if name in ("arpo", "aepo") else None, tokenizer=tokenizer, step=1)
        groups, budget = run_sampler(build_sampler(name, {}), engine, prompts, params, seed=0, ctx=ctx)
        trajs = [t for g in groups for t in g]
        out[name] = {"trajectories": len(trajs), "branch_points": budget.branch_points,
                     "decoded_tokens": budget.decoded_tokens, "prefilled_tokens": budget.prefilled_tokens,
                     "cached_tokens": budget.cached_tokens, "seconds": round(budget.seconds, 3),
                     "entropies_finite": all(math.isfinite(h) for t in trajs for h, m in zip(t.entropies, t.loss_mask)
                                             if m)}
    out["ok"] = all(v["trajectories"] > 0 and v["entropies_finite"] for v in out.values())
    return out


# -- learner -----------------------------------------------------------------------------------------
def synthetic_groups(n_prompts: int, per_prompt: int, prompt_range, response_range, vocab: int, seed: int = 0):
    from forkrl.types import Trajectory
    rng = random.Random(seed)
    trajs = []
    for p in range(n_prompts):
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(*prompt_range))]
        for _ in range(per_prompt):
            n = rng.randint(*response_range)
            trajs.append(Trajectory(prompt_ids=prompt, tokens=[rng.randrange(100, vocab) for _ in range(n)],
                                    logprobs=[-10.8] * n, entropies=[10.8] * n, loss_mask=[1] * n, group=f"g{p}",
                                    policy_version=[0] * n, reward=rng.random(), finish="length"))
    return trajs


def model_flops(model, trajs) -> float:
    """Training FLOPs (forward + backward) of one update over `trajs` as the learner packs them: each
    prompt once per group, each response behind it."""
    cfg = model.config
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    decoder = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    flops, seen = 0.0, set()
    for t in trajs:
        P, R = len(t.prompt_ids), len(t.tokens)
        if t.group not in seen:
            seen.add(t.group)
            flops += 6 * decoder * P + 6 * L * d * P * (P + 1) / 2 * 2
        flops += 6 * decoder * R + 6 * L * d * (R * P + R * (R + 1) / 2) * 2 + 6 * V * d * R
    return flops


def packed_tokens(trajs) -> int:
    seen, n = set(), 0
    for t in trajs:
        if t.group not in seen:
            seen.add(t.group)
            n += len(t.prompt_ids)
        n += len(t.tokens)
    return n


def check_learner(trainer, device, groups, repeats: int, peak_tflops: float) -> dict:
    vocab = trainer.model.config.vocab_size
    trajs = synthetic_groups(*groups, vocab=vocab)
    learner = trainer.learner
    learner.update(synthetic_groups(2, groups[1], groups[2], groups[3], vocab, seed=1), step=0)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    secs = []
    for r in range(repeats):
        metrics, s = timed(device, lambda r=r: learner.update(trajs, step=r + 1))
        secs.append(s)
    best = min(secs)
    tokens = packed_tokens(trajs)
    flops = model_flops(trainer.model, trajs)
    out = {"trajectories": len(trajs), "packed_tokens_per_update": tokens,
           "response_tokens_per_update": sum(len(t.tokens) for t in trajs),
           "micro_batch_tokens": learner.micro_tokens, "update_s": [round(s, 3) for s in secs],
           "tokens_per_s": round(tokens / best, 1), "tflops": round(flops / best / 1e12, 2),
           "mfu": round(flops / best / (peak_tflops * 1e12), 4), "bf16_autocast": trainer.policy.autocast,
           "loss_finite": bool(torch.isfinite(torch.tensor(metrics.get("train/loss", 0.0))))}
    if device.type == "cuda":
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


# -- GRPO steps --------------------------------------------------------------------------------------
def write_task(folder: Path, n: int) -> tuple[Path, Path]:
    rng = random.Random(0)
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a in range(100) for b in range(100)]
    rng.shuffle(rows)
    paths = []
    for name, part in (("train", rows[:n]), ("eval", rows[n:2 * n])):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(path)
    return paths[0], paths[1]


def run_config(folder: Path, args, device: torch.device, model_name: str = "tiny-random") -> list[str]:
    train, held_out = write_task(folder, 64)
    return [f"model.name={model_name}", "task.source=file", f"task.train_path={train}", f"task.eval_path={held_out}",
            "task.eval_size=8", "task.extractor=last_number",
            f"task.rewards=[{{name: stand_in, function: '{Path(__file__).resolve()}:stand_in_reward'}}]",
            f"rollout.prompts_per_step={args.prompts}", f"rollout.samples_per_prompt={args.samples}",
            f"rollout.max_new_tokens={args.new_tokens}", f"rollout.max_batch_size={args.prompts * args.samples}",
            f"train.micro_batch_tokens={args.micro_tokens}", "train.micro_batch_size=4096", "train.lr=1e-6",
            f"train.device={device.type}", f"rollout.cuda_graphs={str(args.cuda_graphs == 'on').lower()}",
            "eval.at_start=false", "log.progress=false",
            "log.entropy_probe_tokens=0", f"output_dir={folder / 'run'}"]


def check_grpo(trainer, steps: int) -> dict:
    trainer.engine.eos_ids = [-1]   # full-length completions: the time split of a long-reasoning step
    keys = ("time/step_s", "time/sampling_s", "time/scoring_s", "time/learning_s", "time/weight_sync_s")
    rows, sampled = [], 0
    for _ in range(steps):
        m = trainer.step()
        total, sampled = sampled, int(m.get("budget/sampled_tokens", 0))
        rows.append({**{k.removeprefix("time/"): round(m[k], 3) for k in keys if k in m},
                     "sampled_tokens": sampled - total,
                     "sampling_tokens_per_s": round(m.get("throughput/sampling_tokens_per_s", 0.0), 1),
                     "training_tokens_per_s": round(m.get("throughput/training_tokens_per_s", 0.0), 1),
                     "logprob_mismatch": round(m.get("train/logprob_mismatch", float("nan")), 4),
                     "reward_mean": round(m.get("reward/mean", float("nan")), 3)})
    return {"steps": rows}


def check_torchrun(model, tokenizer, folder: Path, args, device, timeout: int) -> dict:
    saved = folder / "random-model"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    (folder / "torchrun").mkdir(exist_ok=True)
    cfg = run_config(folder / "torchrun", args, device, model_name=str(saved))
    cmd = [sys.executable, "-m", "forkrl.cli", "train", str(ROOT / "configs/quickstart.yaml"), *cfg, "train.steps=1",
           "--nproc", "1"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout} s"}
    out = {"ok": done.returncode == 0, "returncode": done.returncode, "wall_s": round(time.perf_counter() - start, 1),
           "command": "forkrl train configs/quickstart.yaml ... --nproc 1 (torch.distributed.run, one rank)"}
    if done.returncode != 0:
        out["stderr_tail"] = done.stderr[-1500:]
    else:
        try:
            out["summary"] = json.loads(done.stdout[done.stdout.index("{"):])
        except ValueError:
            out["stdout_tail"] = done.stdout[-500:]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a tiny model and small batches: the code paths, not the speed")
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the embedded model's)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--parts", default="architectures,engine,samplers,learner,grpo,torchrun")
    p.add_argument("--torchrun-timeout", type=int, default=240)
    p.add_argument("--cuda-graphs", default="on", choices=["on", "off"], help="the trainer's engine (grpo, torchrun)")
    p.add_argument("--out", default=None, help="also write the JSON here, after every part (a later failure keeps the rest)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda, but torch sees no CUDA device; use --device cpu --tiny", file=sys.stderr)
        return 2
    shape = "tiny" if args.tiny else "qwen2-0.5b"
    batches = (4, 8) if args.tiny else (64, 256)
    args.prompts, args.samples = (2, 4) if args.tiny else (16, 8)
    args.new_tokens = 16 if args.tiny else 256
    args.micro_tokens = 512 if args.tiny else 16384
    groups = (4, 4, (8, 24), (8, 32)) if args.tiny else (64, 8, (64, 192), (64, 448))
    parts = set(args.parts.split(","))

    from forkrl.config import load_config
    from forkrl.models.loader import load_tokenizer
    from forkrl.train import Trainer
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer("smollm2-135m")
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "shape": shape, "vocab": len(tokenizer)}
    import transformers
    result["transformers"] = transformers.__version__
    model = random_model(shape, tokenizer, device)
    result["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    started = time.perf_counter()

    def flush():
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))

    def record(part: str, fn):
        t0 = time.perf_counter()
        try:
            result[part] = fn()
        except Exception as err:  # noqa: BLE001  (one part failing must not lose the others' figures)
            import traceback
            result[part] = {**(result.get(part) or {}), "error": f"{type(err).__name__}: {err}"[:500],
                            "traceback": traceback.format_exc()[-1500:]}
        result.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t0, 1)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))

    if "architectures" in parts:
        record("architectures", lambda: check_architectures(device))
    if "engine" in parts:
        result["engine"] = {}
        record("engine", lambda: check_engine(model, tokenizer, device, batches, prompt_len=32 if not args.tiny else 8,
                                              new_tokens=args.new_tokens, out=result["engine"], flush=flush))
    if "samplers" in parts:
        record("samplers", lambda: check_samplers(model, tokenizer, device, new_tokens=min(args.new_tokens, 64)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if parts & {"learner", "grpo"}:
            cfg = load_config(str(ROOT / "configs/quickstart.yaml"), run_config(folder, args, device))
            trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
            if "learner" in parts:
                record("learner", lambda: check_learner(trainer, device, groups, repeats=2, peak_tflops=args.peak_tflops))
            if "grpo" in parts:
                record("grpo", lambda: check_grpo(trainer, steps=3))
            del trainer
        if "torchrun" in parts:
            record("torchrun", lambda: check_torchrun(model, tokenizer, folder, args, device, args.torchrun_timeout))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    failed = [k for k, v in result.items() if isinstance(v, dict) and ("error" in v or v.get("ok") is False)]
    if failed:
        print(f"gpu_check: these parts failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
