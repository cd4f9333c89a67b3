"""Writes train.jsonl and eval.jsonl: short list-processing programs to write, with their answers.
Held-out prompts are disjoint from the training ones by content. python data/programs/make.py"""
import json
import random
from pathlib import Path

OPS = {
    "the sum of the numbers in data": sum,
    "the largest number in data": max,
    "the smallest number in data": min,
    "the difference between the largest and the smallest number in data": lambda xs: max(xs) - min(xs),
    "how many numbers in data are even": lambda xs: sum(x % 2 == 0 for x in xs),
}


def rows(rng, n, seen):
    out = []
    while len(out) < n:
        xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
        what, fn = rng.choice(list(OPS.items()))
        prompt = f"data = {xs}\nWrite a Python program that prints {what}."
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "answer": str(fn(xs))})
    return out


if __name__ == "__main__":
    here = Path(__file__).parent
    seen: set[str] = set()
    for name, n, seed in (("train", 300, 0), ("eval", 60, 1)):
        data = rows(random.Random(seed), n, seen)
        (here / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
