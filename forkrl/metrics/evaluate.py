"""Held-out evaluation: greedy accuracy, the unbiased pass@k estimator, mean@n and majority vote,
each with a 95% interval."""
from __future__ import annotations

from collections import Counter
from math import comb, sqrt

from forkrl.types import GenerationRequest, SamplingParams, Trajectory


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021, arXiv 2107.03374, eq. 1): 1 - C(n-c, k) / C(n, k),
    from n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], z: float = 1.96) -> float:
    """Half-width of the normal 95% interval of a mean over prompts."""
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    return z * sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def majority_vote(answers: list[str | None], correct: list[float]) -> float:
    """Correctness of the most common answer (ties: the one seen first); 0 when none was extracted."""
    counted = Counter(a for a in answers if a is not None)
    if not counted:
        return 0.0
    top = max(counted.values())
    winner = next(a for a in answers if a is not None and counted[a] == top)
    return next(c for a, c in zip(answers, correct) if a == winner)


def _single_turn(engine):
    def generate(prompts, samples, params, seed):
        outs = engine.generate([GenerationRequest(p, params) for p in prompts], seed=seed)
        return [[Trajectory.from_completion(p, c, group=str(i), sample=s) for c in o]
                for i, (p, s, o) in enumerate(zip(prompts, samples, outs))]
    return generate


def evaluate(engine, task, samples=None, *, max_new_tokens: int = 128, stop: list[str] | None = None,
             pass_k: list[int] = (1,), n_samples: int = 0, temperature: float = 1.0, seed: int = 0,
             generate=None, tools: bool = False, episode_rewards: bool = False) -> dict:
    """Greedy accuracy on `samples` (default: the task's held-out set) and, when n_samples > 0,
    pass@k for each k from n_samples completions per prompt at `temperature`.
    `generate(prompt_ids, samples, params, seed) -> trajectories per prompt` replaces plain sampling
    (the trainer passes its multi-turn tool rollout); with tools, `eval/tool_use_frac` is reported; with
    `episode_rewards` (agent programs, whose episodes return their reward), `eval/reward` is their mean."""
    samples = list(task.eval if samples is None else samples)
    if not samples:
        raise ValueError(f"task {task.name} has no held-out samples to evaluate on")  # tasks refuse this earlier
    generate = generate or _single_turn(engine)
    prompts = [task.prompt_ids(s, engine.tokenizer) for s in samples]
    greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop or []))
    outs = generate(prompts, samples, greedy, seed)
    texts = [o[0].text for o in outs]
    correct = task.correct(samples, texts)
    lo, hi = wilson_interval(sum(correct), len(samples))
    result = {"eval/accuracy": sum(correct) / len(samples), "eval/accuracy_ci_low": lo, "eval/accuracy_ci_high": hi,
              "eval/n_prompts": len(samples),
              "eval/response_length": sum(o[0].num_generated for o in outs) / len(outs)}
    if tools:
        result["eval/tool_use_frac"] = sum(bool(o[0].tool_calls) for o in outs) / len(outs)
        # what the held-out calls cost (priced tools: Router-R1's pool), per trajectory
        result["eval/tool_cost_per_traj"] = sum(c.cost for o in outs for c in o[0].tool_calls) / len(outs)
    if episode_rewards:
        result["eval/reward"] = sum(o[0].reward for o in outs) / len(outs)
    if n_samples > 0:
        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, n=n_samples, stop=list(stop or []))
        outs = generate(prompts, samples, params, seed + 1)
        flat_samples = [s for s, o in zip(samples, outs) for _ in o]
        flat_correct = task.correct(flat_samples, [c.text for o in outs for c in o])
        per_prompt = [sum(flat_correct[i * n_samples:(i + 1) * n_samples]) for i in range(len(samples))]
        for k in pass_k:
            per = [pass_at_k(n_samples, int(c), k) for c in per_prompt]
            result[f"eval/pass@{k}"] = sum(per) / len(samples)
            result[f"eval/pass@{k}_ci"] = mean_interval(per)
        result["eval/sampled_accuracy"] = sum(flat_correct) / len(flat_correct)
        if episode_rewards:
            result["eval/sampled_reward"] = sum(c.reward for o in outs for c in o) / len(flat_correct)
        result[f"eval/mean@{n_samples}"] = result["eval/sampled_accuracy"]
        texts_flat = [c.text for o in outs for c in o]
        votes = [majority_vote([task.answer_of(x) for x in texts_flat[i * n_samples:(i + 1) * n_samples]],
                               flat_correct[i * n_samples:(i + 1) * n_samples]) for i in range(len(samples))]
        result[f"eval/maj@{n_samples}"] = sum(votes) / len(samples)
        result[f"eval/maj@{n_samples}_ci"] = mean_interval(votes)
        if tools:
            result["eval/sampled_tool_use_frac"] = sum(bool(c.tool_calls) for o in outs for c in o) / len(flat_correct)
    # every completion, greedy first: `forkrl eval` writes them next to the scores
    result["generations"] = [{"sample_id": s.id, "prompt": s.prompt, "answer": s.answer, "greedy": True,
                              "completion": t, "correct": c} for s, t, c in zip(samples, texts, correct)]
    if n_samples > 0:
        result["generations"] += [{"sample_id": s.id, "prompt": s.prompt, "answer": s.answer, "greedy": False,
                                   "completion": x, "correct": c}
                                  for s, x, c in zip(flat_samples, texts_flat, flat_correct)]
    return result
